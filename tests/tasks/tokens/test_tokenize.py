import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.faults import InjectedFault
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import Store
from lmfoundry.tasks.tokens.tokenize import TokenizeInputError, frame_docs, in_val, pack, pad_per_doc, token_dtype
from lmfoundry.tasks.tokens.train_tokenizer import load_tokenizer
from tests.helpers import commit_docs

TOKENIZER = StageSpec("train_tokenizer", "lmfoundry.tasks.tokens.train_tokenizer:run_train_tokenizer", section="tokenizer")
TOKENIZE = StageSpec("tokenize", "lmfoundry.tasks.tokens.tokenize:run_tokenize", section="tokenize")

WORDS = "alpha beta gamma délta ε 数据 🚀 packing tokens shard loader <|eos|> <|pad|>".split()


def doc(i: int, prefix: str = "d") -> dict:
    # literal special-token text inside documents must be encoded as plain text
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + (i * 13) % 40)]
    return {"id": f"{prefix}{i}", "text": f"[{prefix}{i}] " + " ".join(words), "source": ["web", "code"][i % 2]}


def config(**tokenize) -> PipelineConfig:
    return PipelineConfig.model_validate({"tokenizer": {"vocab_size": 400}, "tokenize": {"seq_len": 16, "val_fraction": 0.2, **tokenize}})


def run_both(store, shards, cfg):
    docs_ref = commit_docs(store, shards)
    tok = run_stage(store, TOKENIZER, cfg, [docs_ref])
    return docs_ref, tok.ref, run_stage(store, TOKENIZE, cfg, [docs_ref, tok.ref])


def read_split_file(store, ref, path) -> np.ndarray:
    table = pa.ipc.open_file(pa.BufferReader(store.reader(ref).read_bytes(path))).read_all()
    column = table.column("tokens").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1) if len(column) else np.empty((0, 17))


def expected_stream(tokenizer, special, docs, split, val_fraction, bos=False) -> list[int]:
    out = []
    for d in docs:
        if d["text"] and in_val(d["id"], val_fraction) == (split == "val"):  # the stage skips empty documents
            out += ([special["bos"]] if bos else []) + tokenizer.encode(d["text"], add_special_tokens=False).ids + [special["eos"]]
    return out


def test_packing_loses_and_duplicates_no_token(store):
    shards = [[doc(i) for i in range(0, 70)], [doc(i) for i in range(70, 100)] + [{"id": "empty", "text": ""}]]
    docs_ref, tok_ref, outcome = run_both(store, shards, config())
    tokenizer, special = load_tokenizer(store, tok_ref)
    tokenizer.encode_special_tokens = True
    index = store.reader(outcome.ref).read_json("index.json")
    assert (index["seq_len"], index["dtype"], index["eos_id"], index["pad_id"]) == (16, "uint16", special["eos"], special["pad"])
    total = {"train": 0, "val": 0}
    for i, docs in enumerate(shards):
        for split in ("train", "val"):
            samples = read_split_file(store, outcome.ref, f"{split}/part-{i:05d}.arrow")
            assert samples.dtype == np.uint16 and samples.shape[1] == 17
            flat = samples.reshape(-1)
            want = expected_stream(tokenizer, special, docs, split, 0.2)
            n_pad = len(flat) - len(want)
            assert 0 <= n_pad < 17  # only the tail of the shard's last sample
            assert flat[: len(want)].tolist() == want and set(flat[len(want):].tolist()) <= {special["pad"]}
            total[split] += len(want)
    assert index["tokens"] == total == outcome.stats["tokens"]
    assert sum(e["samples"] for e in index["splits"]["train"]) == outcome.stats["samples"]["train"]
    assert outcome.stats["skipped"] == {"empty": 1} and outcome.stats["docs_in"] == 101
    by_source = index["tokens_by_source"]
    assert sum(c["train"] + c["val"] for c in by_source.values()) == sum(total.values()) and set(by_source) == {"web", "code"}
    assert special["eos"] not in tokenizer.encode("text with <|eos|> and <|pad|>").ids
    assert run_stage(store, TOKENIZE, config(), [docs_ref, tok_ref]).status == "skipped"


def test_pad_mode_starts_every_document_in_a_new_sample_with_bos(store):
    shards = [[doc(i) for i in range(40)]]
    _, tok_ref, outcome = run_both(store, shards, config(packing="pad", add_bos=True, val_fraction=0.0))
    tokenizer, special = load_tokenizer(store, tok_ref)
    tokenizer.encode_special_tokens = True
    samples = read_split_file(store, outcome.ref, "train/part-00000.arrow")
    docs_seen, current = [], []
    for row in samples.tolist():
        if not current:
            assert row[0] == special["bos"]
        body = [t for t in row if t != special["pad"]]
        assert row[: len(body)] == body  # pad only at the end of a row
        current += body
        if body[-1] == special["eos"]:
            docs_seen.append(current)
            current = []
        else:
            assert len(body) == 17  # a document continues only after a full row
    want = [[special["bos"]] + tokenizer.encode(d["text"], add_special_tokens=False).ids + [special["eos"]] for d in shards[0]]
    assert docs_seen == want
    assert outcome.stats["samples"]["val"] == 0 and store.reader(outcome.ref).read_json("index.json")["splits"]["val"] == []


def decoded_val_docs(store, tok_ref, ref, n_shards) -> set[str]:
    tokenizer, special = load_tokenizer(store, tok_ref)
    ids = []
    for i in range(n_shards):
        path = f"val/part-{i:05d}.arrow"
        ids += read_split_file(store, ref, path).reshape(-1).tolist()
    texts = tokenizer.decode([t if t != special["eos"] else special["system"] for t in ids if t != special["pad"]], skip_special_tokens=False)
    return {t.split("]")[0].lstrip("[") for t in texts.split("<|system|>") if t}


