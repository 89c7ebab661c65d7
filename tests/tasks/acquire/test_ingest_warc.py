"""WARC / WET ingest on generated archives: record types, decoding, damage, fsspec URLs."""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import random
import uuid
from collections import Counter

import boto3
import brotli
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from lmfoundry.infra.config import IngestWarcConfig, PipelineConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.acquire.ingest_warc import iter_records, record_chunks

INGEST_WARC = StageSpec("ingest_warc", "lmfoundry.tasks.acquire.ingest_warc:run_ingest_warc", section="ingest_warc", inputs=("crawl",))
WORDS = "north south east west river hill stone field wood lake bridge tower road gate wall".split()


def text_of(n: int, words: int = 300) -> str:
    return " ".join(WORDS[(i * 7 + n * 13 + i * i) % len(WORDS)] for i in range(words))


def page(n: int) -> bytes:
    return f"<!DOCTYPE html><html><head><title>Page {n}</title></head><body><p>{text_of(n)}</p></body></html>".encode()


class ArchiveBuilder:
    """Writes WARC records and remembers where each one starts, so tests can damage them."""

    def __init__(self, compress: bool = True, seed: int = 0):
        self.buffer = io.BytesIO()
        self.writer = WARCWriter(self.buffer, gzip=compress)
        self.offsets: list[int] = []
        self.seed = seed

    def ids(self) -> dict[str, str]:
        """Record id and date fixed by the seed, so the archive's bytes are the same on every run."""
        record_id = uuid.UUID(int=random.Random(self.seed * 1000 + len(self.offsets)).getrandbits(128))
        return {"WARC-Record-ID": f"<urn:uuid:{record_id}>", "WARC-Date": "2024-05-01T12:00:00Z"}

    def _write(self, record) -> None:
        self.offsets.append(self.buffer.tell())
        self.writer.write_record(record)

    def response(self, url: str, body: bytes, status: str = "200 OK", headers: list[tuple[str, str]] | None = None) -> None:
        headers = headers if headers is not None else [("Content-Type", "text/html; charset=utf-8")]
        http = StatusAndHeaders(status, headers + [("Content-Length", str(len(body)))], protocol="HTTP/1.1")
        record = self.writer.create_warc_record(url, "response", payload=io.BytesIO(body), length=len(body), http_headers=http, warc_headers_dict=self.ids())
        self._write(record)

    def request(self, url: str) -> None:
        http = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.org")], is_http_request=True)
        self._write(self.writer.create_warc_record(url, "request", http_headers=http))

    def revisit(self, url: str) -> None:
        http = StatusAndHeaders("304 Not Modified", [], protocol="HTTP/1.1")
        self._write(self.writer.create_revisit_record(url, "sha1:AAAA", url, "2024-01-01T00:00:00Z", http_headers=http))

    def conversion(self, url: str, text: str) -> None:
        body = text.encode()
        record = self.writer.create_warc_record(
            url, "conversion", payload=io.BytesIO(body), length=len(body), warc_content_type="text/plain", warc_headers_dict={"Content-Type": "text/plain"}
        )
        self._write(record)

    def data(self) -> bytes:
        return self.buffer.getvalue()

    def member(self, index: int) -> tuple[int, int]:
        end = self.offsets[index + 1] if index + 1 < len(self.offsets) else len(self.data())
        return self.offsets[index], end


