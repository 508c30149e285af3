"""Summary statistics of per-example values, and the markdown tables they are reported in.

The standard error is that of a mean over n examples: the sample standard deviation
(ddof = 1) over sqrt(n), NaN for n < 2. Two settings scored on the same examples are
compared as a paired difference: the mean and standard error of d_i = a_i - b_i, which is
much tighter than the two separate errors when the examples vary more than the settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean; (NaN, NaN) for no values, SE NaN for one."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(vals) / n
    if n == 1:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in vals) / (n - 1)
    return m, math.sqrt(var / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of a - b over the same examples (a[i] and b[i] score example i)."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired comparison needs equal non-empty lengths, got {len(a)} and {len(b)}")
    return mean_se(float(x) - float(y) for x, y in zip(a, b))


Z95 = 1.96  # two-sided 95% normal interval on a mean over many examples


def ci95(diff: float, se: float) -> tuple[float, float]:
    """The 95% interval of a paired difference (normal: the examples are many)."""
    return diff - Z95 * se, diff + Z95 * se


VERDICTS = ("met", "not met", "within noise")


def verdict(diff: float, se: float, *, higher_is_better: bool = False, margin: float = 0.0) -> str:
    """The one verdict rule of the docs and the demo, for diff = method - baseline (paired).

    The claim is "the method is better than the baseline" (margin 0) or "no worse than it by more
    than `margin`" (a non-inferiority margin, in the metric's units): "met" if the whole 95% CI is
    on the claim's side of the margin, "not met" if the whole CI is on the other side, otherwise
    "within noise". An SE of 0 (a deterministic measurement) makes the CI a point.
    """
    if math.isnan(diff) or math.isnan(se):
        return "within noise"
    lo, hi = ci95(-diff, se) if higher_is_better else ci95(diff, se)  # as "lower is better"
    if hi < margin:
        return "met"
    if lo > margin:
        return "not met"
    return "within noise"


def _cell(value, number: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, number) if isinstance(value, float) else str(value)


def markdown_table(
    rows: Iterable[Mapping], columns: Sequence[str], *, header: Sequence[str] | None = None, number: str = ".4g"
) -> str:
    """`columns` of `rows` as a markdown table headed by `header` (default: the column names).

    Floats are written with the format spec `number`; a missing key, None or NaN is an empty cell.
    """
    header = list(columns) if header is None else list(header)
    if len(header) != len(columns):
        raise ValueError(f"header has {len(header)} names for {len(columns)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c), number) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
