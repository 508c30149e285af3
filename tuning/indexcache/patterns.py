"""IndexCache F/S patterns: validation, retention arithmetic and the uniform-interleave baseline.

A pattern is a string over {F, S}, one character per layer. An F (Full) layer runs its
lightning indexer and overwrites the shared top-k index buffer; an S (Shared) layer skips
its indexer and reuses the buffer of the nearest preceding F layer. Layer 0 is always F.
"""

from __future__ import annotations

import math


def validate_pattern(pattern: str, n_layers: int | None = None) -> str:
    """Return `pattern` unchanged if it is a legal F/S pattern (of n_layers layers, when given).

    The one F/S rule of the project: the model config, the search and serving all call it. A bad
    pattern raises ValueError("pattern=<value>: <why>"), so callers can prefix where it came from.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern={pattern!r}: must be a non-empty F/S string")
    bad = sorted(set(pattern) - {"F", "S"})
    if bad:
        raise ValueError(f"pattern={pattern!r}: has characters {bad}; only 'F' and 'S' are allowed")
    if pattern[0] != "F":
        raise ValueError(f"pattern={pattern!r}: must start with 'F' (layer 0 always runs its indexer)")
    if n_layers is not None and len(pattern) != n_layers:
        raise ValueError(f"pattern={pattern!r}: has {len(pattern)} layers, the model has {n_layers}")
    return pattern


def validate_retention(retention: float) -> float:
    """Retention is the fraction of layers that keep their indexer: 0 < retention <= 1."""
    if not isinstance(retention, int | float) or not (0.0 < float(retention) <= 1.0):
        raise ValueError(f"retention must be in (0, 1], got {retention!r}")
    return float(retention)


def n_full_layers(retention: float, n_layers: int) -> int:
    """Number of F layers kept at `retention`: max(1, round(retention * N)).

    Rounds half up (floor(x + 0.5)) rather than Python's banker's rounding so that, e.g.,
    retention 1/8 of 20 layers keeps 3 indexers, not 2; the rule must be the same everywhere.
    """
    validate_retention(retention)
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return max(1, min(n_layers, math.floor(retention * n_layers + 0.5)))


def full_layers(pattern: str) -> list[int]:
    """Indices of the F layers of `pattern`."""
    return [i for i, c in enumerate(pattern) if c == "F"]


def flip(pattern: str, layer: int) -> str:
    """`pattern` with layer `layer` switched from F to S (layer 0 can never be flipped)."""
    if layer < 1 or layer >= len(pattern):
        raise ValueError(f"cannot flip layer {layer} of a {len(pattern)}-layer pattern (layer 0 stays F)")
    if pattern[layer] != "F":
        raise ValueError(f"layer {layer} of {pattern!r} is already S")
    return pattern[:layer] + "S" + pattern[layer + 1 :]


def uniform_interleave(n_layers: int, n_full: int) -> str:
    """F every N/r layers starting at layer 0: F at floor(i * N / r) for i in 0..r-1.

    E.g. N=12, r=3 -> FSSSFSSSFSSS.
    """
    if not 1 <= n_full <= n_layers:
        raise ValueError(f"n_full must be in [1, {n_layers}], got {n_full}")
    keep = {(i * n_layers) // n_full for i in range(n_full)}
    return "".join("F" if i in keep else "S" for i in range(n_layers))


def serving_layer(pattern: str) -> list[int]:
    """For every layer, the F layer whose top-k indices it attends with."""
    out, last = [], 0
    for i, c in enumerate(validate_pattern(pattern)):
        if c == "F":
            last = i
        out.append(last)
    return out


def indexer_fraction_removed(pattern: str) -> float:
    """Fraction of indexer work removed relative to all-F.

    Every layer's indexer costs the same (same Hi, Di and context length), so the saved
    fraction is the share of S layers.
    """
    return pattern.count("S") / len(pattern)
