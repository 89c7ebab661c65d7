"""What the model tests share: one torch thread (two shared cores; small tensors run fastest on
one) and one DeepSpeed rank in this process (what a launcher sets up), undone afterwards."""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@contextmanager
def one_rank_world():
    """A one-rank gloo world on CPU in this process; the environment and threads restored after."""
    from lmfoundry.model.engine import init_single_process

    saved = dict(os.environ)
    with single_thread():
        os.environ["DS_ACCELERATOR"] = "cpu"
        init_single_process()
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)
