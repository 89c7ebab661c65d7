"""Stage `augment`: WordNet synonyms that respect parts of speech and protected spans, seeded;
back-translation plumbing through two local seq2seq models; sft_data adds the variants of train
conversations only, each linked to its source."""
from __future__ import annotations

import json
import random
import re

import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.config_posttrain import BackTranslationConfig
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.chat import common
from lmfoundry.tasks.augment.backtranslate import BackTranslator
from lmfoundry.tasks.augment.synonyms import SynonymReplacer, WordNetMissing, load_wordnet, wordnet_root
from tests.tasks.augment.conftest import direct_round_trip
from tests.tasks.chat.conftest import read_split, segments

AUGMENT = StageSpec("augment", "lmfoundry.tasks.augment.conversations:run_augment", section=("augment", "sft_data"))
SFT_WITH_AUGMENT = StageSpec("sft_data", "lmfoundry.tasks.chat.sft_data:run_sft_data", section="sft_data", inputs=("train_tokenizer", "augment"))
WORDNET = "/usr/share/wordnet"  # Debian's wordnet-base (make system-deps installs it)


@pytest.fixture(scope="module")
def wordnet():
    return load_wordnet(WORDNET)


# planted: WordNet 3.0's most frequent sense of each word and its attested single-word synonyms
KNOWN = {"really": {"truly", "genuinely"}, "quickly": {"rapidly", "speedily"}, "car": {"auto", "automobile", "motorcar"}, "buy": {"purchase"}, "large": {"big"}, "want": {"desire"}}


def test_synonyms_replace_only_allowed_parts_of_speech_with_wordnet_synonyms(wordnet):
    text = "i really want to buy a large car quickly"
    everything, _ = SynonymReplacer(wordnet, {"noun", "verb", "adj", "adv"}).replace(text, 1.0, random.Random(0))
    words, new = text.split(), everything.split()
    for old, got in zip(words, new):
        assert got in KNOWN[old] if old in KNOWN else got == old, (old, got)
    adverbs_only, n = SynonymReplacer(wordnet, {"adv"}).replace(text, 1.0, random.Random(0))
    assert n == 2  # really, quickly
    assert [w for w, o in zip(adverbs_only.split(), words) if w != o] == [w for w, o in zip(new, words) if o in ("really", "quickly")]


def test_protected_spans_and_risky_words_never_change(wordnet):
    keep = [
        "```\nbuy the car really quickly\n```", "`large car`", "https://cars.example.com/buy-large", "sales@buy.example",
        "3.2", "v2large", "<EMAIL>", "<PERSON_5f1c0e9a2b>", "[REDACTED]", "<|user|>", "Car", "Really", "large-car",
        "car's", "cars", "buys",
    ]
    text = " ".join(f"{span} car" for span in keep)  # every protected span next to a word that does change
    replacer = SynonymReplacer(wordnet, {"noun", "verb", "adj", "adv"})
    out, n = replacer.replace(text, 1.0, random.Random(1))
    assert n == len(keep)
    synonym = "(?:" + "|".join(KNOWN["car"]) + ")"
    assert re.fullmatch(" ".join(re.escape(span) + " " + synonym for span in keep), out, re.S), out
    assert replacer.replace("The answer: while then about the.", 1.0, random.Random(0)) == ("The answer: while then about the.", 0)


def test_the_same_seed_gives_the_same_variant_and_rate_zero_nothing(wordnet):
    replacer = SynonymReplacer(wordnet, {"noun", "verb", "adj", "adv"})
    text = "i really want to buy a large car quickly and start a large car quickly " * 5
    a = replacer.replace(text, 0.5, random.Random("0:123:synonyms:0"))
    assert a == replacer.replace(text, 0.5, random.Random("0:123:synonyms:0"))
    assert a != replacer.replace(text, 0.5, random.Random("0:123:synonyms:1"))
    assert 0 < a[1] < 7 * 5
    assert replacer.replace(text, 1e-12, random.Random(0)) == (text, 0)


def test_a_missing_wordnet_says_what_to_install(tmp_path):
    with pytest.raises(WordNetMissing, match="apt-get install wordnet-base"):
        wordnet_root(tmp_path)


