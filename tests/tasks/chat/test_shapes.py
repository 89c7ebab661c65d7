"""Row shapes -> validated messages and pairs; each rule names its reason and field."""
from __future__ import annotations

import pytest

from lmfoundry.tasks.chat.readers import BadRow
from lmfoundry.tasks.chat.shapes import Pair, parse_conversation, parse_pair


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def reason_and_field(parse, obj, fmt="auto"):
    with pytest.raises(BadRow) as info:
        parse(obj, fmt)
    return info.value.reason, info.value.field


def test_conversation_shapes_and_sharegpt_speakers():
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert parse_conversation(sharegpt) == [{"role": "system", "content": "s"}, user("q"), bot("a")]
    assert parse_conversation({"instruction": "i", "input": "x", "output": "o"}) == [user("i\n\nx"), bot("o")]
    assert parse_conversation({"prompt": "p", "completion": "c", "system": "s"}) == [{"role": "system", "content": "s"}, user("p"), bot("c")]
    # content is kept verbatim (no stripping) when it is not blank
    assert parse_conversation({"messages": [user(" q\n"), bot("a ")]}) == [user(" q\n"), bot("a ")]


@pytest.mark.parametrize(
    "obj, fmt, expected",
    [
        ([1, 2], "auto", ("unknown_shape", None)),
        ({"text": "x"}, "auto", ("unknown_shape", None)),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "auto", ("unknown_shape", None)),
        ({"text": "x"}, "instruction", ("missing_field", "instruction")),
        ({"messages": "hi"}, "auto", ("bad_type", "messages")),
        ({"messages": []}, "auto", ("empty_content", "messages")),
        ({"messages": [user("q"), "a"]}, "auto", ("bad_type", "messages[1]")),
        ({"messages": [user("q"), {"role": "tool", "content": "a"}]}, "auto", ("bad_role", "messages[1].role")),
        ({"conversations": [{"from": "robot", "value": "a"}]}, "auto", ("bad_role", "conversations[0].from")),
        ({"messages": [user("q"), {"role": "assistant", "content": None}]}, "auto", ("missing_field", "messages[1].content")),
        ({"messages": [user("q"), {"role": "assistant", "content": [{"type": "text"}]}]}, "auto", ("bad_type", "messages[1].content")),
        ({"messages": [user("q"), bot("\n ")]}, "auto", ("empty_content", "messages[1].content")),
        ({"messages": [bot("a"), user("q")]}, "auto", ("roles_out_of_order", "messages[0].role")),
        ({"messages": [user("q"), bot("a"), bot("b")]}, "auto", ("roles_out_of_order", "messages[2].role")),
        ({"messages": [user("q")]}, "auto", ("no_assistant_turn", "messages")),
        ({"instruction": "i", "input": 3, "output": "o"}, "auto", ("bad_type", "input")),
    ],
)
def test_conversation_rules_name_reason_and_field(obj, fmt, expected):
    assert reason_and_field(parse_conversation, obj, fmt) == expected


def test_preference_shapes():
    # strings (TRL's explicit prompt)
    assert parse_pair({"prompt": "q", "chosen": "good", "rejected": "bad"}) == Pair([user("q")], "good", "bad")
    # UltraFeedback-binarized: prompt string, full message lists
    uf = {"prompt": "q", "chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")], "score_chosen": 9.0}
    assert parse_pair(uf) == Pair([user("q")], "good", "bad")
    # implicit prompt: the shared earlier messages
    multi = [{"role": "system", "content": "s"}, user("q1"), bot("a1"), user("q2")]
    assert parse_pair({"chosen": [*multi, bot("good")], "rejected": [*multi, bot("bad")]}) == Pair(multi, "good", "bad")
    # TRL conversational: prompt list, replies as one-message lists
    assert parse_pair({"prompt": [user("q")], "chosen": [bot("g")], "rejected": [bot("b")]}) == Pair([user("q")], "g", "b")


def test_hh_rlhf_transcripts_split_at_the_last_shared_assistant_marker():
    shared = "\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?\n\nAssistant:"
    pair = parse_pair({"chosen": shared + " Six.", "rejected": shared + " Sixty, I think."})
    assert pair == Pair([user("What is 2+2?"), bot("Four."), user("And 3+3?")], "Six.", "Sixty, I think.")
    # the replies share a prefix ("S"): the cut is still at the marker, not inside the reply
    assert parse_pair({"chosen": "\n\nHuman: hi\n\nAssistant: Sure", "rejected": "\n\nHuman: hi\n\nAssistant: Sorry"}).chosen == "Sure"
    # transcripts that differ before the last turn cannot be split into one prompt
    early = {"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y", "rejected": "\n\nHuman: a\n\nAssistant: z\n\nHuman: b\n\nAssistant: y"}
    assert reason_and_field(parse_pair, early) == ("bad_transcript", "chosen")
    assert reason_and_field(parse_pair, {"chosen": "Human: a", "rejected": "Human: b"}) == ("bad_transcript", "chosen")


@pytest.mark.parametrize(
    "obj, expected",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, ("identical_pair", "rejected")),
        ({"prompt": "q", "chosen": [user("other"), bot("g")], "rejected": "b"}, ("prompt_mismatch", "chosen")),
        ({"chosen": [user("q"), bot("g")], "rejected": [user("r"), bot("b")]}, ("prompt_mismatch", "rejected")),
        ({"chosen": [bot("g")], "rejected": [bot("b")]}, ("missing_field", "prompt")),
        ({"prompt": "q", "chosen": [user("q"), user("g")], "rejected": "b"}, ("no_assistant_turn", "chosen[1].role")),
        ({"prompt": [user("q"), bot("a")], "chosen": "g", "rejected": "b"}, ("roles_out_of_order", "prompt")),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, ("empty_content", "chosen")),
        ({"messages": [user("q"), bot("a")]}, ("unknown_shape", None)),
    ],
)
def test_preference_rules_name_reason_and_field(obj, expected):
    assert reason_and_field(parse_pair, obj) == expected
