"""95% percentile-bootstrap intervals over cases for the rates in results.json and the Markdown tables.

A case is the unit that is resampled, never a probe: a wiki_counterfact case has ~7 locality probes whose
outcomes move together (one edit, one subject), so resampling probes would make the interval too narrow.
Each resample draws `n` cases with replacement and computes the statistic exactly as
`evaluation.measure.aggregate` does: the mean over the drawn cases that have the metric (None/NaN skipped).

Vectorised: a resample is a row of counts (how often each case was drawn), so the means of every metric
of a method are one (resamples × cases) @ (cases × metrics) product. The rows depend only on (n, seed,
n_resamples), so two methods measured on the same n cases share their resamples, which is what makes
`paired_difference_interval` a paired comparison. Pure numpy: `scripts/results_table.py` imports this
without loading torch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache

import numpy as np

# 2,000 resamples: the Monte-Carlo error of a 2.5%/97.5% percentile is then ~0.1-0.2 standard errors of the
# mean (well under the 0.01 shown in the tables), and a 1,000-case method costs a few milliseconds.
N_RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
MIN_CASES = 2  # one case always resamples to itself: a zero-width interval would claim a certainty it lacks
_BLOCK = 2_000_000  # entries of the count matrix built at once (16 MB of float64), so memory stays flat in n

Interval = tuple[float, float]
Values = Sequence[float | None] | np.ndarray


def as_array(values: Values) -> np.ndarray:
    """Per-case values as float64 with NaN where a case lacks the metric (None)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(float)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The resampled case indices, (rows, n) at a time; the same (n, n_resamples, seed) gives the same rows."""
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK // max(1, n))
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n), dtype=np.int32)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each case is drawn in each resample row: one bincount over row-offset indices."""
    rows = idx.shape[0]
    flat = (idx + np.arange(rows)[:, None] * n).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)


@lru_cache(maxsize=2)
def _cached_counts(n: int, n_resamples: int, seed: int) -> tuple[np.ndarray, ...]:
    blocks = tuple(_counts(idx, n) for idx in _index_blocks(n, n_resamples, seed))
    for block in blocks:
        block.setflags(write=False)  # shared by every caller with the same n
    return blocks


def _count_blocks(n: int, n_resamples: int, seed: int) -> Iterable[np.ndarray]:
    """The count rows; kept when they fit one block, since every method of a run has the same n cases."""
    if n * n_resamples <= _BLOCK:
        return _cached_counts(n, n_resamples, seed)
    return (_counts(idx, n) for idx in _index_blocks(n, n_resamples, seed))


