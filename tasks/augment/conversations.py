"""Stage `augment`: new variants of the SFT training conversations (off by default).

Reads the same conversations as sft_data (its sources and builtin corpus, tasks/chat/sft_data.py's
``read_conversations``), skips those that go to the validation split (the held-out loss must
measure the original data), and writes for each remaining conversation, method and copy one
variant whose chosen roles' messages are rewritten:

- ``synonyms``: WordNet synonym replacement (tasks/augment/synonyms.py: rate, parts of speech,
  protected spans; the random stream of a variant is seeded by the seed, the source's content
  hash, the method and the copy number, so it does not depend on order or worker);
- ``backtranslation``: a round trip through two local translation models
  (tasks/augment/backtranslate.py). Greedy decoding gives the same text for every copy, so one
  variant per conversation is written whatever ``copies`` says.

Output: ``augmented.jsonl``, one variant per line: ``messages``, ``method``, ``copy``,
``source`` (the source's label), ``source_key`` (the content hash sft_data uses for its split:
the link back to the conversation it came from) and ``changed`` (words replaced, or sentences
translated messages). A variant identical to its source is not written (counted as unchanged). sft_data
adds the variants of its train conversations to the train split.

Run: set ``augment.enabled: true`` and ``lmf run --until sft_data``.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from typing import Callable

from pydantic import BaseModel

from lmfoundry.infra.config import ComputeConfig
from lmfoundry.infra.config_base import Sections
from lmfoundry.infra.store import StageDir, StageRef
from lmfoundry.tasks.chat import common
from lmfoundry.tasks.chat.sft_data import AUGMENTED_FILE, read_conversations

CODE_VERSION = "1"
SECTION = "augment"
log = logging.getLogger("lmfoundry.augment")


class AugmentStats(BaseModel):
    conversations: int  # read from the sources
    val_skipped: int  # in the val split by content hash: never augmented
    variants: dict[str, int]  # written, per method
    unchanged: dict[str, int]  # identical to the source (nothing replaceable), per method
    words_replaced: int
    messages_translated: int
    skipped_rows: dict[str, int]  # malformed source rows (sft_data.on_bad_row: skip)


Rewrite = Callable[[list[list[dict]], int, list[int]], list[tuple[list[dict], int]]]


def rewrite_messages(messages: list[dict], roles: set[str], rewrite_text: Callable[[str], tuple[str, int]]) -> tuple[list[dict], int]:
    out, changed = [], 0
    for message in messages:
        if message["role"] in roles:
            text, n = rewrite_text(message["content"])
            message, changed = {**message, "content": text}, changed + n
        out.append(message)
    return out, changed


def synonym_rewriter(cfg) -> Rewrite:
    from lmfoundry.tasks.augment.synonyms import SynonymReplacer, load_wordnet

    replacer = SynonymReplacer(load_wordnet(cfg.wordnet_dir), set(cfg.pos))

    def rewrite(conversations: list[list[dict]], copy: int, keys: list[int]) -> list[tuple[list[dict], int]]:
        out = []
        for messages, key in zip(conversations, keys):
            rng = random.Random(f"{cfg.seed}:{key}:synonyms:{copy}")
            out.append(rewrite_messages(messages, set(cfg.roles), lambda text: replacer.replace(text, cfg.synonym_rate, rng)))
        return out

    return rewrite


def backtranslation_rewriter(cfg) -> Rewrite:
    from lmfoundry.tasks.augment.backtranslate import BackTranslator

    translator = BackTranslator(cfg.backtranslation)

    def rewrite(conversations: list[list[dict]], copy: int, keys: list[int]) -> list[tuple[list[dict], int]]:
        # every chosen message of every conversation in one batched call
        chosen = [(c, m) for c, messages in enumerate(conversations) for m, msg in enumerate(messages) if msg["role"] in cfg.roles]
        texts = translator.paraphrase([conversations[c][m]["content"] for c, m in chosen])
        out = [([dict(msg) for msg in messages], 0) for messages in conversations]
        for (c, m), text in zip(chosen, texts):
            if text != out[c][0][m]["content"]:
                out[c][0][m]["content"] = text
                out[c] = (out[c][0], out[c][1] + 1)
        return out

    return rewrite


REWRITERS = {"synonyms": synonym_rewriter, "backtranslation": backtranslation_rewriter}


def run_augment(cfg: Sections, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> AugmentStats:
    aug, sft = cfg.augment, cfg.sft_data
    counts: Counter = Counter()
    bad = common.BadRows(sft.on_bad_row, "sft_data")
    items = read_conversations(sft, common.source_files(sft, "sft_data"), bad, counts)
    keys = [common.split_key(messages, sft.seed) for _, messages in items]
    # the same rule sft_data applies; it checks again, so a borderline item is never leaked to train
    is_val = common.val_flags(keys, sft.val_fraction)
    train = [(label, messages, key) for (label, messages), key, v in zip(items, keys, is_val) if not v]
    variants: Counter = Counter()
    unchanged: Counter = Counter()
    changed_total: Counter = Counter()
    lines = []
    for method in aug.methods:
        rewrite = REWRITERS[method](aug)
        copies = 1 if method == "backtranslation" else aug.copies
        for copy in range(copies):
            results = rewrite([messages for _, messages, _ in train], copy, [key for _, _, key in train])
            for (label, messages, key), (new, changed) in zip(train, results):
                if new == messages:
                    unchanged[method] += 1
                    continue
                variants[method] += 1
                changed_total[method] += changed
                lines.append(json.dumps({"messages": new, "method": method, "copy": copy, "source": label, "source_key": key, "changed": changed}))
    out.write_bytes(AUGMENTED_FILE, ("\n".join(lines) + "\n" if lines else "").encode(), rows=len(lines))
    log.info("augment: %d variants of %d train conversations (%s)", len(lines), len(train), dict(variants))
    return AugmentStats(
        conversations=len(items),
        val_skipped=sum(is_val),
        variants=dict(variants),
        unchanged=dict(unchanged),
        words_replaced=changed_total["synonyms"],
        messages_translated=changed_total["backtranslation"],
        skipped_rows=dict(sorted(bad.counts.items())),
    )


def input_fingerprint(cfg: Sections) -> str:
    """The source files' sizes and times (as sft_data's), so new data re-runs the stage."""
    return common.input_fingerprint(cfg.sft_data, "sft_data")
