import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from lmfoundry.infra.config import ConfigError, PipelineConfig, TokenizerConfig, build_config
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.infra.store import Store
from lmfoundry.tasks.tokens.train_tokenizer import TokenizerInputError, in_sample, load_tokenizer, train
from tests.helpers import commit_docs

SPEC = StageSpec("train_tokenizer", "lmfoundry.tasks.tokens.train_tokenizer:run_train_tokenizer", section="tokenizer")
REPO = Path(__file__).resolve().parents[3]

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.  Tabs\there, newlines\n\nand trailing spaces   ",
    "Größenwahn: Müller, Straße und Ärger — naïve café, déjà vu. «Guillemets» ‘quotes’",
    "日本語のテキストと漢字、カタカナ。中文：你好，世界！ 한국어 문장도 있습니다.",
    "Русский текст, Ελληνικά γράμματα, עברית מימין לשמאל, العربية من اليمين",
    "हिन्दी देवनागरी, தமிழ், ไทยภาษา, ქართული ენა",
    "Emoji: 😀🎉👍🏽 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣ heart ❤️ rainbow 🏳️‍🌈",
    "def f(x):\n    return {'k': [x ** 2, None]}  # code\r\n\tindent\u00a0nbsp\u200bzwsp",
    "Math ∑∫√∞ ≠ ≤ ≥, arrows ←→↔, box ┌─┐, music 𝄞, old italic 𐌀𐌁",
]


def corpus(n_docs: int = 60) -> list[dict]:
    return [{"id": f"doc{i}", "text": MULTILINGUAL[i % len(MULTILINGUAL)] + f" number {i} " * (1 + i % 3)} for i in range(n_docs)]


def config(**tokenizer) -> PipelineConfig:
    return PipelineConfig.model_validate({"tokenizer": {"vocab_size": 600, **tokenizer}})


def test_round_trip_multilingual_and_emoji_and_reload_from_store_gives_identical_ids(store):
    ref = commit_docs(store, [corpus()])
    cfg = config(normalization="none")
    outcome = run_stage(store, SPEC, cfg, [ref])
    assert outcome.status == "ran"
    # a fresh Store object: nothing shared with the run but the files
    stored, special = load_tokenizer(Store(store.url), outcome.ref)
    in_memory = train(cfg.tokenizer, store, [ref], Counter())
    unseen = ["Ünseen wörds ✨🦄 and 未見の文字 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", unicodedata.normalize("NFD", "décomposé Ångström 한글")]
    for text in MULTILINGUAL + unseen:
        ids = stored.encode(text, add_special_tokens=False).ids
        assert stored.decode(ids) == text
        assert ids == in_memory.encode(text, add_special_tokens=False).ids
    assert special == {"bos": 0, "eos": 1, "pad": 2, "assistant": 3, "end": 4, "system": 5, "user": 6}
    assert stored.get_vocab_size() == 600
    assert outcome.stats["docs_sampled"] == 60 and outcome.stats["bytes_per_token"] > 1.0
    assert run_stage(store, SPEC, cfg, [ref]).status == "skipped"


def test_nfc_normalisation_round_trips_nfc_text_and_composes_nfd_text(store):
    ref = commit_docs(store, [corpus()])
    tokenizer, _ = load_tokenizer(store, run_stage(store, SPEC, config(normalization="nfc"), [ref]).ref)
    for text in MULTILINGUAL:
        nfc = unicodedata.normalize("NFC", text)
        assert tokenizer.decode(tokenizer.encode(nfc, add_special_tokens=False).ids) == nfc
    nfd = unicodedata.normalize("NFD", "café Ångström 한글")
    assert tokenizer.decode(tokenizer.encode(nfd).ids) == unicodedata.normalize("NFC", nfd)


def test_transformers_loads_the_stage_output_with_the_same_ids_and_special_tokens(store):
    ref = commit_docs(store, [corpus()])
    outcome = run_stage(store, SPEC, config(normalization="none"), [ref])
    reader = store.reader(outcome.ref)
    ours, special = load_tokenizer(store, outcome.ref)
    hf = PreTrainedTokenizerFast(tokenizer_file=reader.local_path("tokenizer.json"), **{
        k: v for k, v in reader.read_json("tokenizer_config.json").items() if k.endswith("_token") or k == "additional_special_tokens"
    })
    for text in MULTILINGUAL:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (special["bos"], special["eos"], special["pad"])
    assert hf.convert_tokens_to_ids("<|assistant|>") == special["assistant"]
    assert hf.encode("<|user|>hi<|end|>", add_special_tokens=False)[0] == special["user"]


