"""Loaders of the post-training formats: packed SFT rows and padded preference pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmfoundry.infra.store import Store
from lmfoundry.model.chat_loader import PreferenceLoader, SftLoader, segment_ids
from lmfoundry.model.loader import LoaderError, TokenLoader
from tests.model.chat_fixtures import ASSISTANT, BOS, END, PAD, USER, commit_preference_data, commit_sft_data, conversation, pack, separable_pairs

SEQ = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(str(tmp_path_factory.mktemp("store")))


def test_packing_fixture_follows_the_contract():
    rows = pack([conversation(1, seed=0), conversation(2, seed=1), conversation(1, seed=2)], SEQ)
    tokens, mask, positions = rows["tokens"], rows["loss_mask"], rows["positions"]
    starts = positions == 0
    assert (tokens[starts & (tokens != PAD)] == BOS).all()  # every conversation starts with <|bos|> at position 0
    assert set(tokens[mask == 1].tolist()) - set(range(7, 64)) <= {END}  # targets: assistant words and <|end|>
    assert not mask[tokens == USER].any() and not mask[tokens == ASSISTANT].any() and not mask[tokens == PAD].any()
    seg = segment_ids(torch.from_numpy(positions))
    assert seg[0, 0] == 1 and (torch.diff(seg, dim=1) >= 0).all()


def test_sft_loader_walks_tokenloaders_order_and_resumes(store):
    ref = commit_sft_data(store, [conversation(2, seed=i) for i in range(30)], [conversation(1, seed=100 + i) for i in range(5)], SEQ)
    loader = SftLoader.from_stage(store, ref, "train", batch_size=3, seed=7)
    plain = TokenLoader.from_stage(store, ref, "train", batch_size=3, seed=7)
    first = [next(loader) for _ in range(4)]
    assert all(torch.equal(b["tokens"], next(plain)) for b in first)
    for batch in first:
        assert set(batch) == {"tokens", "loss_mask", "positions"} and all(v.shape == (3, SEQ + 1) for v in batch.values())
        starts = batch["positions"] == 0
        assert ((batch["tokens"][starts] == BOS) | (batch["tokens"][starts] == PAD)).all()  # columns stay aligned
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    again = SftLoader.from_stage(store, ref, "train", batch_size=3, seed=7)
    again.load_state_dict(state)
    for want in expected:
        got = next(again)
        assert all(torch.equal(got[k], want[k]) for k in want)
    val = SftLoader.from_stage(store, ref, "val", batch_size=2, shuffle=False)
    assert sum(len(b["tokens"]) for b in val.eval_batches()) == val.num_samples


def test_preference_loader_pads_orders_and_resumes(store):
    train, val = separable_pairs(21, seed=0), separable_pairs(5, seed=1)
    ref = commit_preference_data(store, train, val, SEQ)
    loader = PreferenceLoader.from_stage(store, ref, "train", batch_size=4, seed=3)
    order = np.random.default_rng(3).permutation(21)
    batch = next(loader)
    assert batch["index"].tolist() == order[:4].tolist()
    tokens, mask, lengths = batch["tokens"], batch["mask"], batch["lengths"]
    assert tokens.shape[0] == 8 and tokens.shape[1] == lengths.max()
    for row in range(8):
        n = lengths[row]
        assert tokens[row, n - 1] == END and (tokens[row, n:] == PAD).all() and (mask[row, n:] == 0).all()
        assert mask[row, n - 1] == 1  # the last token (<|end|>) is scored
    # row i and row i + 4 are one pair: the same prompt, then different replies
    for i in range(4):
        prompt = int((tokens[i] == ASSISTANT).nonzero()[0])
        assert torch.equal(tokens[i, :prompt], tokens[i + 4, :prompt])
    state = loader.state_dict()
    want = [next(loader)["index"] for _ in range(6)]  # crosses the epoch boundary
    resumed = PreferenceLoader.from_stage(store, ref, "train", batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["index"], w) for w in want)
    # two ranks of batch 2 see what one rank of batch 4 sees
    ranks = [PreferenceLoader.from_stage(store, ref, "train", batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert torch.cat([next(r)["index"] for r in ranks]).tolist() == order[:4].tolist()
    seen = torch.cat([b["index"] for b in PreferenceLoader.from_stage(store, ref, "val", batch_size=2, shuffle=False).eval_batches()])
    assert seen.tolist() == list(range(5))


def test_preference_loader_rejects_other_data(store):
    sft = commit_sft_data(store, [conversation(1, seed=i) for i in range(3)], [conversation(1, seed=9)], SEQ)
    with pytest.raises(LoaderError, match="format 'sft', expected 'preference'"):
        PreferenceLoader.from_stage(store, sft)
