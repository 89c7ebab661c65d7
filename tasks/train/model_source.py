"""Find a trained model from what a person names: a stage, a stage version, or a directory.

    from lmfoundry.tasks.train.model_source import find_model
    source = find_model("sft", store, pipeline="demo")   # the pipeline's current sft version
    source = find_model("sft@1a2b3c4d5e6f7a8b", store)     # one version (also sft/1a2b...)
    source = find_model("./store/stages/sft/1a2b3c4d5e6f7a8b", store)   # a stage directory
    source = find_model("some/dir", store)                 # model.safetensors + model_config.json
    model, codec = source.load(), source.codec()            # Transformer; text <-> ids, chat template

A training stage (pretrain, sft, dpo, ppo) keeps its final weights in ``model/``
(model.safetensors, model_config.json) and its Hugging Face export in ``hf/``; the tokenizer
is the ``train_tokenizer`` stage's, found by following the stage's inputs in its manifest
(tokenizer.json and special_tokens.json). A directory outside a store brings its own
tokenizer.json (beside the weights, in its parent, or in a sibling ``hf/``); without a
special_tokens.json the roles are read from the tokenizer's ``<|role|>`` tokens.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lmfoundry.infra.files import InputError
from lmfoundry.infra.store import StageRef, Store
from lmfoundry.model.chat import CHAT_SPECIALS, Message, content_encoder, prompt_ids
from lmfoundry.model.transformer import CONFIG, WEIGHTS

TOKENIZER_FILE = "tokenizer.json"  # the train_tokenizer stage's files
SPECIAL_TOKENS_FILE = "special_tokens.json"
REWARD_FILE = "reward.json"  # model/heads.py: marks a reward model
ROLES = ("bos", "eos", "pad", *CHAT_SPECIALS[1:])
STAGE_SPEC = re.compile(r"^(?P<stage>[A-Za-z_][A-Za-z0-9_]*)(?:[@/](?P<version>[0-9a-f]{6,64}))?$")


class ModelSourceError(InputError):
    """--model names nothing that holds a generating model; the message says what to pass."""


@dataclass(frozen=True)
class ModelSource:
    model_dir: Path  # model.safetensors + model_config.json
    tokenizer_json: Path | None
    special: dict[str, int] = field(default_factory=dict)  # role -> token id
    max_len: int | None = None  # the sequence length it was trained at, when known
    origin: str = ""  # where it came from, for messages

    def load(self, device: str = "cpu"):
        """The Transformer in eval mode, fp32, on ``device``."""
        from lmfoundry.model.transformer import load_model

        return load_model(self.model_dir).to(device).eval()

    def codec(self) -> "TextCodec":
        if self.tokenizer_json is None:
            raise ModelSourceError(f"{self.origin} has no tokenizer: put tokenizer.json (and special_tokens.json) beside model.safetensors")
        return TextCodec(self.tokenizer_json, self.special, self.origin)


class TextCodec:
    """Text <-> ids for a model: content encoded as plain text (special-token text stays text),
    the chat template of model/chat.py, decoding without special tokens."""

    def __init__(self, tokenizer_json: Path, special: dict[str, int], origin: str = ""):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.encode_special_tokens = True  # typed "<|user|>" must not become the special token
        self.special, self.origin = dict(special), origin
        texts = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.encode = content_encoder(lambda text: self.tokenizer.encode(text, add_special_tokens=False).ids, texts)

    def require(self, *roles: str) -> None:
        missing = [role for role in roles if role not in self.special]
        if missing:
            raise ModelSourceError(f"the tokenizer of {self.origin} has no special tokens for the roles {missing}")

    @property
    def pad_id(self) -> int:
        return self.special.get("pad", 0)

    @property
    def stop_ids(self) -> set[int]:
        """<|end|> closes an assistant turn; <|eos|> ends a document."""
        return {self.special[role] for role in ("end", "eos") if role in self.special}

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        self.require(*CHAT_SPECIALS)
        return prompt_ids(messages, self.encode, self.special)

    def raw_prompt(self, text: str) -> list[int]:
        """<|bos|> then the text: what a pretrained model continues."""
        return [self.special["bos"], *self.encode(text)] if "bos" in self.special else self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def find_model(spec: str, store: Store | None = None, pipeline: str | None = None) -> ModelSource:
    """A ModelSource for --model ``spec`` (see the module docstring); a clear error otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return from_directory(path)
    match = STAGE_SPEC.match(spec)
    if match is None or store is None:
        raise ModelSourceError(f"--model {spec}: no such directory, and not a stage name (e.g. sft, or sft@VERSION)")
    stage, version = match["stage"], match["version"]
    if version is None:
        version = store.get_ref(pipeline or "", stage)
        if version is None:
            raise ModelSourceError(
                f"--model {spec}: pipeline '{pipeline}' has no committed '{stage}' in {store.url}; "
                f"run `lmf run --until {stage}` first, or pass a stage version or a directory"
            )
    if store.manifest(stage, version) is None:
        raise ModelSourceError(f"--model {spec}: stage '{stage}' has no committed version {version} in {store.url} (see `lmf status`)")
    return from_stage(store, store.ref(stage, version))


