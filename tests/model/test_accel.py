"""The GPU fast path's pieces, checked on CPU (issue 19): the MFU peak table, the attention
backend choice, graph breaks of the dense model, per-block compile, rotary tables built once,
and the padded vocabulary (never sampled, never exported)."""
from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file

from lmfoundry.infra.config import ModelConfig, PretrainConfig
from lmfoundry.model import accel
from lmfoundry.model.export import export_llama
from lmfoundry.model.generate import Sampling, generate
from lmfoundry.model.transformer import Transformer, resolve, rope_tables, save_model

DENSE = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)


def tiny(vocab: int = 96, **fields) -> Transformer:
    torch.manual_seed(0)
    return Transformer(resolve(DENSE.model_copy(update=fields), vocab)).eval()


def test_peak_from_the_device_name():
    cases = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA L40S": 362.0, "NVIDIA L4": 121.0, "NVIDIA A10": 125.0, "NVIDIA GeForce RTX 4090": 165.2, "NVIDIA GH200 480GB": 989.0}
    assert {name: accel.peak_tflops_for(name) for name in cases} == cases
    assert accel.peak_tflops_for("Some Future GPU") is None
    assert accel.resolve_peak(0.0, "cuda", "NVIDIA H200")[0] == 989.0
    assert accel.resolve_peak(500.0, "cuda", "NVIDIA H200") == (500.0, "configured distributed.peak_tflops")  # overridable
    peak, source = accel.resolve_peak(0.0, "cpu", "cpu")
    assert peak == accel.CPU_NOMINAL_TFLOPS == 1.0 and "nominal" in source
    peak, source = accel.resolve_peak(0.0, "cuda", "Some Future GPU")
    assert peak is None and "distributed.peak_tflops" in source
    assert not accel.enable_tf32("cpu")  # tf32 is a cuda switch; nothing changes on cpu


def test_attention_backends_on_cpu():
    model = tiny()
    tokens = torch.randint(0, 96, (2, 12))
    reference, _ = model(tokens)
    for name in ("auto", "math"):
        with accel.attention_for_run(name, model, model.cfg, torch.device("cpu"), torch.float32) as described:
            assert described.startswith(name)
            if name == "auto":  # what this machine could use for the model's head layout: cuDNN is cuda-only
                assert "math" in described.split("usable here:")[1] and "cudnn" not in described
            logits, _ = model(tokens)
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    # a kernel this machine has not: a clear error naming the field, before any training
    with pytest.raises(accel.AttentionBackendError, match=r"distributed\.attention_backend cudnn cannot run on cpu.*choose auto"):
        accel.check_attention("cudnn", torch.device("cpu"), torch.float32, model.cfg)
    with pytest.raises(accel.AttentionBackendError, match=r"attention_backend fa3: .*(not installed|cuda only)"):
        accel.check_attention("fa3", torch.device("cpu"), torch.bfloat16, model.cfg)
    # the switch itself: inside the context only the math backend is enabled, and it is undone after
    with accel.attention_kernel("math"):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored afterwards


def test_fa3_layout_glue_matches_sdpa():
    """use_fa3 hands q, k, v as [B, T, heads, Dh] to a flash_attn_func; here a plain-torch function
    with FlashAttention 3's signature stands in for the CUDA kernel, so the transposes around it
    are checked against SDPA's own result."""
    def flash_attn_func(q, k, v, causal):  # [B, T, H, Dh], [B, T, K, Dh]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
        )
        return out.transpose(1, 2), None  # some releases also return the log-sum-exp

    model = tiny()
    tokens = torch.randint(0, 96, (2, 10))
    reference, _ = model(tokens)
    for block in accel.blocks(model):
        block.self_attn.causal_kernel = flash_attn_func
    logits, _ = model(tokens)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_the_dense_model_has_no_graph_breaks():
    model = tiny()
    tokens = torch.randint(0, 96, (2, 16))
    cos, sin = model.rope(16, tokens.device, torch.float32)
    torch._dynamo.reset()
    block = torch._dynamo.explain(model.layers[0])(model.embed_tokens(tokens), cos, sin)
    assert (block.graph_count, block.graph_break_count) == (1, 0), block.break_reasons
    model.train()
    torch._dynamo.reset()
    whole = torch._dynamo.explain(model)(tokens)
    assert (whole.graph_count, whole.graph_break_count) == (1, 0), whole.break_reasons
    positions = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)  # packed rows: two segments
    segments = (positions == 0).cumsum(-1)
    torch._dynamo.reset()
    packed = torch._dynamo.explain(model)(tokens, positions, segments)
    assert packed.graph_break_count == 0, packed.break_reasons
    torch._dynamo.reset()


