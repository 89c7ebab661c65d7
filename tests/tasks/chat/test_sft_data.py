"""Stage `sft_data`: every input shape lands as the template's tokens and mask; exact packing;
over-length handling; malformed rows; stable val split; s3:// input."""
from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmfoundry.infra.config import PipelineConfig
from lmfoundry.infra.stage import run_stage
from lmfoundry.tasks.chat import demo
from lmfoundry.tasks.chat.readers import ChatDataError
from tests.tasks.chat.conftest import SFT, expected_conversation, plain_encoder, read_split, segments


def config(*sources: dict, **section) -> PipelineConfig:
    return PipelineConfig.model_validate({"sft_data": {"sources": list(sources), "val_fraction": 0.0, **section}})


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_every_shape_becomes_the_template_tokens_and_mask(store, tokenizer_ref, tmp_path):
    encode, special, _ = plain_encoder(store, tokenizer_ref)
    rows = [
        {"messages": [{"role": "system", "content": "Be brief.\nVery."}, user("Größe? 日本 😀"), bot("Straße.\n\nyes"), user("more"), bot("done")]},
        {"conversations": [{"from": "human", "value": "hi <|user|> there"}, {"from": "gpt", "value": "hello <|end|>"}]},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "You help."},
        {"prompt": "Capital of France?", "response": "Paris."},
        {"prompt": [user("one")], "completion": [bot("two")]},
    ]
    expected_messages = [
        rows[0]["messages"],
        [user("hi <|user|> there"), bot("hello <|end|>")],
        [user("Add the numbers.\n\n2 and 3"), bot("5")],
        [{"role": "system", "content": "You help."}, user("Name a colour."), bot("Blue.")],
        [user("Capital of France?"), bot("Paris.")],
        [user("one"), bot("two")],
    ]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.table({"messages": [[user("from parquet"), bot("ok")]]}), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "From an array", "output": "fine"}]))
    expected_messages += [[user("from parquet"), bot("ok")], [user("From an array"), bot("fine")]]
    cfg = config({"paths": [jsonl]}, {"paths": [str(tmp_path / "b.parquet")]}, {"paths": [str(tmp_path / "c.json")], "format": "instruction"}, seq_len=1024)
    outcome = run_stage(store, SFT, cfg, [tokenizer_ref])
    got = segments(read_split(store, outcome.ref, "train"), special["pad"])
    # each user-typed "<|user|>" / "<|end|>" is text: one token per character here
    assert got == [expected_conversation(m, encode, special) for m in expected_messages]
    assert outcome.stats["conversations"] == {"train": 8, "val": 0} and outcome.stats["files"] == 3
    index = store.reader(outcome.ref).read_json("index.json")
    assert {k: index[k] for k in ("format", "seq_len", "pad_id", "eos_id", "bos_id", "end_id", "packing", "conversations")} == {
        "format": "sft", "seq_len": 1024, "pad_id": special["pad"], "eos_id": special["eos"], "bos_id": special["bos"],
        "end_id": special["end"], "packing": "reset_positions", "conversations": 8,
    }
    assert index["assistant_tokens"] == sum(sum(mask) for _, mask in got) == outcome.stats["assistant_tokens"]["train"]
    assert index["vocab_size"] == 264 and index["splits"]["val"] == []


