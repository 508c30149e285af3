"""A new eviction scorer is one file: written into a directory on the scorers package path, it is
registered, accepted by the PrefixKV pipeline's config, and used by its caches, methods and actors.

Two plug-ins: "last" (attention from the newest query only: SnapKV's window of 1) and "oldest"
(a position scorer that keeps the oldest tokens, so it becomes a method of its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines import prefixkv
from workers.caches import scorers
from workers.caches.evicting import EvictingCache
from workers.caches.scoring import ScoreConfig
from workers.eval import continuation_logits
from workers.model.presets import get_preset
from workers.model.transformer import CalibLM
from workers.prefixkv import artifact
from workers.prefixkv.evaluate import method_grid
from workers.prefixkv.methods import Method

L = 4  # tiny preset layers

PLUGINS = {
    "last": '''
"""Last-query attention: the attention each key receives from the newest query (a test plug-in)."""

from kernels import attention_received
from workers.caches.scorers import register
from workers.caches.scorers.base import AttentionScorer


@register
class LastQueryScorer(AttentionScorer):
    """Attention received from the last query of each forward."""

    name = "last"

    def received(self, cfg, q, k, q_pos, k_pos):
        return attention_received(q[:, -1:], k, q_pos[:, -1:], k_pos, chunk=cfg.chunk)
''',
    "oldest": '''
"""Oldest first: earlier positions score higher (a test plug-in, the mirror image of recency)."""

from workers.caches.scorers import register
from workers.caches.scorers.base import PositionScorer


@register
class OldestScorer(PositionScorer):
    """A token's score is minus its position."""

    name = "oldest"

    def static(self, cfg, layer, pos):
        return -pos.float()
''',
}


@contextlib.contextmanager
def plugin_scorers(tmp_path: Path):
    """The plug-in files in a fresh directory appended to the package path; afterwards the path,
    the registry and sys.modules are as they were."""
    folder = tmp_path / "scorer_plugins"
    folder.mkdir()
    for name, source in PLUGINS.items():
        (folder / f"{name}.py").write_text(source)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scorers, "__path__", [*scorers.__path__, str(folder)])
        mp.setattr(scorers.SCORERS, "_classes", dict(scorers.SCORERS._classes))
        try:
            yield
        finally:
            for name in PLUGINS:
                sys.modules.pop(f"{scorers.__name__}.{name}", None)
    assert not set(PLUGINS) & set(scorers.names()), "registry restored"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CalibLM(dataclasses.replace(get_preset("tiny"), indexer=None, moe=None)).eval()


def test_a_new_file_registers_a_scorer(tmp_path):
    assert scorers.names(attention=True) == ("sum", "window")
    with plugin_scorers(tmp_path):
        assert scorers.names(attention=True) == ("last", "sum", "window")
        assert scorers.names(attention=False) == ("oldest", "random", "recency")
        assert scorers.get("last").uses_attention and not scorers.get("oldest").uses_attention
        assert prefixkv.RunConfig(model="x", scores=("last", "sum")).scores == ("last", "sum")
        with pytest.raises(ValueError, match="--scores"):
            prefixkv.RunConfig(model="x", scores=("oldest",))  # PrefixKV calibrates on attention only
        keys = [s.key for s in method_grid([0.2], ["last"])]
        assert keys == [
            "full@1", "prefixkv-last@0.2", "uniform-last@0.2", "pyramid-last@0.2",
            "oldest@0.2", "random@0.2", "recency@0.2",
        ]  # fmt: skip
        with pytest.raises(ValueError, match="attention score"):
            Method("uniform", 0.5, L, ScoreConfig("oldest"))
        runtime = scorers.runtime_env()["env_vars"][scorers.PLUGIN_ENV]
        assert runtime.endswith("scorer_plugins")
    assert scorers.runtime_env() is None
    with pytest.raises(ValueError, match="score mode 'last'"):
        ScoreConfig("last")


def test_plugin_scorers_drive_eviction(tmp_path, model):
    tokens = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(1))
    ctx, cont = tokens[:, :64], tokens[:, 64:]
    with plugin_scorers(tmp_path):
        # "last" is SnapKV's window of one query: the same scores, so the same logits bit for bit.
        last = Method("uniform", 0.3, L, ScoreConfig("last"), n_sink=2)
        win1 = Method("uniform", 0.3, L, ScoreConfig("window", window=1), n_sink=2)
        out = continuation_logits(model, ctx, cont, **last.forward_kwargs())
        assert torch.equal(out, continuation_logits(model, ctx, cont, **win1.forward_kwargs()))
        assert last.label == "uniform-last"
        # "oldest" is a method by its name alone: after prefill every layer holds the oldest tokens
        # (sinks included) and the newest one.
        oldest = Method("oldest", 0.25, L, n_sink=2)
        assert oldest.score.mode == "oldest" and oldest.label == "oldest"
        cache = oldest.make_cache()
        assert isinstance(cache, EvictingCache)
        with torch.no_grad():
            model(ctx, **cache.forward_kwargs())
        for layer in range(L):
            assert cache.positions(layer)[0].tolist() == [*range(15), 63]


def test_plugin_scorer_runs_the_pipeline(tmp_path, ray_local, mlflow_uri, tiny_checkpoint):
    """The real pipeline: the driver validates --scores last, Ray actors calibrate and evaluate with it."""
    args = [
        "--model", str(tiny_checkpoint), "--samples", "2", "--workers", "1", "--context", "100",
        "--continuation", "8", "--batch-size", "2", "--cpus-per-worker", "0.25", "--bootstrap", "5",
        "--scores", "last", "--eval-samples", "2", "--eval-ratios", "0.2", "--experiment", "prefixkv-plugin-test",
    ]  # fmt: skip
    with plugin_scorers(tmp_path):
        run_id = prefixkv.main(args)
        cal = artifact.load(f"runs:/{run_id}/prefixkv.json")
        assert list(cal.data["scores"]) == ["last"] and cal.score().mode == "last"
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/eval.json")
    keys = {r["key"] for r in json.loads(Path(path).read_text())["rows"]}
    assert {"prefixkv-last@0.2", "uniform-last@0.2", "oldest@0.2"} <= keys
