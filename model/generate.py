"""Generation for our Transformer: a preallocated KV cache, left-padded batches, greedy or sampled.

    from lmfoundry.model.generate import Sampling, generate
    out = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, pad_id=2, stop_ids={3},
                   sampling=Sampling(temperature=0.7, top_p=0.9), seed=0)
    out.response          # [B, N] new tokens, pad_id after a row stopped
    out.response_mask     # [B, N] 1 on generated tokens (the stop token included)
    out.logprobs          # [B, N] log-prob of each new token (temperature applied, before top-k/p;
                          #        greedy: temperature 1), when return_logprobs
    out.sequences()       # [B, P + N] left-padded prompt + response, for scoring forwards

Prompts of different lengths are left-padded to a common width P, so every row's next token
goes into the same cache slot. Each token gets its own rotary position (0 at its row's first
real token) and padding gets a segment of its own, so no real token attends to padding.
``padding_layout`` gives the same positions and segments for a training forward over
``out.sequences()``, which is how PPO recomputes log-probs without drifting from generation.

Sampling: ``temperature == 0`` is greedy (argmax); otherwise logits / temperature, then top-k
(0: off), then top-p (1.0: off), then one draw from a seeded ``torch.Generator``, so the same
seed, prompts and model give the same tokens. A row stops after it emits any id in
``stop_ids`` (e.g. <|end|> and <|eos|>); the batch ends when every row stopped or after
``max_new_tokens``. ``use_cache=False`` recomputes the whole prefix at every step instead
(the slow reference bench/generate.py measures against). ``on_step=TextStream(decode, write)``
streams one prompt's reply as text while it is generated (``lmf generate``, ``lmf chat``).

Benchmark: ``lmf bench generate`` (ours vs Hugging Face ``generate`` vs recomputing).

Shape letters: B batch, P padded prompt width, N new tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from lmfoundry.model.transformer import KVCache, Transformer, token_vocab

PAD_SEGMENT, TEXT_SEGMENT = 0, 1


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1.0 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1] (1.0 is off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling(temperature=0.0)


@dataclass
class Generation:
    prompt: torch.Tensor  # [B, P] left-padded prompts
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response: torch.Tensor  # [B, N] new tokens; pad_id after a row stopped
    response_mask: torch.Tensor  # [B, N] 1 on generated tokens, the stop token included
    stopped: torch.Tensor  # [B] bool: the row emitted a stop id (else it ran out of max_new_tokens)
    logprobs: torch.Tensor | None = None  # [B, N] float32 log-prob of each new token, 0 where masked (return_logprobs)
    logits: torch.Tensor | None = None  # [B, N, V] float32 raw logits of each step (return_logits)

    @property
    def lengths(self) -> torch.Tensor:  # [B] new tokens per row
        return self.response_mask.sum(dim=1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, P + N], mask [B, P + N]): prompt and response side by side, 1 on real tokens."""
        return torch.cat([self.prompt, self.response], dim=1), torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def texts(self, decode: Callable[[list[int]], str]) -> list[str]:
        """Each row's new tokens (without padding) through ``decode``."""
        return [decode(row[mask.bool()].tolist()) for row, mask in zip(self.response, self.response_mask)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens [B, P], mask [B, P]) right-aligned, pad_id in front of shorter rows."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token (e.g. <|bos|>)")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return tokens.to(device), mask.to(device)


