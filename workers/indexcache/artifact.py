"""indexcache.json: the searched F/S patterns, written by the IndexCache report, read by serving.

    text = dumps(doc)                                   # workers.indexcache.report logs it to MLflow
    art = load("runs:/<run_id>/indexcache.json")        # or a run id, a local path or directory
    pattern = art.select(retention=0.25, n_layers=12)   # "FSSSFSSSFSSS"

Layout (version 1, workers.indexcache.report):
    {"version": 1, "model": str, "n_layers": L, "topk", "seq_len", "corpus", "split_seed", "mode",
     "fidelity", "all_f", "trace", "overlap",
     "patterns": {str(retention): {"retention", "searched": {"pattern": str, ...},
                                   "uniform": {"pattern": str, ...}, "distilled"?: {...}}}}

Also accepted on load (files from before the version field, and hand-written ones):
- no "version" key (read as version 1);
- a bare {"pattern": "FSFS..."}; a file with both serves "pattern" unless a retention is asked for;
- a "patterns" entry that is a pattern string, {"pattern": str}, or {"searched": str}.
Serving uses each retention's searched pattern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tuning.indexcache.patterns import validate_pattern
from workers.runtime.artifacts import bad_field, check_version, pick, read_json

VERSION = 1
FILE_NAME = "indexcache.json"


_bad = partial(bad_field, FILE_NAME)


def _checked(pattern, field: str, n_layers: int | None) -> str:
    """`pattern` checked by the one F/S rule, and against the file's n_layers when it has one."""
    try:
        validate_pattern(pattern)
    except ValueError as e:
        # the rule says "pattern=<value>: why"; name the field the value came from instead
        raise ValueError(f"{FILE_NAME}: {field}{str(e).removeprefix('pattern')}") from None
    if n_layers is not None and len(pattern) != n_layers:
        raise _bad(field, pattern, f"has {len(pattern)} layers, the file's n_layers is {n_layers}")
    return pattern


def _searched(entry, field: str, n_layers: int | None) -> str:
    """A "patterns" entry (any accepted shape) -> its searched pattern."""
    if isinstance(entry, dict) and "searched" in entry:
        entry, field = entry["searched"], field + ".searched"
    if isinstance(entry, dict):
        entry, field = entry.get("pattern"), field + ".pattern"
    return _checked(entry, field, n_layers)


@dataclass(frozen=True)
class IndexCacheArtifact:
    """patterns: {str(retention): searched F/S pattern}; pattern: a bare file's one pattern."""

    patterns: dict[str, str] = field(default_factory=dict)
    pattern: str | None = None
    n_layers: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> IndexCacheArtifact:
        """Validate a parsed file (any accepted shape); errors name the field and its value."""
        check_version(d, FILE_NAME, VERSION)
        n_layers = d.get("n_layers")
        if n_layers is not None and (not isinstance(n_layers, int) or n_layers < 1):
            raise _bad("n_layers", n_layers, "must be an int >= 1")
        table = d.get("patterns", {})
        if not isinstance(table, dict):
            raise _bad("patterns", table, "must map str(retention) to an entry")
        patterns = {}
        for key, entry in table.items():
            try:
                float(key)
            except ValueError:
                raise _bad("patterns key", key, "must be a retention number") from None
            patterns[key] = _searched(entry, f"patterns[{key!r}]", n_layers)
        pattern = d.get("pattern")
        if pattern is not None:
            _checked(pattern, "pattern", n_layers)
        if not patterns and pattern is None:
            raise ValueError(f"{FILE_NAME}: holds neither 'pattern' nor 'patterns'")
        return cls(patterns, pattern, n_layers)

    def select(self, retention: float | None, n_layers: int) -> str:
        """The pattern to serve on an n_layers model: the searched one at `retention` (needed when
        the file holds several), or the bare "pattern"."""
        try:
            if self.patterns and (retention is not None or self.pattern is None):
                pattern = pick(self.patterns, retention, "retention")
            else:
                pattern = self.pattern
            return validate_pattern(pattern, n_layers)
        except ValueError as e:
            raise ValueError(f"{FILE_NAME}: {e}") from None


def dumps(doc: dict) -> str:
    """The report's document (layout above, without "version") -> the file's text, validated."""
    doc = {"version": VERSION, **doc}
    IndexCacheArtifact.from_dict(doc)
    return json.dumps(doc, indent=1)


def load(address: str | Path) -> IndexCacheArtifact:
    """A local indexcache.json (or its directory), a run id, or runs:/<run_id>/indexcache.json."""
    return IndexCacheArtifact.from_dict(read_json(address, FILE_NAME))
