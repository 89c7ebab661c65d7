"""The model in-process: shapes, causality, GQA, accounting, overfitting, MoE routing, losses, export."""
from __future__ import annotations

import pytest
import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.losses import IGNORE_INDEX, lm_loss, split_batch
from lmfoundry.model.moe import MoE
from lmfoundry.model.transformer import Transformer, load_model, resolve, save_model

VOCAB = 97


# one torch thread (tests/model/conftest.py): on two shared cores intra-op threads spin against other processes
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Transformer:
    torch.manual_seed(overrides.pop("seed", 0))
    fields = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, **overrides}
    return Transformer(resolve(ModelConfig(**fields), VOCAB))


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_causality():
    model = tiny().eval()
    x = tokens()
    logits, aux = model(x)
    assert logits.shape == (2, 12, VOCAB) and aux.item() == 0.0
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x)[0], model(changed)[0]
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # the future does not leak into the past
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with 2 kv heads == MHA whose 4 kv heads repeat each group's weights."""
    gqa = tiny(n_kv_heads=2).eval()
    mha = tiny(n_kv_heads=4).eval()
    state = gqa.state_dict()
    head_dim = 32 // 4
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = state[key].view(2, head_dim, 32)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * head_dim, 32)
    mha.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(gqa(x)[0], mha(x)[0], atol=1e-5)


def test_parameter_count_and_flops():
    model = tiny(tie_embeddings=False)
    d, f, layers, kv = 32, 128, 2, 2 * 8  # ffn_hidden: 8/3 * 32 rounded up to 64 multiples
    assert model.cfg.ffn_hidden == f
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d
    assert model.num_parameters() == 2 * VOCAB * d + layers * per_layer + d
    assert tiny(tie_embeddings=True).num_parameters() == VOCAB * d + layers * per_layer + d
    matmul = layers * (per_layer - 2 * d) + VOCAB * d
    assert model.flops_per_token(64) == 6 * matmul + 12 * layers * d * 64


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny(d_model=64, n_heads=4, n_kv_heads=2)
    batch = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = split_batch(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = lm_loss(model(inputs)[0], targets).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()


def test_activation_checkpointing_gives_the_same_gradients():
    x = tokens()
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        model.activation_checkpointing = checkpointing
        inputs, targets = split_batch(x)
        lm_loss(model(inputs)[0], targets).total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_activation_stats_recorded_per_layer():
    model = tiny(n_layers=3)
    model.record_activations = True
    model(tokens())
    assert len(model.activation_stats) == 3
    assert all(std.item() > 0 for _, std in model.activation_stats)


def test_label_smoothing_padding_and_aux():
    logits = torch.randn(2, 5, VOCAB)
    batch = torch.randint(3, VOCAB, (2, 6))
    batch[0, -2:] = 1  # padding
    inputs, targets = split_batch(batch, pad_id=1)
    assert (targets == IGNORE_INDEX).sum() == 2
    plain = lm_loss(logits, targets)
    smooth = lm_loss(logits, targets, label_smoothing=0.1, aux=torch.tensor(2.0), aux_weight=0.5)
    assert torch.isclose(smooth.ce, plain.total)  # reported CE never includes smoothing
    assert torch.isclose(smooth.total, torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), label_smoothing=0.1) + 1.0)


def test_moe_routes_to_every_expert_and_counts_active_parameters():
    model = tiny(moe_experts=8, moe_top_k=2, moe_shared_experts=1, moe_expert_hidden=24).eval()
    with torch.no_grad():
        _, aux = model(tokens(batch=8, length=32))
    loads = torch.tensor(model.expert_load())  # [layers, experts]
    assert loads.shape == (2, 8)
    assert (loads > 0).all(), loads
    assert torch.allclose(loads.sum(-1), torch.ones(2))
    assert aux.item() >= 0.99  # E * sum f * P is 1 at perfect balance, more otherwise
    all_active = tiny(moe_experts=8, moe_top_k=8, moe_shared_experts=1, moe_expert_hidden=24)
    # 2 layers x 6 idle experts x 3 matrices of 32 x 24
    assert all_active.active_matmul_parameters() - model.active_matmul_parameters() == 2 * 6 * 3 * 32 * 24


def test_moe_balance_loss_decreases_in_training():
    from lmfoundry.model.transformer import SwiGLU

    torch.manual_seed(0)
    moe = MoE(16, 16, n_experts=4, top_k=1, n_shared=1, expert=SwiGLU)
    x = torch.randn(512, 16) + 2.0  # a shared direction a router can collapse onto
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 0.08  # start collapsed: expert 0 wins nearly every token
    first = moe(x)[1].item()
    first_load = moe.load.max().item()
    optimizer = torch.optim.Adam(moe.parameters(), lr=0.01)
    for _ in range(60):
        out, aux = moe(x)
        loss = (out - x).pow(2).mean() + 0.5 * aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = moe(x)[1].item()
    assert first > 3.0 and last < 0.5 * first, (first, last)
    assert first_load == 1.0 and moe.load.max().item() < 0.9, moe.load  # no longer collapsed


