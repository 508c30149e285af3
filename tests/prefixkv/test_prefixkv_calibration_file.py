"""prefixkv.json round trip, validation, the cache it builds; the reduction over samples."""

import json

import numpy as np
import pytest

from tuning.prefixkv.search import RATIO_GRID
from workers.prefixkv import artifact
from workers.prefixkv.calibrate import bootstrap_se, reduce_samples


def _data(n_layers=3):
    fr = [[min(1.0, r * (0.5 + i / (n_layers - 1))) for i in range(n_layers)] for r in RATIO_GRID]
    entry = {"fractions": fr, "bootstrap_se": fr, "sample_sd": fr}
    return {
        "version": 1, "model": "x", "n_layers": n_layers, "n_sink": 2, "context": 100, "samples": 2,
        "ratios": list(RATIO_GRID), "default_score": "window", "window": 8, "scores": {"window": entry},
    }  # fmt: skip


def test_round_trip_and_cache(tmp_path):
    p = artifact.write(_data(), tmp_path / "prefixkv.json")
    cal = artifact.load(tmp_path)  # a directory holding prefixkv.json works too
    assert cal.fractions()[0.2] == pytest.approx(_data()["scores"]["window"]["fractions"][3])
    cache = cal.cache(0.25)
    assert cache.n_sink == 2 and cache.score.mode == "window" and cache.score.window == 8
    assert cache.fractions.shape == (3,) and cache.ratio == 0.25
    with pytest.raises(ValueError, match="no calibration for score"):
        cal.fractions("sum")
    assert json.loads(p.read_text())["version"] == 1
    assert cal.check_layers(3) is cal
    with pytest.raises(ValueError, match="calibrated for 3 layers, the model has 4"):
        cal.check_layers(4)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": 2}, "version"),
        ({"n_layers": 4}, "shape"),
        ({"n_sink": -1}, r"prefixkv.json: n_sink=-1: must be an int >= 0"),
        ({"default_score": "sum"}, r"default_score='sum': must be one of the scores \['window'\]"),
        ({"window": None, "scores": None}, None),
    ],
)
def test_malformed_files_rejected(tmp_path, change, match):
    d = _data()
    d.update(change)
    if match is None:
        del d["scores"]
        match = "missing 'scores'"
    (tmp_path / "prefixkv.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        artifact.load(tmp_path / "prefixkv.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        artifact.load(tmp_path / "other.json")


def test_reduce_is_order_free_and_bootstrap_spread():
    rng = np.random.default_rng(0)
    res = {}
    for i in range(6):
        fr = rng.random((len(RATIO_GRID), 2)).tolist()
        res[i] = {"sum": {"fractions": fr, "curves": [[0.0, 1.0]] * 2, "steps": [3], "kth_agrees": True}}
    shuffled = {k: res[k] for k in (3, 0, 5, 1, 4, 2)}
    a, b = reduce_samples(res, "sum", 50, 0), reduce_samples(shuffled, "sum", 50, 0)
    assert np.array_equal(a["fractions"], b["fractions"]) and np.array_equal(a["bootstrap_se"], b["bootstrap_se"])
    sd = np.array([res[i]["sum"]["fractions"] for i in range(6)]).std(0, ddof=1)
    # The bootstrap SE of a mean is about sd / sqrt(n).
    assert np.allclose(a["bootstrap_se"], sd / np.sqrt(6), rtol=0.6)
    assert np.isnan(bootstrap_se(np.ones((1, 3)), 10, 0)).all()
    with pytest.raises(ValueError, match="no calibration samples"):
        reduce_samples({}, "sum")