def test_compile_blocks_keeps_names_and_results():
    model, plain = tiny(), tiny()
    tokens = torch.randint(0, 96, (2, 12))
    keys = list(model.state_dict())
    assert accel.compile_blocks(model, backend="eager") == DENSE.n_layers  # inductor's C++ build is the GPU bench's job
    assert list(model.state_dict()) == keys  # checkpoints and export see the same names
    assert all(block._compiled_call_impl is not None for block in model.layers)
    model.train(), plain.train()
    out, _ = model(tokens)
    ref, _ = plain(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    ref.square().mean().backward()
    torch.testing.assert_close(model.layers[0].mlp.up_proj.weight.grad, plain.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_rotary_tables_are_built_once():
    model = tiny().train()
    tokens = torch.randint(0, 96, (2, 12))
    model(tokens)
    first = model.rope(12, tokens.device, torch.float32)
    model(tokens)
    with torch.inference_mode():  # generation-time forwards share the tables, which stay autograd-safe
        model(tokens)
    assert list(model._rope_cache) == [(12, tokens.device, torch.float32)]
    assert all(a is b for a, b in zip(first, model.rope(12, tokens.device, torch.float32)))
    expected = rope_tables(12, DENSE.d_model // DENSE.n_heads, DENSE.rope_theta, "cpu", torch.float32)
    assert all(torch.equal(a, b) and not a.is_inference() for a, b in zip(first, expected))
    logits, _ = model(tokens)
    logits.mean().backward()  # tables cached under inference_mode would fail here


def test_padded_vocabulary_is_never_sampled_nor_exported(tmp_path):
    cfg = resolve(DENSE.model_copy(update={"pad_vocab_to": 128}), 100)
    assert (cfg.vocab_size, cfg.token_vocab_size) == (128, 100)
    assert resolve(cfg) == cfg  # resolving again changes nothing
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    assert model.lm_head.weight.shape == (128, DENSE.d_model)
    prompts = [[1, 2, 3], [4, 5]]
    out = generate(model, prompts, max_new_tokens=6, pad_id=0, sampling=Sampling(temperature=5.0), seed=0, return_logits=True)
    assert out.logits.shape == (2, 6, 100)  # the padding rows never reach sampling
    assert int(out.response.max()) < 100
    save_model(model.state_dict(), cfg, tmp_path / "ours")
    export_llama(tmp_path / "ours", tmp_path / "hf", max_seq_len=32)
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (100, DENSE.d_model)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 100


def test_fast_path_on_cpu_changes_nothing_it_should_not():
    model = tiny()
    dist = PretrainConfig().distributed
    stack, chosen = accel.fast_path(model, model.cfg, dist, "fp32", torch.device("cpu"))
    with stack:
        assert (chosen["tf32"], chosen["compiled_blocks"], chosen["peak_tflops"]) == (False, 0, 1.0)
        assert chosen["attention"].startswith("auto") and "causal masking not halved" in accel.describe(chosen)
    # compile asked for: every block, except under ZeRO-3 (its gathering hooks wrap each block)
    assert accel.fast_path(tiny(), model.cfg, dist.model_copy(update={"compile": True}), "fp32", torch.device("cpu"))[1]["compiled_blocks"] == 2
    zero3 = dist.model_copy(update={"compile": True, "zero_stage": 3})
    assert accel.fast_path(tiny(), model.cfg, zero3, "fp32", torch.device("cpu"))[1]["compiled_blocks"] == 0
    torch._dynamo.reset()