def normal_archive() -> bytes:
    a = ArchiveBuilder()
    a.request("http://example.org/1")
    a.response("http://example.org/1", page(1))
    a.response("http://example.org/2", page(2))
    a.revisit("http://example.org/3")
    a.response("http://example.org/404", b"<html>missing</html>", status="404 Not Found")
    a.response("http://example.org/logo.png", b"\x89PNG" + bytes(300), headers=[("Content-Type", "image/png")])
    a.response("http://example.org/untyped", page(4), headers=[])  # sniffed as HTML
    a.response("http://example.org/gz", gzip.compress(page(5)), headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    return a.data()


def wet_archive() -> bytes:
    a = ArchiveBuilder()
    a.conversion("http://example.org/wet-1", "Plain text of the first page. " + text_of(6))
    a.conversion("http://example.org/wet-2", "Plain text of the second page. " + text_of(7))
    return a.data()


def damaged_archive(seed: int = 0) -> bytes:
    """Five pages; page 1's gzip member is cut short, garbage sits between pages 2 and 3."""
    a = ArchiveBuilder(seed=seed)
    for n in range(5):
        a.response(f"http://example.org/d{n}", page(10 + n))
    data = a.data()
    start1, end1 = a.member(1)
    start3, _ = a.member(3)
    return data[:end1 - 120] + data[end1:start3] + b"\x00garbage\xff" * 40 + data[start3:]


def damaged_plain_archive() -> bytes:
    a = ArchiveBuilder(compress=False)
    for n in range(3):
        a.response(f"http://example.org/p{n}", page(20 + n))
    data = a.data()
    start1, _ = a.member(1)
    return data[:start1] + b"this is not a WARC record\r\n\r\n" * 5 + data[start1:]


def ingest_config(*paths: str, **extra) -> PipelineConfig:
    return PipelineConfig.model_validate({"ingest_warc": {"paths": list(paths), **extra}})


def all_records(store, ref) -> list[dict]:
    reader = store.reader(ref)
    return [row for chunk in record_chunks(reader) for row in reader.read_table(chunk).to_pylist()]


def test_records_types_and_decoding(store, tmp_path):
    (tmp_path / "a.warc.gz").write_bytes(normal_archive())
    (tmp_path / "b.warc.wet.gz").write_bytes(wet_archive())
    outcome = run_stage(store, INGEST_WARC, ingest_config(str(tmp_path / "*.gz")), [])
    rows = {row["url"]: row for row in all_records(store, outcome.ref)}
    assert set(rows) == {
        "http://example.org/1", "http://example.org/2", "http://example.org/untyped", "http://example.org/gz",
        "http://example.org/wet-1", "http://example.org/wet-2",
    }
    assert outcome.stats["skipped"] == {"http_4xx": 1, "non_html": 1, "revisit": 1}
    assert outcome.stats["other_records"] == {"request": 1}
    one = rows["http://example.org/1"]
    assert one["payload"] == page(1) and one["charset"] == "utf-8" and one["content_type"] == "text/html"
    assert one["http_status"] == 200 and one["payload_kind"] == "html" and one["source"] == "warc"
    assert one["warc_record_id"].startswith("<urn:uuid:") and one["fetch_date"].startswith("20")
    assert rows["http://example.org/gz"]["payload"] == page(5)  # Content-Encoding undone
    assert rows["http://example.org/untyped"]["content_type"] == "text/html"
    wet = rows["http://example.org/wet-1"]
    assert wet["payload_kind"] == "text" and wet["payload"].startswith(b"Plain text of the first page.")
    # rerun: committed, reused
    assert run_stage(store, INGEST_WARC, ingest_config(str(tmp_path / "*.gz")), []).status == "skipped"


# seeds 13 and 247 cut the member so that warcio reports a negative record length
@pytest.mark.parametrize("seed", [0, 13, 247])
def test_damaged_records_are_skipped_and_reading_goes_on(store, tmp_path, seed):
    (tmp_path / "damaged.warc.gz").write_bytes(damaged_archive(seed))
    (tmp_path / "plain.warc").write_bytes(damaged_plain_archive())
    (tmp_path / "noise.warc.gz").write_bytes(b"\x1f\x8b\x08" + bytes(range(256)) * 20)
    outcome = run_stage(store, INGEST_WARC, ingest_config(str(tmp_path)), [])
    urls = {row["url"] for row in all_records(store, outcome.ref)}
    # the cut member (d1) is lost; the pages after the damage are read
    assert {"http://example.org/d0", "http://example.org/d2", "http://example.org/d3", "http://example.org/d4"} <= urls
    assert "http://example.org/d1" not in urls
    assert {"http://example.org/p0", "http://example.org/p1", "http://example.org/p2"} <= urls
    assert outcome.stats["skipped"]["corrupt_record"] >= 3  # at least one per damaged file
    assert outcome.stats["files"] == 3


def read_archive(data: bytes) -> tuple[dict[str, dict], Counter]:
    """iter_records over an archive in memory: rows by URL and the skip reasons counted."""
    rows, skipped = {}, Counter()
    for row, reason, _ in iter_records(io.BytesIO(data), IngestWarcConfig(), "test", "test.warc"):
        if row:
            rows[row["url"]] = row
        elif reason:
            skipped[reason] += 1
    return rows, skipped


def test_any_damaged_archive_loses_only_the_damaged_record():
    for seed in range(300):  # the cut lands differently with every seed's record ids
        rows, skipped = read_archive(damaged_archive(seed))
        assert set(rows) == {f"http://example.org/d{n}" for n in (0, 2, 3, 4)}, seed
        assert skipped["corrupt_record"] >= 2, seed  # the cut member and the garbage, each counted


def test_a_record_cut_off_at_the_end_of_the_file_is_truncated():
    for compress in (True, False):
        a = ArchiveBuilder(compress=compress)
        for n in range(3):
            a.response(f"http://example.org/e{n}", page(40 + n))
        data = a.data()
        for cut in (data[:-50], data[: a.offsets[2] + 100]):  # in the payload, in the header block
            rows, skipped = read_archive(cut)
            assert set(rows) == {"http://example.org/e0", "http://example.org/e1"}
            assert skipped == {"truncated_record": 1}


def test_a_page_quoting_a_warc_record_is_not_read_as_one_after_damage():
    quoted = b"<html><body><pre>\nWARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://quoted.example/\r\n\r\n</pre></body></html>"
    a = ArchiveBuilder(compress=False)
    a.response("http://example.org/q0", page(50) + quoted)
    a.response("http://example.org/q1", page(51))
    data = a.data()
    start1, _ = a.member(1)
    rows, skipped = read_archive(data[:start1] + b"junk line\r\n" * 3 + data[start1:])
    assert set(rows) == {"http://example.org/q0", "http://example.org/q1"}
    assert skipped == {"corrupt_record": 1}


def test_content_encodings_are_undone_and_mislabelled_bodies_kept_as_sent():
    html = [("Content-Type", "text/html")]
    gzipped = gzip.compress(page(61))
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(gzipped[i : i + 100]), gzipped[i : i + 100]) for i in range(0, len(gzipped), 100)) + b"0\r\n\r\n"
    a = ArchiveBuilder()
    a.response("http://example.org/br", brotli.compress(page(60)), headers=html + [("Content-Encoding", "br")])
    a.response("http://example.org/chunked-gzip", chunked, headers=html + [("Transfer-Encoding", "chunked"), ("Content-Encoding", "gzip")])
    a.response("http://example.org/not-gzip", page(62), headers=html + [("Content-Encoding", "gzip")])
    a.response("http://example.org/not-chunked", page(63), headers=html + [("Transfer-Encoding", "chunked")])
    a.response("http://example.org/after", page(64))
    rows, skipped = read_archive(a.data())
    assert {url: row["payload"] for url, row in rows.items()} == {
        "http://example.org/br": page(60),
        "http://example.org/chunked-gzip": page(61),
        "http://example.org/not-gzip": page(62),
        "http://example.org/not-chunked": page(63),
        "http://example.org/after": page(64),
    }
    assert not skipped


