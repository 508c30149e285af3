"""kv_precision.json (workers.kvtuner.artifact): round trips, the budget choice, the shapes accepted, errors naming the field."""

from __future__ import annotations

import json

import pytest

from workers.caches.precision import KVQuantConfig
from workers.kvtuner import artifact


def test_kv_precision_json_roundtrip(tmp_path):
    cfg = KVQuantConfig(("K8V4", "K2V4"), mode="per_token", group=16, residual=8)
    path = artifact.write_map(tmp_path / "kv_precision.json", cfg, budget=5.0)
    back = artifact.load_config(path)
    assert back == cfg
    entry = artifact.map_entry(back)
    assert entry["equivalent_bits"] == 4.5 and entry["mixed"] is True
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["budget"] == 5.0 and doc["group_size"] == 16
    with pytest.raises(FileNotFoundError, match="no such file"):
        artifact.load_config(tmp_path / "missing.json")


def test_multi_budget_file(tmp_path):
    a, b = KVQuantConfig(("K8V4", "KV4")), KVQuantConfig(("K4V2", "K4V2"))
    path = tmp_path / "kv_precision.json"
    path.write_text(
        json.dumps({"method": "kvtuner", "maps": {"5.0": artifact.map_entry(a), "3.0": artifact.map_entry(b)}})
    )
    assert artifact.load_config(path, budget=3.0) == b
    with pytest.raises(ValueError, match="budget"):
        artifact.load_config(path, budget=4.0)
    with pytest.raises(ValueError, match="choose one with budget="):
        artifact.load_config(path)


def test_write_budgets_round_trip(tmp_path):
    maps = {4.0: KVQuantConfig(("K8V4", "KV4")), 3.0: KVQuantConfig(("K4V2", "K2V4"))}
    path = artifact.write_budgets(
        tmp_path / artifact.FILE_NAME, {b: artifact.map_entry(qc, budget=b) for b, qc in maps.items()}
    )
    doc = json.loads(path.read_text())
    assert path.name == "kv_precision.json" and doc["version"] == 1 and sorted(doc["maps"]) == ["3.0", "4.0"]
    art = artifact.load(tmp_path)  # a directory holding kv_precision.json
    for b, qc in maps.items():
        assert art.select(b).config() == qc


def test_loose_shapes_still_load():
    pairs = {"layers": [[8, 4], [4, 16]], "group": 8, "residual_window": 4}
    m = artifact.KVPrecisionArtifact.from_dict(pairs).select(None)
    assert (m.k_bits, m.v_bits, m.mode, m.group, m.residual) == ((8, 4), (4, 16), "kivi", 8, 4)
    flat = artifact.KVPrecisionArtifact.from_dict({"k_bits": [2, 2], "v_bits": [4, 4], "mode": "per_token"})
    assert flat.select(7.0).check_layers(2).v_bits == (4, 4)
    # layers listed out of order are put in layer order
    shuffled = {"layers": [{"layer": 1, "k_bits": 2, "v_bits": 2}, {"layer": 0, "k_bits": 8, "v_bits": 8}]}
    assert artifact.KVPrecisionArtifact.from_dict(shuffled).select(None).k_bits == (8, 2)


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"version": 2, "layers": [[4, 4]]}, r"kv_precision.json: version=2: this reader knows version 1"),
        (
            {
                "layers": [{"layer": i, "k_bits": 4, "v_bits": 4} for i in range(3)]
                + [{"layer": 3, "k_bits": 5, "v_bits": 4}]
            },
            r"kv_precision.json: layers\[3\].k_bits=5: one of 2, 4, 8, 16",
        ),
        ({"maps": {"4.0": {"layers": [[4, 3]]}}}, r"maps\['4.0'\].layers\[0\]\[1\]=3: one of 2, 4, 8, 16"),
        ({"maps": {"four": {"layers": [[4, 4]]}}}, r"maps key='four': must be a budget number"),
        ({"layers": [[4, 4]], "mode": "per_channel"}, r"mode='per_channel': one of"),
        ({"layers": [[4, 4]], "group_size": 0}, r"group_size=0: must be an int >= 1"),
        ({"k_bits": [4, 4], "v_bits": [4]}, r"v_bits=\[4\]: has 1 entries, k_bits has 2"),
        ({"layers": [{"layer": 0, "k_bits": 4, "v_bits": 4}, {"layer": 0, "k_bits": 4, "v_bits": 4}]}, r"0..L-1"),
        ({"method": "kvtuner"}, r"holds no 'layers'"),
    ],
)
def test_bad_files_name_the_field(doc, match):
    with pytest.raises(ValueError, match=match):
        artifact.KVPrecisionArtifact.from_dict(doc)


def test_model_fit_and_full_precision_bits():
    m = artifact.KVPrecisionArtifact.from_dict({"layers": [[4, 16]]}).select(None)
    with pytest.raises(ValueError, match="a 1-layer map for a 4-layer model"):
        m.check_layers(4)
    with pytest.raises(ValueError, match="16"):
        m.config()  # the caches' KVQuantConfig has no unquantized setting
