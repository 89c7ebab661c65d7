"""The one configuration tree of lmfoundry.

Every stage receives only its own section. Sections are frozen pydantic models with
``extra="forbid"`` so a typo in YAML or in ``--set`` fails before anything runs.

Fields that only change *how* a stage runs (worker counts, batch sizes, progress bars)
are marked with ``execution()``; they are left out of the stage identity, so changing
them never invalidates committed artifacts. Every other field is identity.

Load a preset with ``load_config("configs/demo.yaml", overrides=["dedup.threshold=0.85"])``.
"""
from __future__ import annotations

import copy
import difflib
import os
import sysconfig
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from lmfoundry.infra.config_posttrain import AugmentConfig, AugmentDocsConfig, DpoConfig, PpoConfig, PreferenceDataConfig, RewardModelConfig, SftConfig, SftDataConfig
from lmfoundry.infra.config_base import EXECUTION_KEY, Section, added_later, execution  # noqa: F401  (re-exported)
from lmfoundry.infra.config_data import (  # noqa: F401  (re-exported: every section is importable from here)
    SourceConfig,
    IngestConfig,
    ExactDedupConfig,
    CrawlConfig,
    IngestWarcConfig,
    ExtractConfig,
    NearDedupConfig,
    HeuristicFilterConfig,
    QualityClassifierConfig,
    PiiConfig,
    TokenizerConfig,
    TokenizeConfig,
)
from lmfoundry.infra.config_train import TrainRecipe
from lmfoundry.infra.config_parallel import layout_problems
from lmfoundry.infra.config_sweep import SweepConfig
from lmfoundry.infra.config_review import ReviewConfig
from lmfoundry.infra.credentials import StorageOptions


# --------------------------------------------------------------------------- store / compute


class StoreConfig(Section):
    url: str = Field(".lmf/store", description="fsspec URL of the artifact store: a local path or s3://bucket/prefix")
    pipeline: str = Field("demo", description="name under refs/ that this pipeline's stage refs are kept")
    storage_options: StorageOptions = Field(default_factory=dict, description="fsspec options, e.g. endpoint_url for MinIO (no credentials: they come from the environment)")
    lease_ttl_s: float = execution(120.0, description="a lease not renewed for this long is considered abandoned")


class ComputeConfig(Section):
    workers: int = execution(2, ge=1, description="parallel shard workers for data stages")
    task_runner: Literal["threads", "processes", "dask"] = execution(
        "processes",
        description="how data stages map over shards: local worker processes (CPU-bound Python uses every core), threads (one core "
        "through the GIL; for I/O-bound work), or a Dask cluster (README: Choosing a task runner)",
    )
    dask_address: str | None = execution(
        None, description="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (task_runner=dask; None: a local cluster of `workers` processes)"
    )
    progress: bool = execution(True, description="progress bars on long work (only on a terminal)")
    gpu_concurrency_limit: str | None = execution(
        "gpu-slots", description="Prefect global concurrency limit that training stages hold while they run (None: no guard)"
    )
    gpu_slots: int = execution(1, ge=1, description="slots of gpu_concurrency_limit one training stage occupies")