def test_validation_split_is_stable_when_documents_are_added(store):
    old = [[doc(i) for i in range(60)]]
    docs_ref, tok_ref, first = run_both(store, old, config())
    grown = [[doc(i) for i in range(60)] + [doc(i, "new") for i in range(20)], [doc(i, "more") for i in range(30)]]
    grown_ref = commit_docs(store, grown)
    second = run_stage(store, TOKENIZE, config(), [grown_ref, tok_ref])  # same tokenizer, more documents
    val_before = decoded_val_docs(store, tok_ref, first.ref, 1)
    val_after = decoded_val_docs(store, tok_ref, second.ref, 2)
    assert val_before == {d["id"] for d in old[0] if in_val(d["id"], 0.2)} and 3 <= len(val_before) <= 25
    assert {v for v in val_after if v.startswith("d")} == val_before
    assert any(v.startswith(("new", "more")) for v in val_after)


def test_pure_packing_helpers():
    stream, framed = frame_docs([[5, 6], [], [7]], bos=None, eos=1, dtype=np.dtype(np.uint16))
    assert stream.tolist() == [5, 6, 1, 1, 7, 1] and framed.tolist() == [3, 1, 2]
    assert pack(stream, 4, pad=0).tolist() == [[5, 6, 1, 1], [7, 1, 0, 0]]
    assert pad_per_doc(stream, framed, 2, pad=0).tolist() == [[5, 6], [1, 0], [1, 0], [7, 1]]
    with_bos, _ = frame_docs([[5], [6, 7]], bos=2, eos=1, dtype=np.dtype(np.uint32))
    assert with_bos.tolist() == [2, 5, 1, 2, 6, 7, 1]
    assert pack(np.array([], np.uint16), 4, 0).shape == (0, 4)
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert in_val("x", 0.0) is False and all(in_val(f"d{i}", 0.3) <= in_val(f"d{i}", 0.5) for i in range(200))


def test_large_vocabulary_gives_uint32_shards_from_a_given_tokenizer_file(store, tmp_path):
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"filler{j}": len(vocab) + j for j in range(70_000)})
    big = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    path = tmp_path / "big.json"
    path.write_text(big.to_str())
    cfg = PipelineConfig.model_validate({"tokenizer": {"path": str(path)}, "tokenize": {"seq_len": 8, "val_fraction": 0.0}})
    docs_ref = commit_docs(store, [[doc(i) for i in range(5)]])
    tok = run_stage(store, TOKENIZER, cfg, [docs_ref])
    outcome = run_stage(store, TOKENIZE, cfg, [docs_ref, tok.ref])
    samples = read_split_file(store, outcome.ref, "train/part-00000.arrow")
    assert samples.dtype == np.uint32 and outcome.stats["dtype"] == "uint32"
    _, special = load_tokenizer(store, tok.ref)
    assert special["eos"] >= 70_000 and special["eos"] in samples


def test_a_failed_run_resumes_from_its_marked_shards_with_identical_output(store, tmp_path, monkeypatch):
    shards = [[doc(i) for i in range(k * 20, k * 20 + 20)] for k in range(3)]
    cfg = config().model_copy(update={"compute": PipelineConfig().compute.model_copy(update={"workers": 1})})
    docs_ref = commit_docs(store, shards)
    tok_ref = run_stage(store, TOKENIZER, cfg, [docs_ref]).ref
    monkeypatch.setenv("LMF_FAULT", "tokenize:after_file:4:fail")  # after shards 0 and 1 (val + train each)
    with pytest.raises(InjectedFault):
        run_stage(store, TOKENIZE, cfg, [docs_ref, tok_ref])
    monkeypatch.delenv("LMF_FAULT")
    resumed = run_stage(store, TOKENIZE, cfg, [docs_ref, tok_ref])
    manifest = store.manifest("tokenize", resumed.ref.version)
    assert manifest["resumed_files"] == 4
    fresh_store = Store(str(tmp_path / "fresh"))
    fresh_docs = commit_docs(fresh_store, shards)
    fresh = run_stage(fresh_store, TOKENIZE, cfg, [fresh_docs, run_stage(fresh_store, TOKENIZER, cfg, [fresh_docs]).ref])
    assert resumed.ref.digest == fresh.ref.digest  # the same files, byte for byte
    assert resumed.stats == fresh.stats


def test_output_does_not_depend_on_the_task_runner(store, tmp_path):
    shards = [[doc(i) for i in range(k * 15, k * 15 + 15)] for k in range(3)]
    docs_ref, tok_ref, threads = run_both(store, shards, config())
    other = Store(str(tmp_path / "other"))
    cfg = config().model_copy(update={"compute": PipelineConfig().compute.model_copy(update={"workers": 2, "task_runner": "processes"})})
    other_docs = commit_docs(other, shards)
    processes = run_stage(other, TOKENIZE, cfg, [other_docs, run_stage(other, TOKENIZER, cfg, [other_docs]).ref])
    assert processes.ref.digest == threads.ref.digest  # same files, byte for byte


def test_missing_tokenizer_input_is_reported(store):
    docs_ref = commit_docs(store, [[doc(0)]])
    with pytest.raises(TokenizeInputError, match="train_tokenizer"):
        run_stage(store, TOKENIZE, config(), [docs_ref])
    assert not any(store.is_committed("tokenize", v) for v in store.versions("tokenize"))