def from_stage(store: Store, ref: StageRef) -> ModelSource:
    """The final weights of a committed training stage, with the tokenizer its inputs lead to."""
    reader = store.reader(ref)
    files = reader.manifest["files"]
    origin = f"{ref.stage}@{ref.version} in {store.url}"
    if f"model/{REWARD_FILE}" in files:
        raise ModelSourceError(f"{origin} is a reward model: it scores text and cannot generate; pass a policy stage (pretrain, sft, dpo, ppo)")
    if f"model/{CONFIG}" not in files or f"model/{WEIGHTS}" not in files:
        raise ModelSourceError(f"{origin} holds no model/{WEIGHTS} and model/{CONFIG}: pass a training stage (pretrain, sft, dpo, ppo)")
    model_dir = Path(reader.local_path(f"model/{CONFIG}")).parent
    for name in reader.files("model/"):
        reader.local_path(name)  # S3: every file of the folder lands in the same local cache folder
    tokenizer_json, special = stage_tokenizer(store, ref)
    seq_len = (reader.manifest.get("stats") or {}).get("seq_len")
    return ModelSource(model_dir, tokenizer_json, special, int(seq_len) if seq_len else None, origin)


def stage_tokenizer(store: Store, ref: StageRef) -> tuple[Path | None, dict[str, int]]:
    """(tokenizer.json, special ids) of the first stage, breadth-first through the inputs recorded
    in the manifests, that holds a tokenizer.json; the export's hf/tokenizer.json as a fallback."""
    queue, seen = [ref], set()
    while queue:
        current = queue.pop(0)
        if (current.stage, current.version) in seen:
            continue
        seen.add((current.stage, current.version))
        reader = store.reader(current)
        if TOKENIZER_FILE in reader.manifest["files"]:
            special = reader.read_json(SPECIAL_TOKENS_FILE) if SPECIAL_TOKENS_FILE in reader.manifest["files"] else None
            path = Path(reader.local_path(TOKENIZER_FILE))
            return path, special if special is not None else special_ids_of(path)
        queue += [StageRef(**r) for r in reader.manifest.get("inputs", []) if store.manifest(r["stage"], r["version"]) is not None]
    reader = store.reader(ref)
    if f"hf/{TOKENIZER_FILE}" in reader.manifest["files"]:
        path = Path(reader.local_path(f"hf/{TOKENIZER_FILE}"))
        return path, special_ids_of(path)
    return None, {}


def from_directory(path: Path) -> ModelSource:
    """A stage directory of a local store (model/ inside, manifest.json beside), or a folder of weights."""
    if (path / "model" / CONFIG).is_file():
        manifest = path / "manifest.json"
        if manifest.is_file() and path.parent.parent.name == "stages":  # <store>/stages/<stage>/<version>
            store = Store(str(path.parent.parent.parent))
            return from_stage(store, store.ref(path.parent.name, path.name))
        path = path / "model"
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelSourceError(f"--model {path}: no {WEIGHTS} and {CONFIG} in it (nor in its model/ folder)")
    if (path / REWARD_FILE).is_file():
        raise ModelSourceError(f"--model {path} is a reward model: it scores text and cannot generate")
    tokenizer_json, special = None, {}
    for folder in (path, path.parent, path.parent / "hf"):
        if (folder / TOKENIZER_FILE).is_file():
            tokenizer_json = folder / TOKENIZER_FILE
            special_file = folder / SPECIAL_TOKENS_FILE
            special = json.loads(special_file.read_text()) if special_file.is_file() else special_ids_of(tokenizer_json)
            break
    return ModelSource(path, tokenizer_json, special, None, str(path))


def special_ids_of(tokenizer_json: Path) -> dict[str, int]:
    """role -> id for the tokenizer's ``<|role|>`` tokens (the train_tokenizer defaults)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids = {role: tokenizer.token_to_id(f"<|{role}|>") for role in ROLES}
    return {role: i for role, i in ids.items() if i is not None}