def raw_response(url: str, block_digest) -> bytes:
    """An uncompressed response record whose WARC-Block-Digest is block_digest(block)."""
    block = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + page(70)
    headers = (
        f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2024-05-01T12:00:00Z\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.UUID(int=len(url))}>\r\nContent-Type: application/http; msgtype=response\r\n"
        f"WARC-Block-Digest: {block_digest(block)}\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return headers.encode() + block + b"\r\n\r\n"


def test_block_digests_in_any_common_encoding_are_checked():
    sha1 = lambda block: hashlib.sha1(block).digest()  # noqa: E731
    written = {
        "b32": lambda b: "sha1:" + base64.b32encode(sha1(b)).decode(),
        "b32-lower": lambda b: "sha1:" + base64.b32encode(sha1(b)).decode().lower(),
        "hex": lambda b: "sha1:" + sha1(b).hex(),
        "b64": lambda b: "sha1:" + base64.b64encode(sha1(b)).decode(),
        "sha256-hex": lambda b: "sha256:" + hashlib.sha256(b).hexdigest(),
        "md5-b32": lambda b: "md5:" + base64.b32encode(hashlib.md5(b).digest()).decode(),
        "unknown-algorithm": lambda b: "blake9:" + sha1(b).hex(),  # cannot be checked: kept
    }
    damaged = {"wrong-sha1": lambda b: "sha1:" + base64.b32encode(sha1(b + b"x")).decode(), "wrong-sha256": lambda b: "sha256:" + hashlib.sha256(b"").hexdigest()}
    archive = b"".join(raw_response(f"http://example.org/{name}", digest) for name, digest in {**written, **damaged}.items())
    rows, skipped = read_archive(archive)
    assert set(rows) == {f"http://example.org/{name}" for name in written}
    assert skipped == {"corrupt_record": 2}


