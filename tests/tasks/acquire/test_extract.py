"""HTML -> main-content text, language ID and the per-document time limit."""
from __future__ import annotations

import io
import json
import os
import time

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from lmfoundry.infra.config import ExtractConfig, PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.acquire.extract import LanguageId, Sandbox, SandboxCrashed, SandboxTimeout, language_id, process_payload

INGEST_WARC = StageSpec("ingest_warc", "lmfoundry.tasks.acquire.ingest_warc:run_ingest_warc", section="ingest_warc", inputs=("crawl",))
EXTRACT = StageSpec("extract", "lmfoundry.tasks.acquire.extract:run_extract", section="extract", inputs=("ingest_warc",))

ARTICLE = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk to light the great lamp.",
    "For forty years the light never failed, even during the storm that flooded the harbour town.",
    "When the lamp was finally automated, the keeper moved to a cottage and wrote a book about the sea.",
]
BOILERPLATE_PAGE = f"""<!DOCTYPE html><html><head><title>The last lighthouse keeper</title></head><body>
<header><nav class="main-menu"><ul>
  <li><a href="/">Homepage</a></li><li><a href="/shop">Online shop</a></li>
  <li><a href="/contact">Contact us today</a></li><li><a href="/login">Sign in to your account</a></li>
</ul></nav></header>
<div class="container">
  <aside class="sidebar"><h3>Trending now</h3><ul>
    <li><a href="/x">Ten celebrity kitchens you must see</a></li><li><a href="/y">Best budget phones ranked</a></li>
  </ul></aside>
  <main><article><h1>The last lighthouse keeper</h1>
    {''.join(f'<p>{p}</p>' for p in ARTICLE)}
  </article></main>
</div>
<footer class="site-footer"><p>Copyright 2024 Harbour Media Group. All rights reserved.</p>
<p><a href="/privacy">Privacy policy</a> | <a href="/cookies">Cookie settings</a></p></footer>
</body></html>""".encode()

SAMPLES = {
    "en": "The committee met on Tuesday morning to discuss the budget for the coming year, and after a long debate "
    "the members agreed to postpone the final decision until the spring.",
    "de": "Der Ausschuss traf sich am Dienstagmorgen, um über den Haushalt für das kommende Jahr zu beraten, und nach "
    "einer langen Debatte beschlossen die Mitglieder, die endgültige Entscheidung auf das Frühjahr zu verschieben.",
    "fr": "Le comité s'est réuni mardi matin pour discuter du budget de l'année prochaine et, après un long débat, "
    "les membres ont décidé de reporter la décision finale au printemps.",
    "es": "El comité se reunió el martes por la mañana para discutir el presupuesto del próximo año y, después de un "
    "largo debate, los miembros acordaron aplazar la decisión final hasta la primavera.",
    "ru": "Комитет собрался во вторник утром, чтобы обсудить бюджет на следующий год, и после долгих дебатов члены "
    "комитета решили отложить окончательное решение до весны.",
}


def record(payload: bytes, kind: str = "html", charset: str = "") -> dict:
    return {"payload": payload, "payload_kind": kind, "charset": charset, "url": "http://example.org/"}


def simple_page(title: str, text: str) -> bytes:
    return f"<html><head><title>{title}</title></head><body><article><p>{text}</p></article></body></html>".encode()


def test_main_content_kept_and_boilerplate_dropped():
    extracted, reason = process_payload(ExtractConfig(), language_id(None), record(BOILERPLATE_PAGE))
    assert reason is None
    text = extracted["text"]
    for sentence in ARTICLE:
        assert sentence in text
    for boilerplate in ["Online shop", "Contact us today", "Sign in", "celebrity kitchens", "budget phones", "Copyright 2024", "Privacy policy", "Cookie settings"]:
        assert boilerplate not in text
    assert extracted["title"] == "The last lighthouse keeper"
    assert extracted["language"] == "en" and extracted["language_score"] > 0.9
    # the switch exists for a reason: without main-content extraction the menus stay
    everything, _ = process_payload(ExtractConfig(main_content=False), language_id(None), record(BOILERPLATE_PAGE))
    assert "Online shop" in everything["text"]


def test_trafilatura_extractor_also_drops_boilerplate():
    extracted, reason = process_payload(ExtractConfig(extractor="trafilatura"), language_id(None), record(BOILERPLATE_PAGE))
    assert reason is None and ARTICLE[1] in extracted["text"] and "Online shop" not in extracted["text"]


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_language_id_labels_sample_paragraphs(language):
    label, score = language_id(None)(SAMPLES[language])
    assert label == language and score > 0.9


def test_language_id_codes_control_characters_and_unknown():
    lid = language_id(None)
    # CLD2's own codes are iw and zh-Hant; documents get the ISO 639-1 ones
    assert lid("שלום עולם, זהו טקסט בעברית שנכתב כדי לבדוק את זיהוי השפה של הספרייה")[0] == "he"
    assert lid("這是一個用繁體中文寫的句子，用來測試語言識別是否正確運作。我們希望它能夠被正確地識別出來。")[0] == "zh"
    # characters CLD2 rejects (NUL, C1 controls, lone surrogates, noncharacters) do not hide the language
    label, score = lid("\x00\x85\ud800\ufffe\U0010ffff " + SAMPLES["de"])
    assert label == "de" and score > 0.9
    assert lid("Index – A") == ("un", 0.0)


