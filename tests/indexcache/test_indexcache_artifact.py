"""indexcache.json (workers.indexcache.artifact): round trip, the retention choice, the shapes accepted, errors naming the field."""

from __future__ import annotations

import json

import pytest

from workers.indexcache import artifact


def _doc() -> dict:
    """The report's layout for a 4-layer model at two retentions (workers.indexcache.report)."""
    return {
        "model": "tiny",
        "n_layers": 4,
        "patterns": {
            "0.5": {"retention": 0.5, "searched": {"pattern": "FFSS"}, "uniform": {"pattern": "FSFS"}},
            "0.25": {"retention": 0.25, "searched": {"pattern": "FSSS"}, "uniform": {"pattern": "FSSS"}},
        },
        "trace": [],
    }


def test_round_trip_and_retention_choice(tmp_path):
    text = artifact.dumps(_doc())
    assert json.loads(text) == {"version": 1, **_doc()}
    (tmp_path / "indexcache.json").write_text(text)
    art = artifact.load(tmp_path)  # a directory holding indexcache.json works too
    assert art.select(0.5, 4) == "FFSS" and art.select(0.25, 4) == "FSSS"
    with pytest.raises(ValueError, match=r"retention=0.125: entries only for retention \['0.25', '0.5'\]"):
        art.select(0.125, 4)
    with pytest.raises(ValueError, match="choose one with retention="):
        art.select(None, 4)
    with pytest.raises(ValueError, match="pattern='FFSS': has 4 layers, the model has 6"):
        art.select(0.5, 6)
    with pytest.raises(FileNotFoundError, match="no such file"):
        artifact.load(tmp_path / "other.json")


def test_loose_shapes_still_load():
    bare = artifact.IndexCacheArtifact.from_dict({"pattern": "FSFS"})
    assert bare.select(None, 4) == "FSFS"
    both = artifact.IndexCacheArtifact.from_dict({"pattern": "FFFF", "patterns": {"0.5": "FSFS"}})
    assert both.select(None, 4) == "FFFF" and both.select(0.5, 4) == "FSFS"
    shapes = {"patterns": {"0.5": {"pattern": "FSFS"}, "0.25": {"searched": "FSSS"}}}
    art = artifact.IndexCacheArtifact.from_dict(shapes)
    assert art.select(0.5, 4) == "FSFS" and art.select(0.25, 4) == "FSSS"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": 2}, r"indexcache.json: version=2: this reader knows version 1"),
        (
            {"patterns": {"0.5": {"searched": {"pattern": "SFSS"}}}},
            r"indexcache.json: patterns\['0.5'\].searched.pattern='SFSS': must start with 'F'",
        ),
        ({"patterns": {"0.5": "FXSS"}}, r"patterns\['0.5'\]='FXSS': has characters \['X'\]"),
        ({"patterns": {"0.5": {"searched": {"pattern": "FSF"}}}}, r"'FSF': has 3 layers, the file's n_layers is 4"),
        ({"patterns": {"half": "FSFS"}}, r"patterns key='half': must be a retention number"),
        ({"n_layers": 0}, r"n_layers=0: must be an int >= 1"),
        ({"patterns": {}}, r"holds neither 'pattern' nor 'patterns'"),
    ],
)
def test_bad_files_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        artifact.IndexCacheArtifact.from_dict({**_doc(), **change})
    with pytest.raises(ValueError, match=match):
        artifact.dumps({**_doc(), **change})  # the writer checks the same schema
