"""Generation (model/generate.py): the KV cache against recomputing, padding, sampling, stopping."""
from __future__ import annotations

import pytest
import torch

from lmfoundry.infra.config import ModelConfig
from lmfoundry.model.generate import GREEDY, Sampling, TextStream, choose, generate, next_token_logits, padding_layout
from lmfoundry.model.transformer import KVCache, Transformer, resolve

VOCAB, PAD = 61, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]  # different lengths: rows 2 and 3 get left padding


# one torch thread (tests/model/conftest.py): on two shared cores intra-op threads spin against other processes
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    # init_std 0.3: peaked next-token distributions, so greedy choices are not near-ties
    fields = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "init_std": 0.3, **overrides}
    return Transformer(resolve(ModelConfig(**fields), VOCAB)).eval()


def recomputed_greedy(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """The slow reference: one unpadded row, the whole sequence through the model every step."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([seq]))[0][0, -1]
            logits.append(last)
            seq.append(int(last.argmax()))
    return seq[len(prompt) :], torch.stack(logits)


@pytest.mark.parametrize("moe", [0, 4], ids=["dense", "moe"])
def test_cached_greedy_equals_recomputing_each_row_alone(moe):
    model = tiny(moe_experts=moe)
    out = generate(model, PROMPTS, max_new_tokens=12, pad_id=PAD, return_logits=True)
    assert out.prompt.shape == (3, 7) and out.prompt_mask.sum(1).tolist() == [7, 2, 4]
    for row, prompt in enumerate(PROMPTS):
        tokens, logits = recomputed_greedy(model, prompt, 12)
        assert out.response[row].tolist() == tokens
        assert torch.allclose(out.logits[row], logits, atol=1e-4)
    assert out.response_mask.all() and not out.stopped.any()
    uncached = generate(model, PROMPTS, max_new_tokens=12, pad_id=PAD, use_cache=False)
    assert torch.equal(uncached.response, out.response)


def test_logprobs_match_a_training_forward_over_the_padded_sequences():
    """What PPO does: score prompt + response in one forward with padding_layout's positions and segments."""
    model = tiny()
    out = generate(model, PROMPTS, max_new_tokens=6, pad_id=PAD, sampling=Sampling(temperature=0.8), seed=1, stop_ids={3})
    tokens, mask = out.sequences()
    positions, segments = padding_layout(mask)
    with torch.no_grad():
        logits = model(tokens, positions, segments)[0][:, out.prompt.shape[1] - 1 : -1] / 0.8  # predicts each response token
    expected = logits.log_softmax(-1).gather(-1, out.response.unsqueeze(-1)).squeeze(-1) * out.response_mask
    assert torch.allclose(out.logprobs, expected, atol=1e-4)


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = tiny()
    warm = Sampling(temperature=1.5, top_k=20, top_p=0.95)
    a = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, sampling=warm, seed=7)
    b = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, sampling=warm, generator=torch.Generator().manual_seed(7))
    c = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, sampling=warm, seed=8)
    assert torch.equal(a.response, b.response) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response, c.response)
    greedy = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, sampling=GREEDY)
    top1 = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, sampling=Sampling(temperature=1.5, top_k=1), seed=3)
    assert torch.equal(greedy.response, top1.response)


def test_stop_ids_end_each_row_on_its_own():
    model = tiny()
    free = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD).response.tolist()
    stop = free[2][2]  # row 3 emits it at step 3
    first = [row.index(stop) if stop in row else None for row in free]
    assert first == [4, None, 2]  # each row stops at another step, one never
    out = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, stop_ids={stop, VOCAB + 5})
    for row, at in enumerate(first):
        n = 10 if at is None else at + 1
        assert out.response[row, :n].tolist() == free[row][:n]  # the stop token itself is kept
        assert out.response[row, n:].eq(PAD).all() and out.response_mask[row].tolist() == [1] * n + [0] * (10 - n)
        assert bool(out.stopped[row]) == (at is not None)
        assert out.logprobs[row, n:].eq(0).all()
    assert out.lengths.tolist() == [10 if at is None else at + 1 for at in first]


def test_generation_ends_early_when_every_row_stopped():
    model = tiny()
    free = generate(model, PROMPTS, max_new_tokens=4, pad_id=PAD).response
    steps = []
    out = generate(model, PROMPTS, max_new_tokens=50, pad_id=PAD, stop_ids=set(free[:, 0].tolist()), on_step=lambda t, a: steps.append(a.tolist()))
    assert out.lengths.tolist() == [1, 1, 1] and len(steps) == 1 and out.stopped.all()


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda s: torch.isfinite(next_token_logits(logits, s))[0].tolist()
    assert kept(Sampling(top_k=2)) == [True, True, False, False]
    assert kept(Sampling(top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7, then 0.8 covers it
    assert kept(Sampling(top_p=0.5)) == [True, False, False, False]  # the first token alone holds 0.5
    assert kept(Sampling(top_p=0.96)) == [True, True, True, True]
    assert kept(Sampling(top_p=0.9, top_k=2)) == [True, True, False, False]
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_sampled_frequencies_follow_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(20000, 3)
    drawn = choose(logits, Sampling(temperature=2.0), torch.Generator().manual_seed(0))
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 2.0, dim=0)
    observed = torch.bincount(drawn, minlength=3).float() / drawn.numel()
    assert torch.allclose(observed, expected, atol=0.015)


def test_cache_and_prompt_errors_name_the_problem():
    model = tiny()
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1], []], max_new_tokens=2, pad_id=PAD)
    cache = KVCache(model.cfg, 1, 4)
    with pytest.raises(ValueError, match="holds 4 slots; 5 were asked for"):
        model(torch.ones(1, 5, dtype=torch.long), torch.arange(5).unsqueeze(0), torch.ones(1, 5, dtype=torch.long), cache=cache)


def test_text_stream_never_writes_half_a_character():
    text = "héllo → wörld"
    data = list(text.encode("utf-8"))
    written: list[str] = []
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), written.append)
    for i, byte in enumerate(data + [0]):
        stream(torch.tensor([byte]), torch.tensor([i < len(data)]))  # the last step: the row had stopped
    assert "".join(written) == text and not any("\ufffd" in w for w in written) and len(written) > 5
    assert stream.finish() == text and "".join(written) == text
    written.clear()
    cut = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), written.append)
    cut(torch.tensor([data[1]]), torch.tensor([True]))  # the first byte of "é" alone: held back, then flushed
    assert written == [] and cut.finish() == "\ufffd" and written == ["\ufffd"]