def test_charset_from_header_and_detected():
    german = simple_page("Straße", SAMPLES["de"]).decode().encode("latin-1")
    for charset in ("iso-8859-1", ""):
        extracted, _ = process_payload(ExtractConfig(), language_id(None), record(german, charset=charset))
        assert "Ausschuss traf sich am Dienstagmorgen, um über den Haushalt für" in extracted["text"]


def test_meta_charset_beats_guessing():
    """Mostly ASCII UTF-8 with a few symbols: byte statistics alone guess cp1250; <meta charset> is right."""
    page = (
        '<html><head><meta charset="utf-8"><title>Operand</title></head><body><h1>vdst¶</h1>'
        "<p>Instruction output. Size: 1 dword.</p><h2>Operands¶</h2>"
        "<p>This operand may be used with floating point operand modifiers abs and neg.</p></body></html>"
    ).encode()
    extracted, _ = process_payload(ExtractConfig(), language_id(None), record(page))
    assert "vdst¶" in extracted["text"] and "Operands¶" in extracted["text"]
    unknown, _ = process_payload(ExtractConfig(), language_id(None), record(page, charset="x-no-such-charset"))
    assert "vdst¶" in unknown["text"]


def test_fasttext_model_path(tmp_path):
    """A fastText LID model at extract.lid_model_path replaces CLD2 (a tiny one trained here)."""
    import fasttext

    lines = []
    for label, text in SAMPLES.items():
        words = text.split()
        lines += [f"__label__{label} " + " ".join(words[i:] + words[:i]) for i in range(len(words))]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(tmp_path / "train.txt"), epoch=30, lr=0.5, minn=2, maxn=4, dim=16, thread=1, verbose=0)
    model.save_model(str(tmp_path / "lid.bin"))
    lid = LanguageId(str(tmp_path / "lid.bin"))
    assert lid(SAMPLES["fr"])[0] == "fr" and lid(SAMPLES["ru"])[0] == "ru"
    with pytest.raises(FileNotFoundError, match="lid_model_path"):
        LanguageId(str(tmp_path / "missing.bin"))


def slow_or_crash(arg):
    if arg == "slow":
        time.sleep(30)
    if arg == "crash":
        os._exit(3)
    return arg.upper()


def test_sandbox_kills_a_slow_call_and_survives_a_crash():
    with Sandbox(slow_or_crash, time_limit_s=0.5) as sandbox:
        assert sandbox("a") == "A"
        slow_worker = sandbox.pid
        with pytest.raises(SandboxTimeout):
            sandbox("slow")  # the call would return "SLOW" after 30 s if the limit were not kept
        with pytest.raises(ProcessLookupError):
            os.kill(slow_worker, 0)  # the worker was killed (and reaped), not left sleeping
        assert sandbox("b") == "B"  # a fresh worker
        assert sandbox.pid != slow_worker
        with pytest.raises(SandboxCrashed):
            sandbox("crash")
        assert sandbox("c") == "C"


def write_warc(path, pages: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=True)
    for url, body in pages:
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), length=len(body), http_headers=http))
    path.write_bytes(buffer.getvalue())


def test_extract_stage_labels_filters_and_survives_a_pathological_page(store, tmp_path):
    nested = b"<html><body>" + b"<div>" * 30000 + b"deep" + b"</div>" * 30000 + b"</body></html>"  # minutes of main-content work
    pages = [(f"http://example.org/{lang}", simple_page(f"Title {lang}", SAMPLES[lang])) for lang in sorted(SAMPLES)]
    pages += [("http://example.org/boiler", BOILERPLATE_PAGE), ("http://example.org/nested", nested), ("http://example.org/empty", b"<html><body></body></html>")]
    write_warc(tmp_path / "site.warc.gz", pages)
    cfg = PipelineConfig.model_validate({
        "ingest_warc": {"paths": [str(tmp_path / "site.warc.gz")]},
        "extract": {"languages": ["en", "de"], "min_language_score": 0.5, "time_limit_s": 2.0},
    })
    records = run_stage(store, INGEST_WARC, cfg, [])
    outcome = run_stage(store, EXTRACT, cfg, [records.ref])  # the nested page is cut off (counted as a timeout below)
    docs = {doc["url"]: doc for doc in iter_docs(store, [outcome.ref])}
    assert set(docs) == {"http://example.org/en", "http://example.org/de", "http://example.org/boiler"}
    assert outcome.stats["skipped"] == {"empty": 1, "language_not_kept": 3, "timeout": 1}
    assert outcome.stats["languages"] == {"en": 2, "de": 1}
    meta = json.loads(docs["http://example.org/de"]["meta"])
    assert meta["language"] == "de" and meta["language_score"] > 0.9 and meta["title"] == "Title de"
    assert meta["fetch_date"].startswith("20") and meta["warc_record_id"].startswith("<urn:uuid:")
    assert docs["http://example.org/de"]["source"] == "warc"
    assert run_stage(store, EXTRACT, cfg, [records.ref]).status == "skipped"