def padding_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, T] (1 on real tokens, padding on either side) -> (positions, segments) [B, T].

    Positions count real tokens (0 at each row's first one; padding in front sits at 0);
    segments put real tokens in one segment and padding in another, so real tokens never
    attend to padding. Feed both to ``Transformer.forward`` to score a generated batch."""
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    segments = torch.where(mask.bool(), TEXT_SEGMENT, PAD_SEGMENT)
    return positions, segments


def next_token_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [B, V] -> logits / temperature with everything outside top-k and top-p set to -inf."""
    scaled = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = scaled.topk(sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first stays)
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scaled


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> the next tokens [B]: argmax, or one draw after temperature, top-k, top-p."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    filtered = next_token_logits(logits, sampling)
    return torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, V], tokens [B] -> log softmax(logits)[token] [B] (without the whole log_softmax)."""
    return logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Iterable[int] = (),
    sampling: Sampling = GREEDY,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_logprobs: bool = True,
    return_logits: bool = False,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Generation:
    """New tokens for each prompt (token id lists); see the module docstring.

    ``generator`` (on the model's device) or ``seed`` makes sampling reproducible; ``on_step``
    gets (tokens [B], active [B] bool: the row emitted a real token) after every step, for
    streaming. The model runs in whatever mode it is in: call ``model.eval()`` first."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    param = next(model.parameters())
    device = param.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    prompt, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = prompt.shape
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    prompt_lengths = prompt_mask.sum(dim=1)  # [B]
    positions, segments = padding_layout(prompt_mask)
    text = torch.full((B, 1), TEXT_SEGMENT, dtype=torch.long, device=device)

    cache = KVCache(model.cfg, B, P + max_new_tokens, device, param.dtype) if use_cache else None
    tokens, seq_positions, seq_segments = prompt, positions, segments  # what the uncached path re-reads

    vocab = token_vocab(model.cfg)

    def last_logits(new, new_positions, new_segments) -> torch.Tensor:  # [B, V] float32 of the last slot
        if cache is not None:
            hidden, _ = model.hidden_states(new, new_positions, new_segments, cache)
        else:
            hidden, _ = model.hidden_states(tokens, seq_positions, seq_segments)
        return model.lm_head(hidden[:, -1])[:, :vocab].float()  # padding rows of the vocabulary are never tokens

    response = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if return_logprobs else None
    step_logits = []
    active = torch.ones(B, dtype=torch.bool, device=device)
    logits = last_logits(prompt, positions, segments)
    for step in range(max_new_tokens):
        if return_logits:
            step_logits.append(logits)
        new = torch.where(active, choose(logits, sampling, generator), pad_id)
        response[:, step] = new
        response_mask[:, step] = active
        if logprobs is not None:  # under the distribution sampled from, before top-k / top-p
            scaled = logits if sampling.greedy else logits / sampling.temperature
            logprobs[:, step] = token_logprobs(scaled, new) * active
        if on_step is not None:
            on_step(new, active.clone())
        active &= ~torch.isin(new, stops)
        if step == max_new_tokens - 1 or not bool(active.any()):
            break
        # a stopped row keeps feeding pad tokens so the batch stays rectangular; they are masked out
        new_positions = (prompt_lengths + step).unsqueeze(1)  # [B, 1]
        if cache is None:
            tokens = torch.cat([tokens, new.unsqueeze(1)], dim=1)
            seq_positions = torch.cat([seq_positions, new_positions], dim=1)
            seq_segments = torch.cat([seq_segments, text], dim=1)
        logits = last_logits(new.unsqueeze(1), new_positions, text)
    stopped = (response_mask.bool() & torch.isin(response, stops)).any(dim=1)
    all_logits = None
    if return_logits:
        all_logits = torch.zeros((B, max_new_tokens, step_logits[0].shape[-1]), dtype=torch.float32, device=device)
        all_logits[:, : len(step_logits)] = torch.stack(step_logits, dim=1)
    return Generation(prompt, prompt_mask, response, response_mask, stopped, logprobs, all_logits)


class TextStream:
    """An ``on_step`` for one row that writes its text as it is produced. BPE tokens can end inside
    a character, so the whole reply is decoded each step and only a settled new suffix is written;
    ``finish()`` writes whatever is left and returns the whole reply."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], object]):
        self.decode, self.write = decode, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        if not bool(active[0]):
            return
        self.ids.append(int(tokens[0]))
        text = self.decode(self.ids)
        if not text.endswith("\ufffd"):  # else an unfinished multi-byte character: wait for its next byte
            self._show(text)

    def finish(self) -> str:
        text = self.decode(self.ids)
        self._show(text)
        return text

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown) :])
            self.shown = text
