"""The training recipe every training section shares: pretrain, sft, reward_model, dpo.

    class SftConfig(TrainRecipe):
        section_name: ClassVar[str] = "sft"
        lr: float = Field(1e-3, gt=0)          # a stage overrides a default by redeclaring the field

Optimisation fields are identity; `distributed` (ranks, launcher, ZeRO stage, device) only changes
how the same global batch is computed, so it is an execution knob. model/train.py reads these
fields (the run loop); the stages in tasks/train/ copy them into the job file.

Left unset, `precision`, `distributed.backend` and `distributed.compile` follow
`distributed.accelerator` (defaults_for): cuda gets bf16, nccl and compiled blocks; cpu keeps
fp32, gloo and eager, so an unchanged CPU config keeps its stage versions.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from lmfoundry.infra.config_base import Section, execution
from lmfoundry.infra.config_parallel import layout_problems


def defaults_for(accelerator: str) -> dict[str, Any]:
    """What a training section's unset fields resolve to on this accelerator: on cuda the fast
    path (bf16, nccl, compiled blocks), on cpu what runs everywhere (fp32, gloo, eager)."""
    if accelerator == "cuda":
        return {"precision": "bf16", "backend": "nccl", "compile": True}
    return {"precision": "fp32", "backend": "gloo", "compile": False}


class TrainRecipe(Section):
    """How to train: steps, batch, AdamW + warmup/cosine schedule, precision, cadence, and where it runs."""

    section_name: ClassVar[str] = "train"  # the config section, as named in messages

    class Distributed(Section):
        """How the training runs: the only part to change to move from CPU to GPUs or nodes."""

        launcher: Literal["deepspeed", "torchrun"] = Field("deepspeed", description="launcher that starts the ranks")
        procs: int = Field(1, ge=1, description="ranks per node (GPUs per node, or CPU processes)")
        hostfile: str | None = Field(None, description="DeepSpeed hostfile for several nodes (then work_dir must be shared)")
        accelerator: Literal["cpu", "cuda"] = Field("cpu", description="device of each rank (DS_ACCELERATOR)")
        backend: Literal["gloo", "nccl"] = Field("gloo", description="collective backend; unset: nccl on cuda, gloo on cpu (cuda with gloo is refused)")
        zero_stage: int = Field(1, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer state, 2 + gradients, 3 + parameters")
        offload_optimizer: bool = Field(False, description="keep optimizer state on CPU (DeepSpeedCPUAdam, JIT-built once)")
        activation_checkpointing: bool | str = Field(
            False, description="recompute activations in backward to save memory (model/checkpointing.py): off | all | every:K (blocks 0, K, 2K..) | attention; true = all"
        )
        micro_batch_size: int = Field(0, ge=0, description="samples per rank per forward; 0: the whole per-rank batch (no accumulation)")
        cpu_threads: int = Field(
            1, ge=0, description="torch threads per CPU rank (OMP_NUM_THREADS); 0: cores / procs. Small models train fastest on 1, and threads spin against other busy processes"
        )
        peak_tflops: float = Field(
            0.0, ge=0, description="peak dense bf16 TFLOP/s of one device, the denominator of MFU; 0: from the device name (model/accel.py; CPU: a nominal 1.0)"
        )
        compile: bool = Field(False, description="torch.compile each Transformer block (model/accel.py; ppo and ZeRO-3 run eager); unset: on for cuda, off for cpu")
        attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math", "fa3"] = Field(
            "auto", description="attention kernel (ppo: always auto): auto lets SDPA choose; flash/cudnn/efficient/math force one SDPA backend; fa3 needs flash_attn_interface"
        )
        tp: int = Field(1, ge=1, description="tensor-parallel ranks per model copy (DeepSpeed AutoTP; model/parallel.py); data-parallel size = ranks / (tp x sp)")
        sp: int = Field(1, ge=1, description="sequence-parallel ranks per sequence (DeepSpeed Ulysses; model/parallel.py): each holds seq_len / sp tokens")
        master_port: int = Field(0, ge=0, description="rendezvous port; 0: a free one")
        work_dir: str | None = Field(None, description="local scratch for checkpoints before upload; None: a temporary directory")
        keep_checkpoints: int = Field(1, ge=1, description="committed checkpoints kept in the stage (older ones are removed)")
        timeout_s: float = Field(0, ge=0, description="fail the training after this long (0: no limit)")
        collective_timeout_s: float = Field(
            600.0, gt=0, description="a collective (all-reduce, barrier) waiting longer than this fails its rank with a clear error instead of hanging (process-group timeout; model/cluster.py)"
        )
        stall_timeout_s: float = Field(
            1800.0, ge=0, description="the stage watchdog stops the run when its heartbeat and metrics do not advance for this long (infra/heartbeat.py); 0: off"
        )
        nnodes: int = Field(1, ge=1, description="nodes of a torchrun launch, each running the same command (docs/multinode.md); 1: one node (--standalone)")
        rdzv_endpoint: str | None = Field(None, description="host:port of torchrun's c10d rendezvous when nnodes > 1: a free port on one of the nodes")

        @model_validator(mode="after")
        def _check_nodes(self) -> "TrainRecipe.Distributed":
            if self.nnodes > 1 and (self.launcher != "torchrun" or not self.rdzv_endpoint):
                raise ValueError("distributed.nnodes > 1 needs launcher: torchrun and rdzv_endpoint: host:port (or launcher deepspeed with a hostfile)")
            if (self.nnodes > 1 or self.hostfile) and not self.work_dir:
                raise ValueError("several nodes (distributed.hostfile, or nnodes > 1) need distributed.work_dir: one directory every node mounts at the same path (docs/multinode.md)")
            return self

        @model_validator(mode="before")
        @classmethod
        def _accelerator_defaults(cls, data: Any) -> Any:
            # fields the user left out take the accelerator's defaults (defaults_for): bf16-ready nccl
            # and compiled blocks on cuda, gloo and eager on cpu
            if isinstance(data, dict):
                fill = {k: v for k, v in defaults_for(data.get("accelerator", "cpu")).items() if k in ("backend", "compile")}
                data = {**fill, **{k: v for k, v in data.items() if v is not None or k not in fill}}
            return data

        @model_validator(mode="after")
        def _check_backend(self) -> "TrainRecipe.Distributed":
            if self.accelerator == "cuda" and self.backend == "gloo":
                raise ValueError(
                    "distributed.accelerator is cuda but distributed.backend is gloo: gloo cannot reduce GPU tensors fast "
                    "(and DeepSpeed's GPU paths expect nccl); set distributed.backend: nccl, or leave it out (nccl is the cuda default)"
                )
            return self

        @field_validator("activation_checkpointing", mode="before")
        @classmethod
        def _check_checkpointing(cls, value: Any) -> Any:
            # the policy itself is read by model/checkpointing.py; here only its spelling is checked
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, str) and not re.fullmatch(r"off|all|attention|every:[1-9][0-9]*", value):
                raise ValueError(f"distributed.activation_checkpointing {value!r} is not one of: off, all, every:K (K >= 1), attention (or true / false)")
            return value

        @model_validator(mode="after")
        def _check_parallel_layout(self) -> "TrainRecipe.Distributed":
            # ranks are procs x nodes; a hostfile's nodes are known at launch (model/parallel.py checks again)
            problems = layout_problems(self.tp, self.sp, ranks=None if self.hostfile else self.procs, section=None, zero_stage=self.zero_stage)
            if problems:
                raise ValueError("; ".join(problems))
            return self

    class Stability(Section):
        """Spike detection (model/stability.py): loss and grad norm against a rolling mean + k sigma."""

        enabled: bool = Field(True, description="watch loss and gradient norm for spikes")
        window: int = Field(50, ge=2, description="steps in the rolling mean and standard deviation")
        sigmas: float = Field(8.0, gt=0, description="k: a value above mean + k sigma is a spike")
        min_ratio: float = Field(3.0, ge=1, description="a spike must also be this many times the rolling mean")
        warmup_steps: int = Field(20, ge=0, description="first steps never checked (early training is steep)")
        min_history: int = Field(10, ge=2, description="values a metric needs before it can spike")
        action: Literal["stop", "rollback"] = Field(
            "stop", description="stop: fail naming the protected checkpoint; rollback: reload it, skip the batches since, go on"
        )
        lr_factor: float = Field(1.0, gt=0, le=1, description="rollback: multiply the learning rate by this at each rollback")
        max_rollbacks: int = Field(3, ge=0, description="rollback: stop after this many rollbacks in one run")

        @model_validator(mode="after")
        def _check_window(self) -> "TrainRecipe.Stability":
            if self.min_history > self.window:
                raise ValueError(f"stability.min_history {self.min_history} is above stability.window {self.window}")
            return self

    steps: int = Field(200, ge=1, description="optimizer steps")
    global_batch_size: int = Field(8, ge=1, description="samples per optimizer step over all ranks (must divide into ranks x micro batches)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate; the default suits the tiny demo model (the seed's large presets use 1e-4)")
    min_lr: float = Field(3e-5, ge=0, description="floor the cosine decays to (seed: 1e-6)")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay of matrices (norms are not decayed)")
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="global gradient norm clip (0: off)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="unset: bf16 on cuda, fp32 on cpu (defaults_for); fp16 uses dynamic loss scaling")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing (seed: 0.1)")
    seed: int = Field(0, description="initialisation and data order")
    export_hf: bool = Field(True, description="write a Hugging Face export: LlamaForCausalLM, or LlamaForSequenceClassification for the reward model (dense models only)")
    log_every: int = execution(10, ge=1, description="steps between metric lines")
    eval_every: int = execution(100, ge=1, description="steps between validation passes (and one at the end)")
    eval_samples: int = execution(256, ge=1, description="validation samples per pass (capped by the val split)")
    checkpoint_every: int = execution(100, ge=1, description="steps between committed checkpoints (and one at the end)")
    checkpoint_every_s: float = execution(
        0.0, ge=0, description="also checkpoint when this many seconds passed since the last one (0: off); decided on divergence-check steps"
    )
    async_checkpoints: bool = execution(
        True, description="write checkpoint files in a background thread from a host snapshot; COMPLETE.json still comes last"
    )
    divergence_check_every: int = execution(
        0, ge=0, description="steps between reads of the step losses for the NaN/inf and spike checks (also before every "
        "checkpoint and log line); a NaN is caught at most this many steps late. 0: 10 on cuda, 1 on cpu",
    )
    loss_chunk_tokens: int = execution(
        -1, ge=-1, description="tokens per chunk of the fused output projection + cross-entropy (no [B, T, V] logits); "
        "0: full logits (ZeRO-3 always); -1: 4096 on cuda, 0 on cpu (where fp32 logits cost no copy and the numbers stay PyTorch's)",
    )
    distributed: Distributed = execution(Distributed())
    stability: Stability = Field(Stability(), description="spike detection and what happens on a spike")

    @model_validator(mode="before")
    @classmethod
    def _precision_default(cls, data: Any) -> Any:
        # an unset precision follows the accelerator; it is an identity field, and on cpu it
        # resolves to the old default fp32, so an unchanged CPU config keeps its versions
        if isinstance(data, dict) and data.get("precision") is None:
            dist = data.get("distributed") or {}
            accelerator = dist.get("accelerator", "cpu") if isinstance(dist, dict) else getattr(dist, "accelerator", "cpu")
            data = {**data, "precision": defaults_for(accelerator)["precision"]}
        return data

    @model_validator(mode="after")
    def _check_schedule(self) -> "TrainRecipe":
        if self.min_lr > self.lr:
            raise ValueError(f"{self.section_name}.min_lr {self.min_lr} is above {self.section_name}.lr {self.lr}")
        return self

    def recipe(self) -> "TrainRecipe":
        """The shared fields only (what a job file carries); a section's own fields travel as options."""
        return TrainRecipe(**{name: getattr(self, name) for name in TrainRecipe.model_fields})
