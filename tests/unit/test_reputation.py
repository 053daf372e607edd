"""The decayed pass rate behind edge quarantine (admission.services.reputation): pure arithmetic, no
database."""

from __future__ import annotations

import math

import pytest

from admission.services.reputation import SAMPLE_MAX_BYTES, Tally, add, bounded_sample, decay, quarantines


def run(verdicts: list[bool], half_life: float, start: Tally | None = None) -> Tally:
    t = start or Tally()
    for v in verdicts:
        t = add(t, v, half_life)
    return t


def test_a_verdict_weighs_half_after_the_half_life() -> None:
    assert decay(10) ** 10 == pytest.approx(0.5)
    # one failure followed by h passes counts half as much as a failure just now
    old_fail = run([False] + [True] * 10, 10)
    new_fail = run([True] * 10 + [False], 10)
    missing_old = old_fail.weight - old_fail.passed_weight
    missing_new = new_fail.weight - new_fail.passed_weight
    assert missing_old == pytest.approx(0.5 * missing_new)
    with pytest.raises(ValueError):
        decay(0)


def test_rate_matches_the_weighted_mean() -> None:
    verdicts = [True, False, True, True, False, True, True, True]
    d = decay(4)
    ws = [d ** (len(verdicts) - 1 - i) for i in range(len(verdicts))]
    expected = sum(w for w, v in zip(ws, verdicts, strict=True) if v) / sum(ws)
    assert run(verdicts, 4).rate == pytest.approx(expected)
    assert Tally().rate is None
    assert run([True] * 30, 50).rate == 1.0 and run([False] * 30, 50).rate == 0.0


def test_a_clean_edge_that_turns_falls_under_the_threshold_after_h_log2_1_over_t_failures() -> None:
    h, t = 50.0, 0.8
    clean = run([True] * 2000, h)  # the weight has reached its steady state, 1 / (1 - d)
    assert clean.weight == pytest.approx(1 / (1 - decay(h)), rel=1e-6)
    n = math.ceil(h * math.log2(1 / t))  # 17
    assert run([False] * (n - 1), h, clean).rate >= t
    assert run([False] * n, h, clean).rate < t


def test_no_verdict_before_the_minimum() -> None:
    assert not quarantines(19, 0.0, 20, 0.8)
    assert quarantines(20, 0.0, 20, 0.8)
    assert not quarantines(20, 0.8, 20, 0.8)  # at the threshold: not under it
    assert not quarantines(100, None, 20, 0.8)


def test_samples_are_bounded() -> None:
    small = {"request": "x", "edge": "a", "core": "b"}
    assert bounded_sample(small) == small and bounded_sample(None) is None
    big = bounded_sample({"request": "é" * SAMPLE_MAX_BYTES})
    assert big is not None and big["truncated"] is True
    assert len(big["json"].encode()) <= SAMPLE_MAX_BYTES