def test_packing_is_first_fit_whole_conversations_with_positions_reset(store, tokenizer_ref, tmp_path):
    encode, special, _ = plain_encoder(store, tokenizer_ref)
    b, u, a, e, p = (special[r] for r in ("bos", "user", "assistant", "end", "pad"))
    t = {ch: encode(ch)[0] for ch in "abcdqrsxyz"}
    conversations = [
        [user("ab"), bot("cd")],  # 9 tokens -> row 0
        [user("x"), bot("yz")],  # 8 tokens: no room left in row 0 (7) -> row 1
        [user("q"), bot("r")],  # 7 tokens: fits row 0 exactly (first fit goes back to an earlier row)
        [user("s"), bot("a")],  # 7 tokens -> row 1, leaving one pad
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in conversations])
    outcome = run_stage(store, SFT, config({"paths": [path]}, seq_len=15), [tokenizer_ref])
    table = read_split(store, outcome.ref, "train")
    assert table.schema.field("tokens").type == pa.list_(pa.uint32(), 16)
    assert table.schema.field("loss_mask").type == pa.list_(pa.uint8(), 16)
    assert table.schema.field("positions").type == pa.list_(pa.uint16(), 16)
    assert table.column("tokens").to_pylist() == [
        [b, u, t["a"], t["b"], e, a, t["c"], t["d"], e, b, u, t["q"], e, a, t["r"], e],
        [b, u, t["x"], e, a, t["y"], t["z"], e, b, u, t["s"], e, a, t["a"], e, p],
    ]
    assert table.column("positions").to_pylist() == [
        [*range(9), *range(7)],
        [*range(8), *range(7), 0],  # the pad tail starts its own segment
    ]
    assert table.column("loss_mask").to_pylist() == [
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0],
    ]
    stats = outcome.stats
    assert stats["samples"] == {"train": 2, "val": 0} and stats["tokens"]["train"] == 31
    assert stats["fill"] == pytest.approx(31 / 32) and stats["assistant_fraction"] == pytest.approx(10 / 32)


def test_over_length_conversations_are_cut_at_a_turn_boundary_or_dropped(store, tokenizer_ref, tmp_path):
    encode, special, _ = plain_encoder(store, tokenizer_ref)
    keep_two = [user("ab"), bot("cd"), user("ef"), bot("ghijk")]  # 20 tokens > 16: keep the first 9
    drop = [user("a"), bot("bcdefghijklmno")]  # its only assistant turn does not fit
    trailing = [user("ab"), bot("cd"), user("no reply")]  # the last user turn teaches nothing
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": m} for m in (keep_two, drop, trailing)])
    outcome = run_stage(store, SFT, config({"paths": [path]}, seq_len=15), [tokenizer_ref])
    got = segments(read_split(store, outcome.ref, "train"), special["pad"])
    assert got == [expected_conversation(keep_two[:2], encode, special), expected_conversation(trailing[:2], encode, special)]
    s = outcome.stats
    assert (s["too_long_truncated"], s["too_long_dropped"], s["trailing_turns_dropped"]) == (1, 1, 1)
    # never a cut inside a turn: every kept segment ends with <|end|>
    assert all(ids[-1] == special["end"] for ids, _ in got)


def test_malformed_rows_name_file_line_and_field_or_are_counted_by_reason(store, tokenizer_ref, tmp_path):
    good = {"messages": [user("hi"), bot("hello")]}
    rows = [
        good,
        "{not json",
        {"messages": [user("hi"), {"role": "bot", "content": "x"}]},
        {"messages": [user("hi"), bot("   ")]},
        {"messages": [user("hi"), user("again"), bot("x")]},
        {"messages": [user("only a question")]},
        {"text": "pretraining text"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "system", "content": "s"}, user("hi"), bot("ok"), {"role": "system", "content": "late"}, user("x"), bot("y")]},
        {"instruction": "do it", "output": 5},
        good,
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ChatDataError, match=r"rows\.jsonl:2: .*not JSON.*on_bad_row: skip"):
        run_stage(store, SFT, config({"paths": [path]}), [tokenizer_ref])
    path = write_jsonl(tmp_path / "rows2.jsonl", [good, rows[2]])
    with pytest.raises(ChatDataError, match=r"rows2\.jsonl:2: field messages\[1\]\.role: is 'bot'.*\[bad_role\]"):
        run_stage(store, SFT, config({"paths": [path]}), [tokenizer_ref])
    pq.write_table(pa.table({"messages": [[user("a"), bot("b")], [user("a"), user("b")]]}), tmp_path / "p.parquet")
    with pytest.raises(ChatDataError, match=r"p\.parquet:row 1: field messages\[1\]\.role: .*\[roles_out_of_order\]"):
        run_stage(store, SFT, config({"paths": [str(tmp_path / "p.parquet")]}), [tokenizer_ref])
    outcome = run_stage(store, SFT, config({"paths": [str(tmp_path / "rows.jsonl")]}, on_bad_row="skip"), [tokenizer_ref])
    assert outcome.stats["skipped"] == {
        "bad_role": 1, "bad_type": 1, "empty_content": 1, "invalid_json": 1, "no_assistant_turn": 1, "roles_out_of_order": 2, "unknown_shape": 2,
    }
    assert outcome.stats["rows_in"] == 11 and outcome.stats["conversations"]["train"] == 2
    assert outcome.stats["skipped_examples"]["bad_type"].endswith("rows.jsonl:10: field output: is a int, expected a string [bad_type]")


