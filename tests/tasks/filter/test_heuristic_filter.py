"""Each heuristic check on documents just inside and just outside its threshold, then the stage."""
from __future__ import annotations

import pytest

from lmfoundry.infra.config import HeuristicFilterConfig, PipelineConfig
from lmfoundry.infra.docs import iter_docs
from lmfoundry.infra.stage import StageSpec, run_stage
from lmfoundry.tasks.filter.rules import build_steps, judge
from tests.helpers import commit_docs, docs

SPEC = StageSpec("heuristic_filter", "lmfoundry.tasks.filter.heuristic_filter:run_heuristic_filter", section="heuristic_filter")

ALL_OFF = {
    "gopher_repetition": {
        "max_dup_para_frac": None,
        "max_dup_para_char_frac": None,
        "max_dup_line_frac": None,
        "max_dup_line_char_frac": None,
        "max_top_ngram_char_frac": {},
        "max_dup_ngram_char_frac": {},
    },
    "gopher_quality": {
        "min_words": None,
        "max_words": None,
        "min_mean_word_length": None,
        "max_mean_word_length": None,
        "max_symbol_word_ratio": None,
        "max_bullet_lines_ratio": None,
        "max_ellipsis_lines_ratio": None,
        "min_alpha_words_ratio": None,
        "min_stop_words": None,
    },
    "c4": {
        "require_terminal_punctuation": False,
        "min_words_per_line": 0,
        "max_word_length": None,
        "remove_citations": False,
        "skip_javascript_lines": False,
        "skip_policy_lines": False,
        "drop_lorem_ipsum": False,
        "drop_curly_bracket": False,
        "min_sentences": None,
    },
    "fineweb": {"min_line_punct_ratio": None, "max_short_line_ratio": None, "max_dup_line_char_ratio": None, "max_newline_word_ratio": None},
}


def only(rule_set: str, **checks) -> HeuristicFilterConfig:
    """A config where just the given checks of one rule set are on."""
    data = {name: {**fields, "enabled": name == rule_set} for name, fields in ALL_OFF.items()}
    data[rule_set].update(checks)
    return HeuristicFilterConfig.model_validate(data)


def verdict(text: str, cfg: HeuristicFilterConfig) -> str | None:
    return judge(text, build_steps(cfg))


def words(n: int, word: str = "abc") -> str:
    return " ".join([word] * n)


def lines(*parts: str) -> str:
    return "\n".join(parts)


SENTENCE = "This line has words."

