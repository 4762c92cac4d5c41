"""Latency summaries (eagle_engine.tools.latency): percentiles of samples, and of Prometheus histograms
scraped from a real registry's text, as ``histogram_quantile`` estimates them."""

import math
import random

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, Histogram, generate_latest  # noqa: E402

from eagle_engine.tools.latency import ScrapedHistogram, percentile, scrape_histograms  # noqa: E402

BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.5)


def _scrape(values):
    registry = CollectorRegistry()
    h = Histogram("lat_seconds", "test", buckets=BUCKETS, registry=registry)
    for v in values:
        h.observe(v)
    return scrape_histograms(generate_latest(registry).decode())["lat_seconds"]


def test_percentile_is_nearest_rank():
    assert percentile([], 50) != percentile([], 50)  # NaN
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(101)), 99) == 99 and percentile([5.0], 99) == 5.0


def test_scrape_reads_the_buckets_sum_and_count():
    h = _scrape([0.005, 0.015, 0.015, 0.3, 2.0])
    assert h.bounds == (*BUCKETS, math.inf)
    assert h.counts == (1, 3, 3, 3, 4, 5) and h.count == 5
    assert h.sum == pytest.approx(2.335) and h.mean == pytest.approx(0.467)


def test_quantile_interpolates_inside_its_bucket():
    h = ScrapedHistogram((0.01, 0.02, math.inf), (2, 6, 8), 0.0)
    assert h.quantile(25) == pytest.approx(0.01)  # rank 2: the first bucket's top
    assert h.quantile(50) == pytest.approx(0.015)  # rank 4: halfway through (0.01, 0.02]
    assert h.quantile(12.5) == pytest.approx(0.005)  # rank 1: halfway through [0, 0.01]
    assert h.quantile(99) == 0.02  # in the +Inf bucket: the last finite bound
    assert math.isnan(ScrapedHistogram((0.01, math.inf), (0, 0), 0.0).quantile(50))
    assert h.bucket_of(0.015) == (0.01, 0.02) and h.bucket_of(0.01) == (0.0, 0.01)


def test_a_level_is_the_difference_of_two_scrapes():
    """Every estimate falls in the bucket that holds the true percentile of the samples of the level."""
    rng = random.Random(0)
    early = [rng.uniform(0, 0.5) for _ in range(50)]
    level = [rng.expovariate(40) for _ in range(400)]
    h = _scrape(early + level) - _scrape(early)
    assert h.count == len(level) and h.mean == pytest.approx(sum(level) / len(level))
    for q in (10, 50, 90, 99):
        lo, hi = h.bucket_of(percentile(level, q))
        assert lo <= h.quantile(q) <= hi
    with pytest.raises(ValueError, match="different buckets"):
        h - ScrapedHistogram((1.0, math.inf), (0, 0), 0.0)
