"""Export a dense model to Hugging Face ``LlamaForCausalLM`` format, a reward model to
``LlamaForSequenceClassification`` (num_labels=1).

    python -m lmfoundry.model.export MODEL_DIR OUT_DIR [--tokenizer tokenizer.json] [--special special_tokens.json]

MODEL_DIR is our format (model.safetensors + model_config.json, e.g. a pretrain stage's
``model/``; with reward.json beside them a reward model, e.g. a reward_model stage's ``model/``).
OUT_DIR then loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` (a reward model with
``AutoModelForSequenceClassification``) and ``AutoTokenizer.from_pretrained(OUT_DIR)``, and serves
from inference servers that take Llama.
Our module names already follow Llama's, so weights only gain the ``model.`` prefix; the
rotary layout (halves rotated, not interleaved) is Llama's too, so no permutation is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.chat import CHAT_SPECIALS, chat_template
from lmfoundry.model.sharing import unrolled_state_dict
from lmfoundry.model.transformer import CONFIG, WEIGHTS, token_vocab


class ExportError(ValueError):
    pass


def hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    vocab = token_vocab(cfg)
    for key, tensor in state_dict.items():
        if key in ("embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:vocab]  # a padded vocabulary (model.pad_vocab_to) exports only the tokenizer's rows
        if key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[key] = tensor
        else:
            out[f"model.{key}"] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def check_attention(cfg: ModelConfig, model_dir: Path) -> None:
    """Llama attends densely: an LSH-attention model (model.attention: lsh) would export with
    the wrong attention, so it is refused."""
    if cfg.attention != "dense":
        raise ExportError(
            f"{model_dir} was trained with model.attention '{cfg.attention}': Llama has only dense attention, so its logits would differ; "
            "load it with lmfoundry.model.transformer.load_model, or train with model.attention: dense to export"
        )


# The export writes transformers 5.x keys (rope_parameters, the tokenizer's format): a 4.x
# reader would mis-read them without an error (a non-default rope_theta silently read as
# 10000 gives wrong logits), so the floor is checked here and pinned in pyproject.toml.
MIN_TRANSFORMERS = (5, 0)


def check_transformers() -> None:
    import transformers

    major_minor = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    if major_minor < MIN_TRANSFORMERS:
        raise ExportError(
            f"transformers {transformers.__version__} is installed; the Hugging Face export needs >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))} (older versions mis-read its rope and tokenizer settings): pip install -U 'transformers>=5'"
        )


def llama_config(cfg: ModelConfig, max_seq_len: int, special_ids: dict[str, int], dtype: str = "float32"):
    from transformers import LlamaConfig

    check_transformers()

    return LlamaConfig(
        vocab_size=token_vocab(cfg),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def export_llama(
    model_dir: str | Path,
    out_dir: str | Path,
    max_seq_len: int,
    tokenizer_json: str | Path | None = None,
    special_ids: dict[str, int] | None = None,
) -> list[str]:
    """Write config.json, model.safetensors and (given a tokenizer) the tokenizer files; returns the file names."""
    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = ModelConfig.model_validate_json((model_dir / CONFIG).read_text())
    if cfg.moe_experts:
        raise ExportError(f"{model_dir} holds a mixture-of-experts model: LlamaForCausalLM is dense; load it with lmfoundry.model.transformer.load_model")
    check_attention(cfg, model_dir)
    special_ids = dict(special_ids or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    state = unrolled_state_dict(load_file(str(model_dir / WEIGHTS)), cfg)  # model.share_layers: copied into every layer
    save_file(hf_state_dict(state, cfg), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = llama_config(cfg, max_seq_len, special_ids)
    config.save_pretrained(out_dir)
    generation_config(config, max_seq_len).save_pretrained(out_dir)
    if tokenizer_json is not None:
        write_tokenizer(Path(tokenizer_json), special_ids, out_dir, max_seq_len)
    return sorted(p.name for p in out_dir.iterdir() if p.is_file())


def generation_config(config, max_seq_len: int):
    """generate()'s defaults: stop at EOS (and at the chat template's end-of-turn token, when the
    tokenizer has one), never past the context the model was trained on."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_length=max_seq_len
    )