class ModelConfig(Section):
    """Issue 8: decoder-only transformer shape (model/transformer.py); MoE when moe_experts > 0."""

    vocab_size: int = Field(0, ge=0, description="0: the tokenizer's vocabulary size, read from the token shards")
    pad_vocab_to: int = added_later(
        1, ge=1, description="round the embedding and output rows up to a multiple of this (128 suits GPU matmuls); the extra rows are never sampled or exported"
    )
    token_vocab_size: int = added_later(0, ge=0, description="filled by resolve(): the tokenizer's own size when vocab_size was padded; 0: vocab_size")
    d_model: int = Field(128, ge=8, description="residual stream width")
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1, description="query heads; head_dim = d_model / n_heads")
    n_kv_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention); n_heads must be a multiple")
    ffn_hidden: int = Field(0, ge=0, description="SwiGLU hidden width; 0: 8/3 * d_model rounded up to a multiple of 64")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = Field(True, description="share the input embedding with the output projection")
    init_std: float = Field(0.02, gt=0)
    moe_experts: int = Field(0, ge=0, description="routed experts per MoE layer; 0: dense SwiGLU feed-forward")
    moe_top_k: int = Field(2, ge=1, description="routed experts each token is sent to")
    moe_shared_experts: int = Field(1, ge=0, description="experts every token always uses (DeepSeekMoE)")
    moe_expert_hidden: int = Field(0, ge=0, description="hidden width of one expert; 0: ffn_hidden / (moe_top_k + moe_shared_experts)")
    moe_aux_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss added to the LM loss")
    moe_z_loss_weight: float = added_later(0.0, ge=0, description="weight of the router z-loss (mean squared logsumexp of router logits, ST-MoE; 1e-3 is usual); 0: off")
    # issue 20 (model/lsh_attention.py, model/sharing.py); added_later: at their defaults they leave versions as they were
    attention: Literal["dense", "lsh"] = added_later("dense", description="dense: SDPA over every earlier token; lsh: Reformer LSH attention (shared QK, hashed buckets, chunks)")
    lsh_n_hashes: int = added_later(2, ge=1, description="lsh: hashing rounds, combined by their logsumexp (more rounds miss fewer neighbours, cost more)")
    lsh_bucket_size: int = added_later(64, ge=2, description="lsh: chunk length; a query sees its sorted chunk and the previous one (one chunk = dense)")
    lsh_seed: int = added_later(0, description="lsh: seed of the random rotations (fixed per layer, so buckets are reproducible)")
    share_layers: int = added_later(1, ge=1, description="ALBERT-style sharing: each group of this many consecutive layers uses one block's weights; 1: off")

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model {self.d_model} is not a multiple of model.n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model head_dim {self.d_model // self.n_heads} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads {self.n_heads} is not a multiple of model.n_kv_heads {self.n_kv_heads}")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ValueError(f"model.moe_top_k {self.moe_top_k} exceeds model.moe_experts {self.moe_experts}")
        if self.share_layers > self.n_layers:
            raise ValueError(f"model.share_layers {self.share_layers} exceeds model.n_layers {self.n_layers}")
        if self.moe_z_loss_weight and not self.moe_aux_weight:
            # the trainer scales the model's router loss by moe_aux_weight; z rides in it (model/moe.py)
            raise ValueError("model.moe_z_loss_weight needs model.moe_aux_weight > 0 (set a small one, e.g. 1e-4, or turn the z-loss off)")
        return self


class PretrainConfig(TrainRecipe):
    """Issue 8: DeepSpeed pretraining (model/train.py, dispatched by tasks/train/pretrain.py).

    The fields are the training recipe every training stage shares (infra/config_train.py):
    optimisation fields are identity; `distributed` (ranks, launcher, ZeRO stage, device) only
    changes how the same global batch is computed, so it is an execution knob.
    """

    section_name = "pretrain"


# --------------------------------------------------------------------------- root


class PipelineConfig(Section):
    store: StoreConfig = StoreConfig()
    compute: ComputeConfig = ComputeConfig()
    ingest: IngestConfig = IngestConfig()
    crawl: CrawlConfig = CrawlConfig()
    ingest_warc: IngestWarcConfig = IngestWarcConfig()
    extract: ExtractConfig = ExtractConfig()
    exact_dedup: ExactDedupConfig = ExactDedupConfig()
    augment_docs: AugmentDocsConfig = AugmentDocsConfig()
    near_dedup: NearDedupConfig = NearDedupConfig()
    heuristic_filter: HeuristicFilterConfig = HeuristicFilterConfig()
    quality: QualityClassifierConfig = QualityClassifierConfig()
    pii: PiiConfig = PiiConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    augment: AugmentConfig = AugmentConfig()
    sft_data: SftDataConfig = SftDataConfig()
    preference_data: PreferenceDataConfig = PreferenceDataConfig()
    sft: SftConfig = SftConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    dpo: DpoConfig = DpoConfig()
    ppo: PpoConfig = PpoConfig()
    sweep: SweepConfig = SweepConfig()  # read by flows/sweep.py only, never by a stage
    review_docs: ReviewConfig = ReviewConfig()  # issue 21: expert review after pii_scrub (tasks/review/)
    review_pairs: ReviewConfig = ReviewConfig()  # and after preference_data

    @model_validator(mode="after")
    def _post_training_has_its_inputs(self) -> "PipelineConfig":
        # a disabled stage passes its first input through: a trainer would get the wrong data
        needs = {
            "sft": ("sft_data",),
            "reward_model": ("preference_data", "sft"),
            "dpo": ("preference_data", "sft"),
            "ppo": ("preference_data", "sft", "reward_model"),
        }
        for stage, inputs in needs.items():
            off = [name for name in inputs if not getattr(self, name).enabled]
            if getattr(self, stage).enabled and off:
                raise ValueError(f"{stage} is enabled but needs {', '.join(off)}: set {', '.join(f'{n}.enabled: true' for n in off)} (or {stage}.enabled: false)")
        return self

    @model_validator(mode="after")
    def _parallel_layout_fits(self) -> "PipelineConfig":
        # tp / sp against the model's heads and the token length (infra/config_parallel.py); ranks were checked in the section
        m = self.model
        for name in ("pretrain", "sft", "reward_model", "dpo", "ppo"):
            section = getattr(self, name)
            dist = section.distributed
            problems = layout_problems(
                dist.tp, dist.sp, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, seq_len=self.tokenize.seq_len if name == "pretrain" else None,
                section=name, moe=bool(m.moe_experts), attention=m.attention, share_layers=m.share_layers,
            )
            if problems and getattr(section, "enabled", True):
                raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """An invalid config file or override; the message names the field path and the problem."""


def expand_path(path: str) -> str:
    """Expand '{stdlib}' (Python's standard library directory) and a leading '~' in a configured path."""
    path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return os.path.expanduser(path) if path.startswith("~") else path


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
    """Set `path` in the nested data; a number indexes a list (``ingest.sources.0.paths``)."""
    node: Any = data
    for i, key in enumerate(path):
        where = ".".join(path[: i + 1])
        last = i == len(path) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {'.'.join(path)}: '{where}' needs an index below {len(node)} (the list has {len(node)} items)")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{'.'.join(path[:i])}' is not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]


def field_suggestion(loc: tuple) -> str:
    """For an unknown field at `loc`: '; did you mean X?' from the fields of the section that holds it."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue  # a list item: the model of its elements is the annotation's argument
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        args = getattr(annotation, "__args__", ()) or ()
        model = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; fields here: {', '.join(model.model_fields)}"


def format_validation_error(exc: ValidationError, origin: str, overrides: list[tuple[str, list[str]]] = ()) -> str:
    """One line per problem, naming the field, the override that set it (else the file), and a fix."""
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "<root>"
        hint = field_suggestion(loc) if err["type"] == "extra_forbidden" else ""
        blamed = next((text for text, path in overrides if [str(p) for p in loc[: len(path)]] == path or path[: len(loc)] == [str(p) for p in loc]), None)
        source = f" (from override '{blamed}')" if blamed else ""
        lines.append(f"  {where}: {err['msg']}{hint}{source}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], overrides: list[str] = (), origin: str = "config") -> PipelineConfig:
    data = copy.deepcopy(data or {})
    parsed = [(text, *parse_override(text)) for text in overrides]
    for _, path, value in parsed:
        apply_override(data, path, value)
    try:
        return anchor_store(PipelineConfig.model_validate(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin, [(text, path) for text, path, _ in parsed])) from exc


def anchor_store(config: PipelineConfig) -> PipelineConfig:
    """A relative local store URL resolved against the repository, like a preset path: the CLI,
    a served flow and a worker (which runs in a scratch directory Prefect deletes afterwards)
    must all read and write the same store."""
    url = config.store.url
    if "://" in url or Path(url).expanduser().is_absolute():
        return config
    return config.model_copy(update={"store": config.store.model_copy(update={"url": str(REPO_ROOT / url)})})


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


# the repository checkout: presets and relative paths in them resolve against it
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = REPO_ROOT / "configs" / "demo.yaml"
