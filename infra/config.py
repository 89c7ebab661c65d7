"""The one configuration tree of lmfoundry.

Every stage receives only its own section. Sections are frozen pydantic models with
``extra="forbid"`` so a typo in YAML or in ``--set`` fails before anything runs.

Fields that only change *how* a stage runs (worker counts, batch sizes, progress bars)
are marked with ``execution()``; they are left out of the stage identity, so changing
them never invalidates committed artifacts. Every other field is identity.

Load a preset with ``load_config("configs/demo.yaml", overrides=["dedup.threshold=0.85"])``.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EXECUTION_KEY = "execution"


def execution(default: Any, **kwargs: Any) -> Any:
    """A field that changes how a stage runs but not what it produces."""
    return Field(default, json_schema_extra={EXECUTION_KEY: True}, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def identity(self) -> dict[str, Any]:
        """The fields that define what this section produces (execution knobs removed)."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get(EXECUTION_KEY):
                continue
            value = getattr(self, name)
            out[name] = value.identity() if isinstance(value, Section) else _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.identity()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- store / compute


class StoreConfig(Section):
    url: str = Field(".lmf/store", description="fsspec URL of the artifact store: a local path or s3://bucket/prefix")
    pipeline: str = Field("demo", description="name under refs/ that this pipeline's stage refs are kept")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. endpoint_url for MinIO")
    lease_ttl_s: float = execution(120.0, description="a lease not renewed for this long is considered abandoned")


class ComputeConfig(Section):
    workers: int = execution(2, ge=1, description="parallel shard workers for data stages")
    task_runner: Literal["threads", "processes", "dask"] = execution("threads")
    dask_address: str | None = execution(None, description="address of an existing Dask scheduler (task_runner=dask)")
    progress: bool = execution(True, description="progress bars on long work (only on a terminal)")


# --------------------------------------------------------------------------- data stages


class SourceConfig(Section):
    name: str = Field(description="label stored in every document's `source` column")
    paths: list[str] = Field(description="files, directories or globs; '{stdlib}' expands to Python's standard library")
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    id_field: str | None = None
    url_field: str | None = "url"

    @model_validator(mode="after")
    def _has_paths(self) -> "SourceConfig":
        if not self.paths:
            raise ValueError(f"source '{self.name}' has no paths")
        return self


class IngestConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    max_doc_chars: int = Field(2_000_000, ge=1, description="longer documents are skipped and counted as too_long")
    min_doc_chars: int = Field(1, ge=0, description="shorter documents are skipped and counted as too_short")
    target_shard_bytes: int = Field(32 * 2**20, ge=1024, description="input files are grouped into shards of about this size")


class ExactDedupConfig(Section):
    normalize: Literal["none", "whitespace", "lower_whitespace", "nfkc_lower_whitespace"] = "nfkc_lower_whitespace"


class CrawlConfig(Section):
    """Issue 3: polite crawler. Fields are owned by the crawl stage."""

    seeds: list[str] = Field(default_factory=list)
    allow_private_hosts: bool = False


class IngestWarcConfig(Section):
    """Issue 3: WARC / WET ingest."""

    paths: list[str] = Field(default_factory=list)


class ExtractConfig(Section):
    """Issue 3: HTML to text and language ID."""

    languages: list[str] = Field(default_factory=list, description="keep only these languages (empty: keep all)")


class NearDedupConfig(Section):
    """Issue 4: MinHash LSH near-duplicate removal."""

    threshold: float = Field(0.8, gt=0, le=1)


class HeuristicFilterConfig(Section):
    """Issue 5: Gopher / C4 / FineWeb rules."""

    enabled: bool = True


class QualityClassifierConfig(Section):
    """Issue 5: fastText quality classifier training and filtering."""

    enabled: bool = False


class PiiConfig(Section):
    """Issue 6: PII scrubbing."""

    enabled: bool = True


class TokenizerConfig(Section):
    """Issue 7: BPE tokenizer training."""

    vocab_size: int = Field(4096, ge=260)


class TokenizeConfig(Section):
    """Issue 7: packing documents into Arrow token shards."""

    seq_len: int = Field(256, ge=8)


class ModelConfig(Section):
    """Issue 8: decoder-only transformer shape."""

    d_model: int = Field(128, ge=8)
    n_layers: int = Field(2, ge=1)


class PretrainConfig(Section):
    """Issue 8: DeepSpeed pretraining."""

    steps: int = Field(100, ge=1)


# --------------------------------------------------------------------------- root


class PipelineConfig(Section):
    store: StoreConfig = StoreConfig()
    compute: ComputeConfig = ComputeConfig()
    ingest: IngestConfig = IngestConfig()
    crawl: CrawlConfig = CrawlConfig()
    ingest_warc: IngestWarcConfig = IngestWarcConfig()
    extract: ExtractConfig = ExtractConfig()
    exact_dedup: ExactDedupConfig = ExactDedupConfig()
    near_dedup: NearDedupConfig = NearDedupConfig()
    heuristic_filter: HeuristicFilterConfig = HeuristicFilterConfig()
    quality: QualityClassifierConfig = QualityClassifierConfig()
    pii: PiiConfig = PiiConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()


# --------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """An invalid config file or override; the message names the field path and the problem."""


def expand_path(path: str) -> str:
    """Expand '{stdlib}' (Python's standard library directory) and '~' in a configured path."""
    return str(Path(path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])).expanduser()) if "{stdlib}" in path or path.startswith("~") else path


def parse_override(text: str) -> tuple[list[str], Any]:
    """'near_dedup.threshold=0.85' -> (['near_dedup', 'threshold'], 0.85); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY.PATH=VALUE, e.g. near_dedup.threshold=0.85")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return path, value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{'.'.join(path[: i + 1])}' is not a section")
        node = child
    node[path[-1]] = value


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], overrides: list[str] = (), origin: str = "config") -> PipelineConfig:
    data = dict(data or {})
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from exc


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Load a YAML preset (default: configs/demo.yaml beside this package) and apply overrides."""
    path = Path(path) if path else DEFAULT_PRESET
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist; pass --config with a YAML preset such as configs/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return build_config(data, overrides, origin=str(path))


DEFAULT_PRESET = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