def test_large_files_become_several_chunks_and_changes_make_a_new_version(store, tmp_path):
    a = ArchiveBuilder()
    for n in range(12):
        a.response(f"http://example.org/c{n}", page(30 + n))
    path = tmp_path / "big.warc.gz"
    path.write_bytes(a.data())
    cfg = ingest_config(str(path), chunk_bytes=4096, max_payload_bytes=1024)
    first = run_stage(store, INGEST_WARC, cfg, [])
    reader = store.reader(first.ref)
    chunks = record_chunks(reader)
    assert len(chunks) == first.stats["chunks"] >= 3
    rows = all_records(store, first.ref)
    assert [row["url"] for row in rows] == [f"http://example.org/c{n}" for n in range(12)]  # file order kept
    assert all(len(row["payload"]) == 1024 and row["truncated"] for row in rows)
    assert pq.read_schema(reader.local_path(chunks[0])).names[:3] == ["id", "url", "fetch_date"]
    path.write_bytes(normal_archive())
    second = run_stage(store, INGEST_WARC, cfg, [])
    assert second.status == "ran" and second.ref.version != first.ref.version


def test_reads_any_fsspec_url(store, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="crawl-data")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket="crawl-data", Key="cc/part-1.warc.gz", Body=normal_archive())
    s3.put_object(Bucket="crawl-data", Key="cc/part-2.warc.wet.gz", Body=wet_archive())
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "skip_instance_cache": True}
    outcome = run_stage(store, INGEST_WARC, ingest_config("s3://crawl-data/cc/*", storage_options=options, source="cc"), [])
    rows = all_records(store, outcome.ref)
    assert outcome.stats["files"] == 2 and len(rows) == 6
    assert {row["source"] for row in rows} == {"cc"}
    assert all(row["warc_file"].startswith("s3://crawl-data/cc/") for row in rows)


def test_missing_path_names_the_setting(store, tmp_path):
    with pytest.raises(ValueError, match=r"ingest_warc.paths\[0\]"):
        run_stage(store, INGEST_WARC, ingest_config(str(tmp_path / "nothing-*.warc.gz")), [])


def test_reads_crawl_warc_files_from_an_s3_store(s3_store):
    """A crawl committed in an S3 store is read in place, damaged members included."""
    out = s3_store.open_for_write("crawl", "fixture")
    out.write_bytes("warc/part-00000.warc.gz", damaged_archive())
    out.write_bytes("warc/part-00001.warc.gz", normal_archive())
    crawl = s3_store.commit(out, {"stats": {}})
    outcome = run_stage(s3_store, INGEST_WARC, PipelineConfig(), [crawl])
    urls = [row["url"] for row in all_records(s3_store, outcome.ref)]
    assert urls[:4] == ["http://example.org/d0", "http://example.org/d2", "http://example.org/d3", "http://example.org/d4"]
    assert len(urls) == 8 and outcome.stats["records_by_source"] == {"crawl": 8}


def test_paths_are_read_in_the_order_given(store, tmp_path):
    for name, n in (("a", 1), ("b", 2)):
        a = ArchiveBuilder(seed=n)
        a.response(f"http://example.org/{name}", page(n))
        (tmp_path / f"{name}.warc.gz").write_bytes(a.data())
    b_first = run_stage(store, INGEST_WARC, ingest_config(str(tmp_path / "b.warc.gz"), str(tmp_path / "*.warc.gz")), [])
    assert [row["url"] for row in all_records(store, b_first.ref)] == ["http://example.org/b", "http://example.org/a"]
    a_first = run_stage(store, INGEST_WARC, ingest_config(str(tmp_path / "a.warc.gz"), str(tmp_path / "b.warc.gz")), [])
    assert [row["url"] for row in all_records(store, a_first.ref)] == ["http://example.org/a", "http://example.org/b"]
    assert a_first.ref.version != b_first.ref.version


def test_a_truncated_download_is_counted_not_ingested(store, tmp_path):
    data = normal_archive()
    (tmp_path / "cut.warc.gz").write_bytes(data[: len(data) - 200])  # inside the last page's body
    outcome = run_stage(store, INGEST_WARC, ingest_config(str(tmp_path / "cut.warc.gz")), [])
    assert "http://example.org/gz" not in {row["url"] for row in all_records(store, outcome.ref)}
    assert outcome.stats["skipped"]["truncated_record"] == 1 and outcome.stats["warnings"] == []


def test_empty_input_commits_with_a_warning(store, tmp_path, caplog):
    (tmp_path / "empty.warc.gz").write_bytes(b"")
    outcome = run_stage(store, INGEST_WARC, ingest_config(str(tmp_path / "empty.warc.gz")), [])
    assert outcome.status == "ran" and outcome.stats["records_out"] == 0
    assert outcome.stats["skipped"] == {"empty_file": 1}
    assert len(outcome.stats["warnings"]) == 1 and "empty_file=1" in outcome.stats["warnings"][0]
    assert any(r.levelname == "WARNING" and "gave no documents" in r.getMessage() for r in caplog.records)