# ---------------------------------------------------------------- back-translation plumbing


def test_backtranslation_rewrites_free_sentences_and_keeps_protected_spans(translation_models):
    forward, backward = translation_models
    translator = BackTranslator(BackTranslationConfig(forward=forward, backward=backward, batch_size=2, max_new_tokens=12))
    texts = ["how do i reset my password ? then stop now .", "run `rm -rf build` it again ! <EMAIL> 42", "ja"]
    got = translator.paraphrase(texts)
    rt = lambda s: direct_round_trip(forward, backward, s)  # noqa: E731
    assert got == [
        f"{rt('how do i reset my password ?')} {rt('then stop now .')}",
        f"{rt('run')} `rm -rf build` {rt('it again !')} <EMAIL> 42",
        rt("ja"),
    ]
    wide = BackTranslator(BackTranslationConfig(forward=forward, backward=backward, batch_size=16, max_new_tokens=12))
    assert wide.paraphrase(texts) == got  # batching does not change the result


def test_a_model_path_that_is_not_a_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="augment.backtranslation.forward"):
        BackTranslator(BackTranslationConfig(forward=str(tmp_path / "nope"), backward=str(tmp_path)))
    with pytest.raises(ValueError, match="augment.backtranslation is not set"):
        PipelineConfig.model_validate({"augment": {"methods": ["backtranslation"]}})


# ---------------------------------------------------------------- the stage and sft_data


def test_sft_data_gets_variants_of_train_conversations_only(store, tokenizer_ref, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}: should i buy a large car ?"}, {"role": "assistant", "content": f"really, buy the car quickly ({i})."}]}
        for i in range(40)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {"sources": [{"paths": [str(path)]}], "val_fraction": 0.25, "seq_len": 256, "enabled": True}
    plain_cfg = PipelineConfig.model_validate({"sft_data": sft})
    cfg = PipelineConfig.model_validate({"sft_data": sft, "augment": {"enabled": True, "copies": 2, "synonym_rate": 1.0, "roles": ["assistant"]}})

    augment = run_stage(store, AUGMENT, cfg, [])
    records = [json.loads(line) for line in store.reader(augment.ref).read_bytes("augmented.jsonl").decode().splitlines()]
    keys = {common.split_key(r["messages"], 0): r for r in rows}
    val_keys = {k for k, v in zip(keys, common.val_flags(list(keys), 0.25)) if v}
    assert 0 < len(val_keys) < 40
    assert len(records) == 2 * (40 - len(val_keys)) == sum(augment.stats["variants"].values())
    for record in records:
        source = keys[record["source_key"]]["messages"]  # the link back to the source conversation
        assert record["source_key"] not in val_keys
        assert record["messages"][0] == source[0]  # the user's turn is not in roles
        assert record["messages"][1]["content"] != source[1]["content"] and record["changed"] >= 2
        assert record["messages"][1]["content"].endswith(source[1]["content"][source[1]["content"].index("(") :])  # digits kept

    plain = run_stage(store, SFT_WITH_AUGMENT, plain_cfg, [tokenizer_ref])
    with_variants = run_stage(store, SFT_WITH_AUGMENT, cfg, [tokenizer_ref, augment.ref])
    assert with_variants.ref.version != plain.ref.version
    stats = with_variants.stats
    assert stats["augmented_in"] == len(records) and stats["conversations_by_source"]["augment:synonyms"] == len(records)
    assert stats["conversations"]["train"] == plain.stats["conversations"]["train"] + len(records)
    assert stats["conversations"]["val"] == plain.stats["conversations"]["val"] == len(val_keys)
    pad = store.reader(plain.ref).read_json("index.json")["pad_id"]
    assert segments(read_split(store, with_variants.ref, "val"), pad) == segments(read_split(store, plain.ref, "val"), pad)


def test_a_disabled_augment_stage_leaves_sft_data_as_it_was():
    from lmfoundry.flows.pipeline import stage

    cfg = PipelineConfig.model_validate({"sft_data": {"enabled": True, "builtin": "chatterbot"}})
    assert not stage("augment").enabled(cfg)
    assert stage("augment").enabled(cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"enabled": True})}))
