"""model/loader.py Prefetcher: the next batch drawn in a thread, with the same batches, order and
resumable state as the loader it wraps (token and SFT loaders). Run: .venv/bin/pytest -q tests/model/test_prefetch.py
"""
from __future__ import annotations

import threading

import pytest
import torch

from lmfoundry.infra.store import Store
from lmfoundry.model.chat_loader import SftLoader
from lmfoundry.model.loader import Prefetcher, TokenLoader, pin
from tests.model.chat_fixtures import commit_sft_data, conversation
from tests.model.token_fixtures import commit_tokens, markov_tokens

SEQ = 8


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("store")))
    tokens = commit_tokens(store, markov_tokens(40, SEQ, 32, seed=0), markov_tokens(8, SEQ, 32, seed=1), 32)
    sft = commit_sft_data(store, [conversation(2, seed=i) for i in range(20)], [conversation(1, seed=100)], 32)
    return store, tokens, sft


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("kind", ["tokens", "sft"])
def test_same_batches_and_exact_state_across_a_resume(stages, kind):
    store, tokens, sft = stages

    def make():  # batch 3 of 40 samples: epochs end inside a batch, as in training
        if kind == "tokens":
            return TokenLoader.from_stage(store, tokens, "train", batch_size=3, seed=5)
        return SftLoader.from_stage(store, sft, "train", batch_size=3, seed=5)

    plain = make()
    expected = [next(plain) for _ in range(30)]
    states = []
    ahead = Prefetcher(make())
    got = []
    for _ in range(12):
        got.append(next(ahead))
        states.append(ahead.state_dict())
    ahead._settle()  # let the draw ahead finish: the wrapped loader is then one batch further on
    assert ahead.loader.state_dict() != ahead.state_dict()
    # resume from the state after batch 7 in a fresh wrapper, and rewind this one to it
    fresh = Prefetcher(make())
    fresh.load_state_dict(states[6])
    got_fresh = [next(fresh) for _ in range(10)]
    ahead.load_state_dict(states[6])
    got_rewound = [next(ahead) for _ in range(10)]
    assert all(same(a, b) for a, b in zip(got, expected[:12]))
    assert all(same(a, b) for a, b in zip(got_fresh, expected[7:17]))
    assert all(same(a, b) for a, b in zip(got_rewound, expected[7:17]))
    if kind == "tokens":
        assert states[0] == {"sample": 3, "seed": 5} and states[6] == {"sample": 21, "seed": 5}
    assert ahead.num_samples == plain.num_samples  # attributes pass through
    ahead.close()
    fresh.close()


def test_the_next_batch_is_drawn_in_another_thread_and_errors_surface(stages):
    store, tokens, _ = stages
    threads = []

    class Recording(TokenLoader):
        def __next__(self):
            threads.append(threading.get_ident())
            if self.position >= 9:
                raise RuntimeError("shard 3 is unreadable")
            return super().__next__()

    loader = Recording.from_stage(store, tokens, "train", batch_size=3, seed=0)
    ahead = Prefetcher(loader)
    next(ahead)
    ahead._settle()
    assert len(threads) == 2 and threading.get_ident() not in threads  # batch 2 was made ahead, off this thread
    next(ahead), next(ahead)
    with pytest.raises(RuntimeError, match="shard 3 is unreadable"):
        next(ahead)
    ahead.close()


def test_pin_keeps_values_and_structure():
    """Pinning itself needs a GPU runtime; on CPU-only hosts the structure walk is what can be
    checked, with a pin that copies (the values and the dict shape must survive)."""
    batch = {"tokens": torch.arange(6).view(2, 3), "n": 3}
    if torch.cuda.is_available():
        out = pin(batch)
        assert out["tokens"].is_pinned()
    else:
        import lmfoundry.model.loader as loader_module

        original = torch.Tensor.pin_memory
        try:
            torch.Tensor.pin_memory = lambda self: self.clone()
            out = loader_module.pin(batch)
        finally:
            torch.Tensor.pin_memory = original
    assert torch.equal(out["tokens"], batch["tokens"]) and out["n"] == 3