def test_training_is_deterministic_across_processes_and_thread_counts(store, tmp_path):
    ref = commit_docs(store, [corpus(40), corpus(30)])
    outcome = run_stage(store, SPEC, config(), [ref])
    stored = store.reader(outcome.ref).read_bytes("tokenizer.json")
    script = (
        "import sys, json; from collections import Counter; from lmfoundry.infra.config import TokenizerConfig; "
        "from lmfoundry.infra.store import Store, StageRef; from lmfoundry.tasks.tokens.train_tokenizer import train; "
        "cfg = TokenizerConfig(vocab_size=600); ref = StageRef.model_validate_json(sys.argv[2]); "
        "sys.stdout.write(train(cfg, Store(sys.argv[1]), [ref], Counter()).to_str(pretty=True))"
    )
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", script, store.url, ref.model_dump_json()], cwd=REPO, env=env, capture_output=True, check=True)
    assert hashlib.sha256(other.stdout).hexdigest() == hashlib.sha256(stored).hexdigest()


def test_sample_is_a_stable_hash_of_the_id_and_respects_the_character_budget(store):
    ref = commit_docs(store, [corpus(200) + [{"id": "blank", "text": ""}]])
    half = run_stage(store, SPEC, config(sample_fraction=0.5), [ref]).stats
    chosen = [d["id"] for d in corpus(200) if in_sample(d["id"], 0.5, 0)]
    assert half["docs_sampled"] == len(chosen) and 60 < len(chosen) < 140
    assert half["docs_in"] == 201 and half["skipped"] == {"empty_or_missing_text": 1}
    capped = run_stage(store, SPEC, config(sample_max_chars=5000), [ref]).stats
    assert capped["chars_sampled"] == 5000
    assert in_sample("doc7", 0.5, 0) == in_sample("doc7", 0.5, 0)
    assert [in_sample(f"x{i}", 0.3, 1) for i in range(50)] != [in_sample(f"x{i}", 0.3, 2) for i in range(50)]


def test_an_existing_tokenizer_file_is_used_and_its_content_is_part_of_the_version(store, tmp_path):
    ref = commit_docs(store, [corpus()])
    trained, _ = load_tokenizer(store, run_stage(store, SPEC, config(special_tokens={"bos": "<s>", "eos": "</s>", "pad": "<pad>"}), [ref]).ref)
    given = tmp_path / "given.json"
    given.write_text(trained.to_str())
    special = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "user": "<|user|>"}
    first = run_stage(store, SPEC, config(path=str(given), special_tokens=special), [ref])
    assert first.stats["origin"] == str(given) and first.stats["added_special_tokens"] == ["<|user|>"]
    loaded, ids = load_tokenizer(store, first.ref)
    assert ids["user"] == trained.get_vocab_size() and ids["eos"] == trained.token_to_id("</s>")
    assert loaded.encode(MULTILINGUAL[1]).ids == trained.encode(MULTILINGUAL[1]).ids
    assert run_stage(store, SPEC, config(path=str(given), special_tokens=special), [ref]).status == "skipped"
    changed = json.loads(given.read_text())
    changed["added_tokens"][0]["content"] = "<start>"
    given.write_text(json.dumps(changed))
    assert run_stage(store, SPEC, config(path=str(given), special_tokens=special), [ref]).ref.version != first.ref.version


def test_bad_inputs_fail_with_a_message_that_says_what_to_do(store, tmp_path):
    with pytest.raises(TokenizerInputError, match="tokenizer.path"):
        run_stage(store, SPEC, config(), [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerInputError, match="not a tokenizer.json"):
        run_stage(store, SPEC, config(path=str(bad)), [])
    with pytest.raises(ConfigError, match="pad"):
        build_config({"tokenizer": {"special_tokens": {"bos": "<s>", "eos": "</s>"}}})
    with pytest.raises(ConfigError, match="own token"):
        build_config({"tokenizer": {"special_tokens": {"bos": "<s>", "eos": "<s>", "pad": "<pad>"}}})
    assert TokenizerConfig(path="x.json", special_tokens={"bos": "<e>", "eos": "<e>", "pad": "<e>"}).path == "x.json"


def test_the_stage_ships_the_chat_template_that_transformers_loads(store):
    from transformers import AutoTokenizer

    from lmfoundry.model.chat import chat_template, render

    ref = commit_docs(store, [corpus()])
    outcome = run_stage(store, SPEC, config(normalization="none"), [ref])
    reader = store.reader(outcome.ref)
    assert reader.read_bytes("chat_template.jinja").decode() == chat_template(config().tokenizer.special_tokens)
    hf = AutoTokenizer.from_pretrained(str(Path(reader.local_path("tokenizer.json")).parent))
    ours, special = load_tokenizer(store, outcome.ref)
    messages = [{"role": "user", "content": MULTILINGUAL[0]}, {"role": "assistant", "content": MULTILINGUAL[5]}]
    ids, _ = render(messages, lambda text: ours.encode(text, add_special_tokens=False).ids, special)
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
    # without the chat roles there is no template (and nothing breaks)
    bare = run_stage(store, SPEC, config(normalization="none", special_tokens={"bos": "<s>", "eos": "</s>", "pad": "<pad>"}), [ref])
    assert "chat_template.jinja" not in store.reader(bare.ref).files()