def test_val_split_is_a_stable_hash_of_content_whatever_the_order(store, tokenizer_ref, tmp_path):
    _, special, _ = plain_encoder(store, tokenizer_ref)
    rows = [{"messages": [user(f"question {i}"), bot(f"answer {i * 7}")]} for i in range(60)]
    val_sets = []
    for name, order in (("fwd", rows), ("rev", rows[::-1])):
        path = write_jsonl(tmp_path / f"{name}.jsonl", order)
        outcome = run_stage(store, SFT, config({"paths": [path]}, val_fraction=0.2), [tokenizer_ref])
        val = {tuple(ids) for ids, _ in segments(read_split(store, outcome.ref, "val"), special["pad"])}
        train = {tuple(ids) for ids, _ in segments(read_split(store, outcome.ref, "train"), special["pad"])}
        assert len(val) + len(train) == 60 and not val & train
        val_sets.append(val)
    assert val_sets[0] == val_sets[1] and 3 <= len(val_sets[0]) <= 25
    # with >= 20 conversations, val is never empty
    path = write_jsonl(tmp_path / "tiny.jsonl", rows[:20])
    outcome = run_stage(store, SFT, config({"paths": [path]}, val_fraction=1e-9), [tokenizer_ref])
    assert outcome.stats["conversations"] == {"train": 19, "val": 1}


def test_s3_input_and_the_version_follows_the_files(store, tokenizer_ref, s3_endpoint):
    import boto3
    import s3fs

    bucket = f"chat-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "skip_instance_cache": True}
    fs = s3fs.S3FileSystem(**options)
    encode, special, _ = plain_encoder(store, tokenizer_ref)
    messages = [user("from s3"), bot("yes")]
    fs.pipe(f"{bucket}/chat/part-0.jsonl", (json.dumps({"messages": messages}) + "\n").encode())
    cfg = config({"paths": [f"s3://{bucket}/chat/*.jsonl"], "storage_options": options})
    first = run_stage(store, SFT, cfg, [tokenizer_ref])
    assert segments(read_split(store, first.ref, "train"), special["pad"]) == [expected_conversation(messages, encode, special)]
    assert run_stage(store, SFT, cfg, [tokenizer_ref]).status == "skipped"
    fs.pipe(f"{bucket}/chat/part-1.jsonl", (json.dumps({"prompt": "more", "response": "data"}) + "\n").encode())
    second = run_stage(store, SFT, cfg, [tokenizer_ref])
    assert second.status == "ran" and second.ref.version != first.ref.version and second.stats["conversations"]["train"] == 2


def test_demo_corpus_builds_about_two_thousand_conversations(store, tokenizer_ref):
    convs = demo.conversations()
    assert 1900 <= len(convs) <= 2100 and len({c.topic for c in convs}) == 21
    outcome = run_stage(store, SFT, config(builtin="chatterbot", val_fraction=0.05), [tokenizer_ref])
    s = outcome.stats
    assert s["rows_in"] == len(convs) and s["skipped"] == {}
    assert sum(s["conversations"].values()) + s["too_long_dropped"] == len(convs) and s["conversations"]["val"] > 0
    assert s["fill"] > 0.9


def test_no_input_and_a_missing_path_say_what_to_do(store, tokenizer_ref, tmp_path):
    with pytest.raises(ChatDataError, match="sft_data.builtin: chatterbot"):
        run_stage(store, SFT, config(), [tokenizer_ref])
    with pytest.raises(ChatDataError, match=r"sft_data.sources\[0\].paths\[0\] .* matched no files"):
        run_stage(store, SFT, config({"paths": [str(tmp_path / "missing*.jsonl")]}), [tokenizer_ref])
