"""Stage `preference_data`: pairs of every shape land as the contract's columns; over-length and
malformed pairs are counted; the demo pairs take their rejected answer from another topic."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import run_stage
from lmfoundry.tasks.chat import demo
from lmfoundry.tasks.chat.readers import ChatDataError
from tests.tasks.chat.conftest import PREFERENCE, expected_conversation, plain_encoder, read_split


def config(*sources: dict, **section) -> PipelineConfig:
    return PipelineConfig.model_validate({"preference_data": {"sources": list(sources), "val_fraction": 0.0, **section}})


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def expected_side(prompt, reply, encode, special):
    """Prompt + reply rendered; only the reply's content and <|end|> scored; prompt_len counts the
    rendered prompt and the generation prompt <|assistant|>."""
    ids, _ = expected_conversation([*prompt, bot(reply)], encode, special)
    prompt_len = len(expected_conversation(prompt, encode, special)[0]) + 1
    return ids, [0] * prompt_len + [1] * (len(ids) - prompt_len), prompt_len


def test_every_preference_shape_becomes_the_contract_columns(store, tokenizer_ref, tmp_path):
    encode, special, _ = plain_encoder(store, tokenizer_ref)
    hh_prompt = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Is 7 prime?\n\nAssistant:"
    rows = [
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green, always."},
        {"prompt": "Größe?", "chosen": [user("Größe?"), bot("Size 😀")], "rejected": [user("Größe?"), bot("No")]},
        {"chosen": hh_prompt + " Yes, it is.", "rejected": hh_prompt + " No."},
        {"chosen": [{"role": "system", "content": "Be kind."}, user("q"), bot("kind")], "rejected": [{"role": "system", "content": "Be kind."}, user("q"), bot("rude")]},
    ]
    expected = [
        ([user("Sky colour?")], "Blue.", "Green, always."),
        ([user("Größe?")], "Size 😀", "No"),
        ([user("Hi there"), bot("Hello."), user("Is 7 prime?")], "Yes, it is.", "No."),
        ([{"role": "system", "content": "Be kind."}, user("q")], "kind", "rude"),
    ]
    outcome = run_stage(store, PREFERENCE, config({"paths": [write_jsonl(tmp_path / "p.jsonl", rows)]}), [tokenizer_ref])
    table = read_split(store, outcome.ref, "train")
    assert table.schema == pa.schema([
        ("chosen", pa.list_(pa.uint32())), ("chosen_mask", pa.list_(pa.uint8())), ("rejected", pa.list_(pa.uint32())),
        ("rejected_mask", pa.list_(pa.uint8())), ("prompt_len", pa.uint32()), ("id", pa.string()),
    ])
    got = table.to_pylist()
    for row, (prompt, chosen, rejected) in zip(got, expected, strict=True):
        c_ids, c_mask, prompt_len = expected_side(prompt, chosen, encode, special)
        r_ids, r_mask, _ = expected_side(prompt, rejected, encode, special)
        assert (row["chosen"], row["chosen_mask"], row["rejected"], row["rejected_mask"], row["prompt_len"]) == (c_ids, c_mask, r_ids, r_mask, prompt_len)
        assert row["chosen"][:prompt_len] == row["rejected"][:prompt_len] and row["chosen"][-1] == special["end"]
    # the earlier assistant turn of the HH prompt ("Hello.") is context, not scored
    assert sum(got[2]["chosen_mask"]) == len(encode("Yes, it is.")) + 1
    assert len({row["id"] for row in got}) == 4
    index = store.reader(outcome.ref).read_json("index.json")
    assert index["format"] == "preference" and index["pairs"] == 4 and index["end_id"] == special["end"]
    assert index["splits"] == {"train": [{"path": "train/part-00000.arrow", "samples": 4}], "val": []}
    # the longer reply is chosen in 2 of 4 pairs, and kind/rude is a tie (counts half)
    assert outcome.stats["length_baseline_accuracy"]["train"] == 0.625


def test_ids_are_stable_and_long_or_bad_pairs_are_counted(store, tokenizer_ref, tmp_path):
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "x" * 40, "rejected": "short"},  # chosen side longer than seq_len + 1
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": [user("other"), bot("a")], "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ChatDataError, match=r"p\.jsonl:3: field rejected: is the same text as chosen.*\[identical_pair\]"):
        run_stage(store, PREFERENCE, config({"paths": [path]}, seq_len=16), [tokenizer_ref])
    outcome = run_stage(store, PREFERENCE, config({"paths": [path]}, seq_len=16, on_bad_row="skip"), [tokenizer_ref])
    assert outcome.stats["skipped"] == {"identical_pair": 1, "prompt_mismatch": 1}
    assert outcome.stats["too_long_dropped"] == 1 and outcome.stats["pairs"] == {"train": 1, "val": 0}
    assert outcome.stats["longest_side"] <= 17
    first_id = read_split(store, outcome.ref, "train").column("id").to_pylist()
    again = run_stage(store, PREFERENCE, config({"paths": [write_jsonl(tmp_path / "q.jsonl", rows[:1])]}), [tokenizer_ref])
    assert read_split(store, again.ref, "train").column("id").to_pylist() == first_id


def test_pairs_of_one_prompt_share_a_split_and_the_split_ignores_order(store, tokenizer_ref, tmp_path):
    rows = [{"prompt": f"question {i // 2}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(80)]
    ids = []
    for name, order in (("fwd", rows), ("rev", rows[::-1])):
        outcome = run_stage(store, PREFERENCE, config({"paths": [write_jsonl(tmp_path / f"{name}.jsonl", order)]}, val_fraction=0.25), [tokenizer_ref])
        val = read_split(store, outcome.ref, "val")
        ids.append(set(val.column("id").to_pylist()))
        prompts = {tuple(r["chosen"][: r["prompt_len"]]) for r in val.to_pylist()}
        assert len(val) == 2 * len(prompts)  # both pairs of each val prompt are in val
    assert ids[0] == ids[1] and 4 <= len(ids[0]) <= 40


def test_demo_pairs_take_the_rejected_answer_from_another_topic(store, tokenizer_ref):
    rows = list(demo.preference_rows(seed=0))
    topics_of = demo.topic_of_answer()
    assert 2000 <= len(rows) <= 2300
    for location, row in rows:
        topic = location.split("english/")[1].split(".yml")[0]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert topic in topics_of[chosen] and rejected != chosen
        assert topics_of[rejected] - {topic}, f"{location}: the rejected answer must come from another topic"
        assert row["prompt"][-1]["role"] == "user"
    assert rows == list(demo.preference_rows(seed=0))
    other_seed = list(demo.preference_rows(seed=1))
    assert sum(a[1]["rejected"] != b[1]["rejected"] for a, b in zip(rows, other_seed)) > 0.9 * len(rows)
    outcome = run_stage(store, PREFERENCE, config(builtin="chatterbot", val_fraction=0.05), [tokenizer_ref])
    assert sum(outcome.stats["pairs"].values()) + outcome.stats["too_long_dropped"] == len(rows)
    assert outcome.stats["pairs"]["val"] > 0 and outcome.stats["skipped"] == {}


def test_a_conversation_source_is_refused_with_a_pointer(store, tokenizer_ref, tmp_path):
    with pytest.raises(ChatDataError, match="belong under sft_data.sources"):
        run_stage(store, PREFERENCE, config({"paths": [write_jsonl(tmp_path / "m.jsonl", [{}])], "format": "messages"}), [tokenizer_ref])
