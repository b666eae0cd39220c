"""Tier hysteresis (`transport.base.TierTracker`) with given samples: no timing involved."""

from __future__ import annotations

import pytest

from transport.base import TIER_BOUNDS_US, TierTracker, TransportTier, tier_interval_us
from transport.errors import TransportError

US = 1e-6
High, Medium, Standard, Basic = (TransportTier.HighPerformance, TransportTier.MediumPerformance,
                                 TransportTier.Standard, TransportTier.Basic)


def feed(tracker: TierTracker, *samples_us: float) -> list[TransportTier]:
    return [tracker.update(us * US) for us in samples_us]


def test_intervals_follow_the_bounds():
    assert tier_interval_us(High) == (0.0, 100.0)
    assert tier_interval_us(Medium) == (100.0, 200.0)
    assert tier_interval_us(Standard) == (200.0, 500.0)
    assert tier_interval_us(Basic) == (500.0, float("inf"))
    assert [b for b, _ in TIER_BOUNDS_US] == [100.0, 200.0, 500.0]


def test_first_sample_sets_the_tier():
    assert feed(TierTracker(), 86) == [High]
    assert feed(TierTracker(), 292) == [Standard]


def test_one_noisy_sample_never_flips():
    # loopback as measured here: 86-292 µs, around the 100 and 200 µs bounds
    t = TierTracker(margin=0.25, confirm=3)
    assert feed(t, 86, 292, 90, 292, 292, 95, 130, 140) == [High] * 8


def test_samples_within_the_margin_do_not_count():
    t = TierTracker(margin=0.25, confirm=3)
    # 124 µs is beyond High's bound (100) but within 25 %: the link stays High
    assert feed(t, 80, 124, 124, 124, 124) == [High] * 5


def test_consecutive_samples_beyond_the_margin_move_to_their_median_tier():
    t = TierTracker(margin=0.25, confirm=3)
    assert feed(t, 80, 300, 900, 310) == [High, High, High, Standard]  # median 310 µs
    assert t.update(280 * US) is Standard  # inside: no count


def test_an_inside_sample_restarts_the_count():
    t = TierTracker(margin=0.25, confirm=3)
    assert feed(t, 80, 300, 300, 90, 300, 300) == [High] * 6
    assert t.update(300 * US) is Standard


def test_downward_moves_need_the_margin_too():
    t = TierTracker(margin=0.25, confirm=2)
    assert feed(t, 300) == [Standard]
    assert feed(t, 160, 160) == [Standard, Standard]  # 160 >= 200 * 0.75: inside
    assert feed(t, 40, 50) == [Standard, High]


def test_confirm_one_without_margin_is_the_plain_tier():
    t = TierTracker(margin=0.0, confirm=1)
    for us in (50, 150, 250, 700, 99, 100, 499, 500):
        assert t.update(us * US) is TransportTier.from_latency(us * US)


def test_bad_parameters_are_refused():
    with pytest.raises(TransportError, match="confirm >= 1"):
        TierTracker(confirm=0)
    with pytest.raises(TransportError, match="margin >= 0"):
        TierTracker(margin=-0.1)
