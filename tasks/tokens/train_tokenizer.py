"""Stage `train_tokenizer`: a byte-level BPE tokenizer trained on a sample of the corpus.

Writes, under the stage version:

- ``tokenizer.json``: Hugging Face ``tokenizers`` format. Load it with
  ``tokenizers.Tokenizer.from_file`` or ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
- ``special_tokens.json``: role -> id, e.g. ``{"bos": 0, "eos": 1, "pad": 2, "assistant": 3, ...}``.
- ``tokenizer_config.json``: the token texts for ``transformers`` (so the directory of these
  files loads with ``AutoTokenizer.from_pretrained``).
- ``chat_template.jinja``: the chat template (model/chat.py) in these token texts, which
  ``AutoTokenizer.from_pretrained`` picks up; written when every chat role has a token.

The sample is every document whose id hashes (with ``sample_seed``) below ``sample_fraction``,
in input order, until ``sample_max_chars`` characters; the same input gives the same sample and
the trainer is deterministic, so the same input gives a byte-identical tokenizer.json. Special
tokens take the first ids (bos, eos, pad, then the other roles by name), then the 256 bytes,
then merges.
Encoding never adds special tokens by itself: the tokenize stage places BOS/EOS explicitly.

With ``tokenizer.path`` set, that tokenizer.json is used instead (its content is part of the
stage version); configured special tokens it lacks are added to it.

Run alone: ``lmf run --until train_tokenizer``.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Iterator

import fsspec
from pydantic import BaseModel
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmfoundry.infra.files import InputError
from lmfoundry.infra.config import ComputeConfig, TokenizerConfig
from lmfoundry.infra.docs import DATA_PREFIX
from lmfoundry.infra.store import StageDir, StageRef, Store
from lmfoundry.model.chat import CHAT_SPECIALS, chat_template

CODE_VERSION = "2"  # 2: chat_template.jinja
log = logging.getLogger("lmfoundry.tokenizer")

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
STAGE_NAME = "train_tokenizer"
# bytes per token is measured on at most this much of the sample (a quality number for the manifest)
EVAL_CHARS = 1_000_000


class TokenizerInputError(InputError):
    """The stage has nothing to train on, or the given tokenizer file is unusable."""


class TokenizerStats(BaseModel):
    origin: str  # "trained" or the path of the given tokenizer.json
    vocab_size: int
    special_tokens: dict[str, int]
    added_special_tokens: list[str]
    docs_in: int
    docs_sampled: int
    chars_sampled: int
    skipped: dict[str, int]
    bytes_per_token: float | None  # UTF-8 bytes per token on (up to EVAL_CHARS of) the sample


# ---------------------------------------------------------------- building blocks


def in_sample(doc_id: str, fraction: float, seed: int) -> bool:
    """A stable pseudo-random choice of a document by its id."""
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def normalizer_for(mode: str):
    return {"none": None, "nfc": normalizers.NFC(), "nfkc": normalizers.NFKC()}[mode]


def empty_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """An untrained byte-level BPE pipeline: normaliser, GPT-2 style pre-tokenisation, byte decoder."""
    tokenizer = Tokenizer(models.BPE())
    normalizer = normalizer_for(cfg.normalization)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    # no prefix space: decode(encode(text)) gives text back exactly
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def special_added_tokens(texts: list[str]) -> list[AddedToken]:
    # normalized=False: the normaliser must never rewrite a special token's text
    return [AddedToken(t, special=True, normalized=False) for t in texts]


def special_token_texts(cfg: TokenizerConfig) -> list[str]:
    """bos, eos, pad, then the other roles by name: ids never depend on the order of keys in YAML
    (the stage version does not either, since config identity is hashed with sorted keys)."""
    others = sorted(role for role in cfg.special_tokens if role not in ("bos", "eos", "pad"))
    return [cfg.special_tokens[role] for role in ("bos", "eos", "pad", *others)]


def bpe_trainer(cfg: TokenizerConfig) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        show_progress=False,
        special_tokens=special_added_tokens(special_token_texts(cfg)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=cfg.max_token_chars,
    )


def sample_texts(cfg: TokenizerConfig, store: Store, inputs: list[StageRef], counts: Counter) -> Iterator[list[str]]:
    """Batches of sampled document texts, in input order; counts docs and skips as it goes."""
    budget = cfg.sample_max_chars
    for ref in inputs:
        reader = store.reader(ref)
        for relpath in reader.files(DATA_PREFIX, ".parquet"):
            table = reader.read_table(relpath, columns=["id", "text"])
            batch: list[str] = []
            for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
                counts["docs_in"] += 1
                if not isinstance(text, str) or not text:
                    counts["skip:empty_or_missing_text"] += 1
                    continue
                if doc_id is None:
                    counts["skip:missing_id"] += 1
                    continue
                if not in_sample(doc_id, cfg.sample_fraction, cfg.sample_seed):
                    continue
                text = text[:budget]
                budget -= len(text)
                counts["docs_sampled"] += 1
                counts["chars_sampled"] += len(text)
                batch.append(text)
                if len(batch) >= cfg.batch_docs:
                    yield batch
                    batch = []
                if budget <= 0:
                    break
            if batch:
                yield batch
            if budget <= 0:
                return


def train(cfg: TokenizerConfig, store: Store, inputs: list[StageRef], counts: Counter) -> Tokenizer:
    """A new tokenizer trained on the configured sample of the input documents."""
    if not inputs:
        raise TokenizerInputError(
            "train_tokenizer has no document input (is every upstream stage disabled?); "
            "enable an upstream stage or set tokenizer.path to an existing tokenizer.json"
        )
    tokenizer = empty_tokenizer(cfg)
    tokenizer.train_from_iterator(sample_texts(cfg, store, inputs, counts), trainer=bpe_trainer(cfg))
    if counts["docs_sampled"] == 0:
        raise TokenizerInputError(
            f"train_tokenizer found no usable document in {[f'{r.stage}/{r.version}' for r in inputs]} "
            f"(sample_fraction={cfg.sample_fraction}); raise tokenizer.sample_fraction or check the upstream stages"
        )
    return tokenizer


def load_given(cfg: TokenizerConfig) -> tuple[Tokenizer, list[str]]:
    """The configured tokenizer.json plus the configured special tokens it lacked."""
    try:
        with fsspec.open(cfg.path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerInputError(f"tokenizer.path '{cfg.path}' cannot be read: {exc}; fix the path or unset it to train one") from exc
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers reports a malformed file as a plain Exception
        raise TokenizerInputError(f"tokenizer.path '{cfg.path}' is not a tokenizer.json in Hugging Face tokenizers format: {exc}") from exc
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [t for t in dict.fromkeys(special_token_texts(cfg)) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(special_added_tokens(missing))
        log.warning("tokenizer %s lacked the special tokens %s: added them", cfg.path, missing)
    return tokenizer, missing


def special_token_ids(tokenizer: Tokenizer, cfg: TokenizerConfig) -> dict[str, int]:
    ids = {role: tokenizer.token_to_id(text) for role, text in cfg.special_tokens.items()}
    absent = [role for role, i in ids.items() if i is None]
    if absent:
        raise TokenizerInputError(f"the tokenizer has no id for the special tokens of roles {absent}")
    return ids


def transformers_config(cfg: TokenizerConfig) -> dict:
    roles = cfg.special_tokens
    chat = [text for role, text in roles.items() if role not in ("bos", "eos", "pad")]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": roles["bos"],
        "eos_token": roles["eos"],
        "pad_token": roles["pad"],
        "additional_special_tokens": chat,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float | None:
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    return round(sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / n_tokens, 4) if n_tokens else None


def eval_sample(cfg: TokenizerConfig, store: Store, inputs: list[StageRef]) -> list[str]:
    texts, chars = [], 0
    for batch in sample_texts(cfg.model_copy(update={"sample_max_chars": EVAL_CHARS}), store, inputs, Counter()):
        texts.extend(batch)
        chars += sum(map(len, batch))
        if chars >= EVAL_CHARS:
            break
    return texts


# ---------------------------------------------------------------- the stage


def input_fingerprint(cfg: TokenizerConfig) -> str:
    """A given tokenizer.json is an input: its content is part of the stage version."""
    if cfg.path is None:
        return ""
    try:
        with fsspec.open(cfg.path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError as exc:
        raise TokenizerInputError(f"tokenizer.path '{cfg.path}' cannot be read: {exc}; fix the path or unset it to train one") from exc


def run_train_tokenizer(cfg: TokenizerConfig, inputs: list[StageRef], out: StageDir, compute: ComputeConfig = ComputeConfig()) -> TokenizerStats:
    counts: Counter = Counter()
    if cfg.path is not None:
        tokenizer, added = load_given(cfg)
        origin = cfg.path
    else:
        tokenizer, added = train(cfg, out.store, inputs, counts), []
        origin = "trained"
    ids = special_token_ids(tokenizer, cfg)
    out.write_bytes(TOKENIZER_FILE, tokenizer.to_str(pretty=True).encode("utf-8"))
    out.write_json(SPECIAL_TOKENS_FILE, ids)
    out.write_json(TOKENIZER_CONFIG_FILE, transformers_config(cfg))
    if all(role in cfg.special_tokens for role in CHAT_SPECIALS):
        out.write_bytes(CHAT_TEMPLATE_FILE, chat_template(cfg.special_tokens).encode("utf-8"))
    sample = eval_sample(cfg, out.store, inputs) if inputs else []
    return TokenizerStats(
        origin=origin,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        special_tokens=ids,
        added_special_tokens=added,
        docs_in=counts["docs_in"],
        docs_sampled=counts["docs_sampled"],
        chars_sampled=counts["chars_sampled"],
        skipped={k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("skip:")},
        bytes_per_token=bytes_per_token(tokenizer, sample) if sample else None,
    )


def load_tokenizer(store: Store, ref: StageRef) -> tuple[Tokenizer, dict[str, int]]:
    """The tokenizer and its role -> id map from a committed train_tokenizer stage."""
    reader = store.reader(ref)
    return Tokenizer.from_str(reader.read_bytes(TOKENIZER_FILE).decode("utf-8")), reader.read_json(SPECIAL_TOKENS_FILE)