def export_reward_model(
    model_dir: str | Path,
    out_dir: str | Path,
    max_seq_len: int,
    tokenizer_json: str | Path | None = None,
    special_ids: dict[str, int] | None = None,
) -> list[str]:
    """A reward model (model/heads.py) as LlamaForSequenceClassification: our keys are already its
    names (``model.*``, ``score.weight``). Hugging Face scores the rightmost token that is not
    ``pad_token_id``, which for right-padded rows is our last real token, so special_ids needs
    "pad". reward.json (the train-set reward mean / std) is copied along."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lmfoundry.model.heads import REWARD_FILE

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = ModelConfig.model_validate_json((model_dir / CONFIG).read_text())
    if cfg.moe_experts:
        raise ExportError(f"{model_dir} holds a mixture-of-experts model: LlamaForSequenceClassification is dense; load it with lmfoundry.model.heads.load_reward_model")
    check_attention(cfg, model_dir)
    if not (model_dir / REWARD_FILE).exists():
        raise ExportError(f"{model_dir} has no {REWARD_FILE}: not a reward model (export a policy with export_llama)")
    special_ids = dict(special_ids or {})
    if special_ids.get("pad") is None:
        raise ExportError("a reward model export needs the pad token id (special_ids['pad']): Hugging Face finds each row's last token by it")
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = token_vocab(cfg)  # a padded vocabulary exports only the tokenizer's rows
    state = {k: (v[:vocab] if k == "model.embed_tokens.weight" else v).contiguous() for k, v in unrolled_state_dict(load_file(str(model_dir / WEIGHTS)), cfg).items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = llama_config(cfg, max_seq_len, special_ids)
    # no output projection in a classifier: nothing to tie
    config.tie_word_embeddings = False
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels = 1
    config.save_pretrained(out_dir)
    shutil.copyfile(model_dir / REWARD_FILE, out_dir / REWARD_FILE)
    if tokenizer_json is not None:
        write_tokenizer(Path(tokenizer_json), special_ids, out_dir, max_seq_len)
    return sorted(p.name for p in out_dir.iterdir() if p.is_file())


def write_tokenizer(tokenizer_json: Path, special_ids: dict[str, int], out_dir: Path, max_seq_len: int | None = None) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tokenizer_json))
    named = {f"{role}_token": raw.id_to_token(i) for role, i in special_ids.items() if role in ("bos", "eos", "pad", "unk")}
    extra = [raw.id_to_token(i) for role, i in special_ids.items() if role not in ("bos", "eos", "pad", "unk")]
    texts = {role: raw.id_to_token(i) for role, i in special_ids.items()}
    # the chat template in these token texts, when the tokenizer has every chat role
    template = chat_template(texts) if all(texts.get(role) for role in CHAT_SPECIALS) else None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, additional_special_tokens=[t for t in extra if t is not None], chat_template=template,
        model_max_length=max_seq_len or int(1e30), **named,
    )
    # save_jinja_files=False: the template goes into tokenizer_config.json, where every transformers version reads it
    fast.save_pretrained(out_dir, save_jinja_files=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", help="tokenizer.json to ship with the model")
    parser.add_argument("--special", help="special_tokens.json ({role: id})")
    args = parser.parse_args(argv)
    special = json.loads(Path(args.special).read_text()) if args.special else {}
    from lmfoundry.model.heads import REWARD_FILE

    exporter = export_reward_model if (Path(args.model_dir) / REWARD_FILE).exists() else export_llama
    try:
        files = exporter(args.model_dir, args.out_dir, args.max_seq_len, args.tokenizer, special)
    except ExportError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    print("\n".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