# (rule set, checks switched on, text just inside the threshold, text just outside, reason)
CASES = [
    # ---- Gopher quality
    ("gopher_quality", {"min_words": 50}, words(50), words(49), "gopher_too_few_words"),
    ("gopher_quality", {"max_words": 10}, words(10), words(11), "gopher_too_many_words"),
    ("gopher_quality", {"min_words": 5}, words(5) + " . , ( )", words(4) + " . , ( ) ...", "gopher_too_few_words"),  # punctuation is not a word
    ("gopher_quality", {"min_mean_word_length": 3}, words(100), words(99) + " ab", "gopher_short_words"),  # 3.0 vs 2.99
    ("gopher_quality", {"max_mean_word_length": 10}, words(100, "a" * 10), words(99, "a" * 10) + " " + "a" * 11, "gopher_long_words"),
    ("gopher_quality", {"max_symbol_word_ratio": 0.1}, words(9) + " #", words(8) + " #", "gopher_hash_ratio"),  # 1/10 vs 1/9
    ("gopher_quality", {"max_symbol_word_ratio": 0.1}, words(9) + " …", words(8) + " …", "gopher_ellipsis_ratio"),
    ("gopher_quality", {"max_bullet_lines_ratio": 0.9}, lines(*["• item"] * 9, "plain"), lines(*["- item"] * 19, "plain"), "gopher_bullet_lines"),
    ("gopher_quality", {"max_ellipsis_lines_ratio": 0.3}, lines(*["cut..."] * 3, *["done"] * 7), lines(*["cut…"] * 4, *["done"] * 6), "gopher_ellipsis_lines"),
    ("gopher_quality", {"min_alpha_words_ratio": 0.8}, words(8) + " 12 34", words(7) + " 12 34 56", "gopher_alpha_words"),
    ("gopher_quality", {"min_stop_words": 2}, "the cat and dog", "the cat or The dog", "gopher_stop_words"),  # case matters
    # ---- Gopher repetition
    ("gopher_repetition", {"max_dup_para_frac": 0.3}, "\n\n".join(["p"] * 4 + list("abcdef")), "\n\n".join(["p"] * 5 + list("abcde")), "gopher_dup_paragraphs"),
    # one repeated 20-char paragraph in a 100- vs 99-char text
    ("gopher_repetition", {"max_dup_para_char_frac": 0.2}, "u" * 56 + ("\n\n" + "r" * 20) * 2, "u" * 55 + ("\n\n" + "r" * 20) * 2, "gopher_dup_paragraph_chars"),
    ("gopher_repetition", {"max_dup_line_frac": 0.3}, lines(*["l"] * 4, *"abcdef"), lines(*["l"] * 5, *"abcde"), "gopher_dup_lines"),
    ("gopher_repetition", {"max_dup_line_char_frac": 0.2}, "u" * 58 + ("\n" + "r" * 20) * 2, "u" * 57 + ("\n" + "r" * 20) * 2, "gopher_dup_line_chars"),
    # "ab cd" twice = 10 characters of 50 vs 49
    ("gopher_repetition", {"max_top_ngram_char_frac": {2: 0.2}}, "ab cd " + "x" * 38 + " ab cd", "ab cd " + "x" * 37 + " ab cd", "gopher_top_2gram"),
    # "a b c d e" repeated once: 5 characters of 34 vs 33
    ("gopher_repetition", {"max_dup_ngram_char_frac": {5: 0.15}}, "a b c d e a b c d e " + "x" * 14, "a b c d e a b c d e " + "x" * 13, "gopher_dup_5gram"),
    # ---- C4
    ("c4", {"min_sentences": 5}, "One apple. Two birds. Three cats! Four dogs? Five eels.", "One apple. Two birds. Three cats! Four dogs?", "c4_too_few_sentences"),
    ("c4", {"min_sentences": 5, "require_terminal_punctuation": True}, lines(*[SENTENCE] * 5), lines(*[SENTENCE] * 4, "This line has words"), "c4_too_few_sentences"),
    ("c4", {"min_sentences": 5, "require_terminal_punctuation": True}, lines(*[SENTENCE] * 5), lines(*[SENTENCE] * 4, "This line has words..."), "c4_too_few_sentences"),
    ("c4", {"min_sentences": 5, "min_words_per_line": 3}, lines(*["Three words here."] * 5), lines(*["Three words here."] * 4, "Two words."), "c4_too_few_sentences"),
    ("c4", {"min_sentences": 1, "max_word_length": 10}, "a " + "w" * 10 + " end.", "a " + "w" * 11 + " end.", "c4_too_few_sentences"),
    ("c4", {"min_sentences": 5, "skip_javascript_lines": True}, lines(*[SENTENCE] * 5, "Enable JavaScript please."), lines(*[SENTENCE] * 4, "Enable JavaScript please."), "c4_too_few_sentences"),
    ("c4", {"min_sentences": 5, "skip_policy_lines": True}, lines(*[SENTENCE] * 5, "This site uses cookies."), lines(*[SENTENCE] * 4, "This site uses cookies."), "c4_too_few_sentences"),
    ("c4", {"drop_lorem_ipsum": True}, "Lorem dolor ipsum sit.", "Lorem Ipsum dolor sit.", "c4_lorem_ipsum"),
    ("c4", {"drop_curly_bracket": True}, "call f(x) here.", "call f{x} here.", "c4_curly_bracket"),
    ("c4", {"drop_curly_bracket": True, "require_terminal_punctuation": True}, "a line with } only\nno { end", "a line with { here.", "c4_curly_bracket"),
    # ---- FineWeb
    ("fineweb", {"min_line_punct_ratio": 0.12}, lines(*["end."] * 3, *["open"] * 22), lines(*["end."] * 11, *["open"] * 89), "fineweb_line_punct"),
    ("fineweb", {"max_short_line_ratio": 0.67}, lines(*["s"] * 67, *["l" * 31] * 33), lines(*["s" * 30] * 68, *["l" * 31] * 32), "fineweb_short_lines"),
    # one repeated 1-char line among 100 vs 99 other characters
    ("fineweb", {"max_dup_line_char_ratio": 0.01}, lines("x" * 98, "r", "r"), lines("x" * 97, "r", "r"), "fineweb_dup_line_chars"),
    ("fineweb", {"max_newline_word_ratio": 0.3}, lines(words(4), words(2), words(2), words(2)), lines(words(3), words(3), words(2), words(1), words(1)), "fineweb_list_like"),
]


@pytest.mark.parametrize("rule_set,checks,inside,outside,reason", CASES, ids=[f"{c[4]}-{i}" for i, c in enumerate(CASES)])
def test_each_check_at_its_threshold(rule_set, checks, inside, outside, reason):
    cfg = only(rule_set, **checks)
    assert verdict(inside, cfg) is None
    assert verdict(outside, cfg) == reason


