"""Latency summaries: percentiles of measured samples, and of the Prometheus histograms a server exports.

:func:`scrape_histograms` reads every histogram of a ``/metrics`` text; subtracting two scrapes
(``after - before``) gives what happened between them; :meth:`ScrapedHistogram.quantile` estimates a
percentile the way Prometheus' ``histogram_quantile`` does (linear inside the bucket that holds it), and
:meth:`ScrapedHistogram.bucket_of` names that bucket: the estimate's resolution.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank; NaN when there are none."""
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


@dataclass(frozen=True)
class ScrapedHistogram:
    """One histogram: ``bounds`` the buckets' upper bounds (ascending, ``inf`` last), ``counts`` the
    cumulative count of each bucket (``counts[-1] == count``), ``sum`` of the observed values."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    @property
    def mean(self) -> float:
        """The exact mean of the observations (NaN when there are none)."""
        return self.sum / self.count if self.count else float("nan")

    def __sub__(self, before: ScrapedHistogram) -> ScrapedHistogram:
        """The observations made since ``before`` (an earlier scrape of the same histogram)."""
        if self.bounds != before.bounds:
            raise ValueError("the two scrapes have different buckets")
        return ScrapedHistogram(self.bounds, tuple(a - b for a, b in zip(self.counts, before.counts)),
                         self.sum - before.sum)

    def quantile(self, q: float) -> float:
        """Estimated ``q``-th percentile (0-100): linear inside its bucket (the first bucket starts at 0);
        in the ``inf`` bucket, the last finite bound. NaN when there are no observations."""
        if not self.count:
            return float("nan")
        rank = q / 100 * self.count
        i = bisect.bisect_left(self.counts, rank)
        i = min(i, len(self.bounds) - 1)
        if math.isinf(self.bounds[i]):
            return self.bounds[i - 1] if i > 0 else float("nan")
        lo = self.bounds[i - 1] if i > 0 else 0.0
        below = self.counts[i - 1] if i > 0 else 0.0
        inside = self.counts[i] - below
        return lo + (self.bounds[i] - lo) * ((rank - below) / inside if inside else 1.0)

    def bucket_of(self, value: float) -> tuple[float, float]:
        """``(lower, upper)`` bounds of the bucket that holds ``value``."""
        i = min(bisect.bisect_left(self.bounds, value), len(self.bounds) - 1)
        return (self.bounds[i - 1] if i > 0 else 0.0), self.bounds[i]


def scrape_histograms(text: str) -> dict[str, ScrapedHistogram]:
    """Every unlabelled histogram of a Prometheus text exposition, by family name (``_bucket``, ``_sum``
    and ``_count`` samples gathered)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        samples = family.samples
        buckets = sorted((float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket"))
        total = next((s.value for s in samples if s.name.endswith("_sum")), 0.0)
        out[family.name] = ScrapedHistogram(tuple(b for b, _ in buckets), tuple(c for _, c in buckets), total)
    return out


__all__ = ["ScrapedHistogram", "percentile", "scrape_histograms"]
