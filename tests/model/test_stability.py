"""model/stability.py: the spike rule on planted sequences, hand-computed thresholds, state round trip."""
from __future__ import annotations

import math

import pytest

from lmfoundry.model.stability import StabilityMonitor


def feed(monitor: StabilityMonitor, values: list[float], metric: str = "loss", start: int = 1):
    """Observe values at consecutive steps; the first spike or None."""
    for i, value in enumerate(values):
        spike = monitor.observe(start + i, {metric: value})
        if spike is not None:
            return spike
    return None


def test_threshold_is_mean_plus_k_sigma_of_the_window():
    monitor = StabilityMonitor(window=4, sigmas=3.0, warmup_steps=0, min_history=4, min_ratio=1.0)
    # at step 5 the window is 1..4: mean 2.5, std sqrt(1.25), threshold 2.5 + 3 * 1.118 = 5.854 > 5
    assert feed(monitor, [1.0, 2.0, 3.0, 4.0, 5.0]) is None  # the window slides: 2, 3, 4, 5 remain
    threshold, mean, std = monitor.threshold("loss")
    assert (mean, std) == pytest.approx((3.5, math.sqrt(1.25))) and threshold == pytest.approx(3.5 + 3 * math.sqrt(1.25))
    assert monitor.observe(6, {"loss": 6.8}) is None  # just below 6.854
    # window 3, 4, 5, 6.8: mean 4.7, std sqrt(1.97) = 1.4036, threshold 8.911
    spike = monitor.observe(7, {"loss": 9.0})
    assert spike is not None and spike.step == 7 and spike.metric == "loss" and spike.value == 9.0
    assert (spike.mean, spike.std, spike.threshold) == pytest.approx((4.7, math.sqrt(1.97), 4.7 + 3 * math.sqrt(1.97)))
    assert "loss 9 at step 7" in spike.describe()
    assert monitor.observe(8, {"loss": 8.9}) is None  # 9.0 did not enter: the same window judges 8.9


def test_a_spike_does_not_enter_the_history_and_min_ratio_guards_flat_curves():
    monitor = StabilityMonitor(window=5, sigmas=3.0, warmup_steps=0, min_history=3, min_ratio=1.5)
    assert feed(monitor, [2.0, 2.0, 2.0]) is None
    # sigma 0: mean + 3 sigma = 2.0, but the value must also reach 1.5 x mean = 3.0
    spike = monitor.observe(4, {"loss": 3.1})
    assert spike is not None and (spike.threshold, spike.std) == (3.0, 0.0)
    assert monitor.observe(5, {"loss": 2.9}) is None  # below 1.5 x mean: routine noise on a flat curve
    # 3.1 was not added; with 2.9 in: mean 2.225, std 0.3897, threshold max(3.3375, 3.394) = 3.394
    assert monitor.state_dict()["loss"] == [2.0, 2.0, 2.0, 2.9]
    assert monitor.threshold("loss")[0] == pytest.approx(2.225 + 3 * math.sqrt(0.151875))


def test_warmup_and_short_history_never_fire_and_grad_norm_is_watched_too():
    monitor = StabilityMonitor(window=10, sigmas=1.0, warmup_steps=3, min_history=3, min_ratio=1.0)
    # steps 1-3 are warm-up: even a huge value is neither checked nor remembered
    assert feed(monitor, [1.0, 1e6, 5.0]) is None and monitor.state_dict()["loss"] == []
    assert feed(monitor, [1.0, 1.1], start=4) is None  # two values: too short to judge a third
    assert monitor.observe(6, {"loss": 1.0, "grad_norm": None}) is None  # a missing norm is skipped
    for step in range(7, 10):
        assert monitor.observe(step, {"loss": 1.0, "grad_norm": 0.5}) is None
    spike = monitor.observe(10, {"loss": 1.0, "grad_norm": 9e12})
    assert spike.metric == "grad_norm" and spike.value == 9e12 and spike.mean == pytest.approx(0.5)
    assert monitor.state_dict()["loss"] == [1.0, 1.1, 1.0, 1.0, 1.0, 1.0]  # the spiking step added nothing


def test_the_issues_diverging_run_is_caught_and_noise_is_not():
    """Planted curves. A noisy falling loss with noisy grad norms never fires. The issue's run
    (loss 8 -> 880 and grad norm 1 -> 9e12, geometrically over 150 steps, after 60 healthy
    steps) fires on the grad norm within a few steps, while the loss is still near 8."""
    import random

    rng = random.Random(0)
    normal = StabilityMonitor()
    for step in range(1, 501):
        metrics = {"loss": 6.0 * math.exp(-step / 300) + rng.gauss(0, 0.15), "grad_norm": 0.7 * (1 + rng.gauss(0, 0.1))}
        assert normal.observe(step, metrics) is None, (step, metrics)
    # the defaults (k 8, 3x the mean) let a smooth 22 %/step climb widen sigma as fast as it grows;
    # k = 6 catches the onset (a rolling window only ever catches the onset of a smooth climb)
    monitor = StabilityMonitor(sigmas=6.0)
    for step in range(1, 61):
        assert monitor.observe(step, {"loss": 8.0 + rng.gauss(0, 0.1), "grad_norm": 1.0 + rng.gauss(0, 0.1)}) is None
    for i in range(151):
        spike = monitor.observe(61 + i, {"loss": 8.0 * 110 ** (i / 150), "grad_norm": (9e12) ** (i / 150)})
        if spike is not None:
            break
    assert spike.metric == "grad_norm" and spike.step <= 61 + 8 and spike.value < 10, spike
    assert 8.0 * 110 ** ((spike.step - 61) / 150) < 10  # caught long before the loss reached 880


def test_state_round_trip_resumes_the_same_decisions():
    values = [1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 0.95, 1.0, 1.1, 0.9, 1.0, 1.0]
    a = StabilityMonitor(window=8, sigmas=3.0, warmup_steps=2, min_history=4)
    feed(a, values)
    b = StabilityMonitor(window=8, sigmas=3.0, warmup_steps=2, min_history=4)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and len(b.state_dict()["loss"]) == 8  # the window's size, not all values
    for value in (1.1, 1.6, 2.5):
        assert (a.observe(20, {"loss": value}) is None) == (b.observe(20, {"loss": value}) is None)
    with pytest.raises(ValueError, match="min_history"):
        StabilityMonitor(window=4, min_history=5)


def test_the_defaults_catch_an_abrupt_jump():
    """A too-high rate that bites at once: the grad norm jumps 8x (1.3 -> 7.7 seen here) and the loss 3x."""
    monitor = StabilityMonitor()
    for step in range(1, 41):
        assert monitor.observe(step, {"loss": 3.5 + 0.1 * math.sin(step), "grad_norm": 1.0 + 0.2 * math.sin(3 * step)}) is None
    assert monitor.observe(41, {"loss": 3.6, "grad_norm": 7.7}).metric == "grad_norm"
    assert monitor.observe(41, {"loss": 11.0, "grad_norm": 1.0}).metric == "loss"