def test_top_3gram_fraction_is_measured_with_spaces():
    # "a b c" twice covers 10 characters (spaces between words count): 10/56 <= .18 < 10/55
    cfg = only("gopher_repetition", max_top_ngram_char_frac={3: 0.18})
    assert verdict("a b c " + "x" * 44 + " a b c", cfg) is None
    assert verdict("a b c " + "x" * 43 + " a b c", cfg) == "gopher_top_3gram"


def test_duplicated_ngrams_do_not_count_overlaps_twice():
    # the 5-gram "a a a a a" repeats at every position of a long run; counting jumps past
    # each repeat, so 10 a's hold one repeat (5 chars), not six
    cfg = only("gopher_repetition", max_dup_ngram_char_frac={5: 0.15})
    run = " ".join("a" * 10)
    assert verdict(run + " " + "x" * 15, cfg) is None  # 5 / 35
    assert verdict(run + " " + "x" * 13, cfg) == "gopher_dup_5gram"  # 5 / 33


def test_alpha_words_are_whitespace_words_as_in_the_gopher_paper():
    # 7 whitespace words, each with a letter (1.0); as 14 tokens with the punctuation split off, 7 have one (0.5)
    text = "Call join(a, b), then open(path); see: done."
    assert HeuristicFilterConfig().gopher_quality.alpha_words_counting == "gopher"
    assert verdict(text, only("gopher_quality", min_alpha_words_ratio=0.8)) is None
    datatrove = only("gopher_quality", min_alpha_words_ratio=0.8, alpha_words_counting="datatrove")
    assert verdict(text, datatrove) == "gopher_alpha_words"
    assert verdict(text, only("gopher_quality", min_alpha_words_ratio=0.5, alpha_words_counting="datatrove")) is None
    # whitespace counting still drops what has too few words with letters: 4 of 6
    assert verdict("abc abc abc abc 12 34", only("gopher_quality", min_alpha_words_ratio=0.7)) == "gopher_alpha_words"


def test_empty_text_is_dropped_first():
    assert verdict("  \n ", HeuristicFilterConfig()) == "empty"


def test_a_disabled_rule_set_never_drops():
    cfg = only("c4", drop_curly_bracket=True).model_copy(update={"c4": HeuristicFilterConfig.C4(enabled=False)})
    assert verdict("a { b", cfg) is None


PROSE = [
    "The committee met on Tuesday to review the proposal for the new library wing.",
    "Members asked whether the budget would cover the furniture, and the treasurer said that it would.",
    "After a short discussion, they agreed to vote at the next meeting and to publish the minutes online.",
    "Several neighbours have written to the board with questions about the opening hours of the reading room.",
    "We will answer them in the spring newsletter, together with a summary of every decision made this season.",
    "Volunteers who want to help with the move should sign up at the front desk before the end of the month.",
]


def test_real_prose_passes_the_default_rules():
    assert verdict("\n".join(PROSE), HeuristicFilterConfig()) is None


def test_stage_keeps_removes_counts_and_samples(store):
    good = "\n".join(PROSE)
    rows = docs(good, "too short", "", prefix="a") + [{"id": "null", "text": None}]
    ref = commit_docs(store, [rows, docs("{ curly }", good.replace("library", "museum"), prefix="b")])
    root = PipelineConfig(heuristic_filter=HeuristicFilterConfig(fineweb=HeuristicFilterConfig.FineWeb(enabled=False), samples_per_reason=1))
    outcome = run_stage(store, SPEC, root, [ref])
    kept = [d["id"] for d in iter_docs(store, [outcome.ref])]
    assert kept == ["a0", "b1"]
    stats = outcome.stats
    assert stats["docs_in"] == 6 and stats["docs_out"] == 2
    assert stats["dropped"] == {"gopher_top_2gram": 2, "empty": 1, "no_text": 1}  # short texts are all one top 2-gram
    assert stats["samples"]["gopher_top_2gram"] == [{"id": "a1", "url": "", "text": "too short"}]  # one per reason
    reader = store.reader(outcome.ref)
    removed = [row for path in reader.files("removed/") for row in reader.read_table(path).to_pylist()]
    assert sorted((r["id"], r["reason"]) for r in removed) == [("a1", "gopher_top_2gram"), ("a2", "empty"), ("b0", "gopher_top_2gram"), ("null", "no_text")]
    assert reader.manifest["stats"]["dropped"]["empty"] == 1
    again = run_stage(store, SPEC, root, [ref])
    assert again.status == "skipped" and again.ref == outcome.ref