def resampled_means(matrix: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, k) means of the k columns of an (n cases, k) matrix, NaN cells skipped as aggregate does.

    A resample in which no drawn case has a metric gives NaN there (dropped when taking percentiles)."""
    n, k = matrix.shape
    present = ~np.isnan(matrix)
    filled, weights = np.where(present, matrix, 0.0), present.astype(float)
    lo, hi = np.nanmin(matrix, axis=0, initial=np.inf), np.nanmax(matrix, axis=0, initial=-np.inf)
    out = []
    for counts in _count_blocks(n, n_resamples, seed):
        sums, drawn = counts @ filled, counts @ weights
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(sums / drawn)
    means = np.vstack(out) if out else np.empty((0, k))
    # a mean lies within [min, max]; clipping removes float drift, so all-equal values give exactly [v, v]
    return np.clip(means, lo, hi) if n else means


def _percentile(stats: np.ndarray, level: float) -> Interval | None:
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return None
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_intervals(columns: Mapping[str, Values], n_resamples: int = N_RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> dict[str, Interval | None]:
    """One interval per metric, all from the same resamples of the same cases (columns of equal length).

    None for a metric fewer than MIN_CASES cases have."""
    names = list(columns)
    if not names:
        return {}
    matrix = np.column_stack([as_array(columns[name]) for name in names])
    if matrix.shape[0] == 0:
        return {name: None for name in names}
    means = resampled_means(matrix, n_resamples, seed)
    have = (~np.isnan(matrix)).sum(axis=0)
    return {name: _percentile(means[:, j], level) if have[j] >= MIN_CASES else None for j, name in enumerate(names)}


def bootstrap_interval(data: Values | Callable[[np.ndarray], float | None], n_cases: int | None = None,
                       n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval | None:
    """The percentile-bootstrap interval of one statistic over cases.

    `data` is either the per-case values (the statistic is aggregate's None-skipping mean), or a function
    of one resample (an int array of `n_cases` case indices) returning the statistic, for anything that is
    not a mean. The function form draws the same resamples as the values form, so for a mean both agree."""
    if not callable(data):
        return bootstrap_intervals({"x": data}, n_resamples, seed, level)["x"]
    if n_cases is None:
        raise ValueError("a statistic given as a function needs n_cases")
    if n_cases < MIN_CASES:
        return None
    stats = [data(row) for idx in _index_blocks(n_cases, n_resamples, seed) for row in idx]
    return _percentile(np.array([np.nan if s is None else s for s in stats], dtype=float), level)


def paired_difference_interval(a_cases: Values, b_cases: Values, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                               level: float = LEVEL) -> Interval | None:
    """The interval of mean(a) - mean(b) for two methods measured on the same cases, aligned by position.

    The case indices are resampled jointly, so what both methods find easy or hard cancels out; each
    side's mean skips its own None cases, as aggregate does, so the difference is that of the two
    reported values. None when either side has fewer than MIN_CASES cases."""
    a, b = as_array(a_cases), as_array(b_cases)
    if a.shape != b.shape:
        raise ValueError(f"paired cases must align: {a.shape[0]} vs {b.shape[0]}")
    if min((~np.isnan(a)).sum(), (~np.isnan(b)).sum()) < MIN_CASES:
        return None
    means = resampled_means(np.column_stack([a, b]), n_resamples, seed)
    return _percentile(means[:, 0] - means[:, 1], level)


def difference_interval(a_cases: Values, b_cases: Values, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> Interval | None:
    """The interval of mean(a) - mean(b) for two independent sets of cases (two slices of a file): each
    side resampled on its own. None when either side has fewer than MIN_CASES cases."""
    a, b = as_array(a_cases), as_array(b_cases)
    if min((~np.isnan(a)).sum(), (~np.isnan(b)).sum()) < MIN_CASES:
        return None
    left = resampled_means(a[:, None], n_resamples, seed)[:, 0]
    right = resampled_means(b[:, None], n_resamples, seed + 1)[:, 0]
    return _percentile(left - right, level)


def within_noise(interval: Interval | None) -> bool:
    """True when the interval of a difference contains 0: not a win either way."""
    return interval is not None and interval[0] <= 0.0 <= interval[1]


def columns_of(scores: Sequence[object], names: Sequence[str]) -> dict[str, list[float | None]]:
    """Per-case columns from CaseScore objects or their JSON dicts (the points/retention files)."""
    get = (lambda s, k: s.get(k)) if scores and isinstance(scores[0], Mapping) else getattr
    return {name: [get(s, name) for s in scores] for name in names}


def case_intervals(scores: Sequence[object], names: Sequence[str], n_resamples: int = N_RESAMPLES,
                   seed: int = SEED, level: float = LEVEL) -> dict[str, list[float] | None]:
    """results.json's "ci" block: [low, high] per metric (JSON lists), None where it cannot be had."""
    found = bootstrap_intervals(columns_of(scores, names), n_resamples, seed, level) if scores else {}
    return {name: list(found[name]) if found.get(name) else None for name in names}


def describe(n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """How the intervals were made, for results.json's top level."""
    return {"kind": "percentile bootstrap over cases", "level": level, "n_resamples": n_resamples, "seed": seed,
            "min_cases": MIN_CASES}