def test_save_and_load_round_trip(tmp_path):
    model = tiny(tie_embeddings=True)
    save_model(model.state_dict(), model.cfg, tmp_path)
    again = load_model(tmp_path)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])
    assert again.lm_head.weight is again.embed_tokens.weight


@pytest.mark.parametrize("tie", [True, False])
def test_hf_llama_export_gives_the_same_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from lmfoundry.model.export import export_llama

    model = tiny(tie_embeddings=tie, n_layers=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norm gains away from 1 so a mix-up would show
    save_model(model.state_dict(), model.cfg, tmp_path / "ours")
    export_llama(tmp_path / "ours", tmp_path / "hf", max_seq_len=64)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = tokens(batch=3, length=40)
    with torch.no_grad():
        diff = (model.eval()(x)[0] - hf(x).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_export_carries_generation_defaults_and_refuses_old_transformers(tmp_path, monkeypatch):
    import json

    import transformers

    from lmfoundry.model.export import ExportError, export_llama

    model = tiny(rope_theta=50_000.0)
    save_model(model.state_dict(), model.cfg, tmp_path / "ours")
    export_llama(tmp_path / "ours", tmp_path / "hf", max_seq_len=64, special_ids={"bos": 0, "eos": 1, "pad": 2})
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["max_length"], generation["eos_token_id"], generation["pad_token_id"]) == (64, 1, 2)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert loaded.rope_parameters["rope_theta"] == 50_000.0 and loaded.max_position_embeddings == 64
    # a transformers older than the export's keys would mis-read rope_theta silently: refused instead
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ExportError, match="needs >= 5.0"):
        export_llama(tmp_path / "ours", tmp_path / "old", max_seq_len=64)


def test_moe_model_is_not_exported_as_llama(tmp_path):
    from lmfoundry.model.export import ExportError, export_llama

    model = tiny(moe_experts=4)
    save_model(model.state_dict(), model.cfg, tmp_path / "ours")
    with pytest.raises(ExportError, match="mixture-of-experts"):
        export_llama(tmp_path / "ours", tmp_path / "hf", max_seq_len=64)


def pack(pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conversations [L_i] -> one row (tokens, positions restarting at 0, segment ids), each [1, sum L_i]."""
    tokens = torch.cat(pieces).unsqueeze(0)
    positions = torch.cat([torch.arange(len(p)) for p in pieces]).unsqueeze(0)
    segments = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pieces)]).unsqueeze(0)
    return tokens, positions, segments


@pytest.mark.parametrize("moe", [0, 4])
def test_packed_row_equals_each_conversation_alone(moe):
    model = tiny(moe_experts=moe, moe_top_k=2, moe_shared_experts=1).eval()
    pieces = [tokens(1, n, seed=n)[0] for n in (5, 9, 3, 7)]
    row, positions, segments = pack(pieces)
    with torch.no_grad():
        packed, _, hidden = model(row, positions, segments, return_hidden=True)
        start = 0
        for piece in pieces:
            alone, _, alone_hidden = model(piece.unsqueeze(0), return_hidden=True)
            assert (packed[0, start : start + len(piece)] - alone[0]).abs().max().item() < 1e-5
            assert (hidden[0, start : start + len(piece)] - alone_hidden[0]).abs().max().item() < 1e-5
            start += len(piece)
        # without the segment mask the later conversations would see the earlier ones
        leaky = model(row, positions)[0]
        assert (leaky[0, 5:14] - packed[0, 5:14]).abs().max().item() > 1e-3


def test_segments_are_causal_and_isolated():
    model = tiny().eval()
    pieces = [tokens(1, 6, seed=1)[0], tokens(1, 6, seed=2)[0]]
    row, positions, segments = pack(pieces)
    with torch.no_grad():
        base = model(row, positions, segments)[0]
        later = row.clone()
        later[0, 9:] = (later[0, 9:] + 1) % VOCAB  # the second conversation's tail
        changed = model(later, positions, segments)[0]
        earlier = row.clone()
        earlier[0, :6] = (earlier[0, :6] + 1) % VOCAB  # the whole first conversation
        other = model(earlier, positions, segments)[0]
    assert torch.equal(base[0, :9], changed[0, :9])  # neither the past nor the other conversation moves
    assert not torch.allclose(base[0, 9:], changed[0, 9:])
    assert torch.allclose(base[0, 6:], other[0, 6:], atol=1e-6)  # the second conversation never sees the first


def test_default_positions_and_hidden_states_match_the_plain_path():
    model = tiny().eval()
    x = tokens()
    with torch.no_grad():
        plain = model(x)[0]
        explicit = model(x, torch.arange(x.shape[1]).expand_as(x), torch.zeros_like(x))[0]
        hidden, _ = model.hidden_states(x)
    assert (plain - explicit).abs().max().item() < 1e-5
    assert torch.allclose(model.lm_head(hidden), plain, atol=1e-6)
