"""IndexCache calibration: greedy F/S layer selection on Ray calibration actors.

    python -m pipelines.indexcache --model runs:/<run_id>/model --retention 0.5 0.25 0.125 --workers 2
    python -m pipelines.indexcache --model artifacts/demo_model --retention 0.25 --multi-fidelity
    python -m pipelines.indexcache --model artifacts/demo_model --retention 0.25 --naive   # no prefix reuse
    python -m pipelines.indexcache --model hf:<glm_moe_dsa or deepseek_v32 dir> --seq-len 4096 --retention 0.25
    python -m pipelines.indexcache --resume <run_id>                  # continue a stopped search
    python -m pipelines.indexcache --model ... --retention 0.25 --distill-steps 100
    python -m pipelines.indexcache --from-search <run_id> --distill-steps 60   # new reports, same search
    ray job submit --working-dir . -- python -m pipelines.indexcache --model runs:/<run_id>/model

One greedy run serves every requested retention (the trace passes through each number of F
layers). The search state is saved to MLflow (search/state.json) after every step. Reports:
per retention the calibration and held-out NLL of the searched pattern, the uniform
interleave and all-F (paired over held-out windows, with standard errors), the indexer
work removed, the per-step trace, the top-k overlap matrix (table + heatmap) and
indexcache.json with the patterns for serving.

The model is a CalibLM with an indexer or a transformers DSA checkpoint (`glm_moe_dsa`,
`deepseek_v32`; `workers.model.hf.dsa`), searched by the same code; windows are in the model's
own tokens. The training-aware variant (`--distill-steps`) trains CalibLM indexers and those of a dense
model converted by `pipelines.dsa_convert`; glm_moe_dsa and deepseek_v32 are refused. For glm_moe_dsa every retention's searched pattern is also logged as a config.json
(`index_topk_pattern`) that plain transformers loads beside the checkpoint's weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import mlflow
import torch

from tuning.indexcache.cost import analytic_units, naive_units
from tuning.indexcache.fidelity import EXACT, FidelityConfig
from tuning.indexcache.search import SearchState, StepRecord, check_compatible, greedy_search, trace_rows
from workers.data.corpus import SplitConfig, load_corpus
from workers.data.tokenizer import Tokenizer
from workers.indexcache.actor import CalibrationPool
from workers.indexcache.hf_export import glm_config
from workers.indexcache.report import log_rows
from workers.model import checkpoint
from workers.model.hf.address import (
    ADDRESS_HELP,
    check_weights,
    config_file,
    is_hf_address,
    is_hf_config,
    load_tokenizer,
    read_config,
)
from workers.runtime import cli, faults, tracking
from workers.runtime.cluster import init_ray

log = logging.getLogger("pipelines.indexcache")
STATE_ARTIFACT = "search/state.json"
CONFIG_ARTIFACT = "search/config.json"
GLM_CONFIG_ARTIFACT = "indexcache/glm_config/r{retention}/config.json"


class SearchStopped(RuntimeError):
    """The search stopped before its last step (--max-steps); resume it with --resume."""


# What a search's result depends on, and the held-out set its reports score (--from-search keeps them).
SEARCH_FIELDS = (
    "model",
    "retentions",
    "naive",
    "multi_fidelity",
    "fidelity_rungs",
    "fidelity_eta",
    "corpus",
    "split_seed",
    "seq_len",
    "calib_windows",
    "heldout_windows",
    "batch_size",
)


@dataclass(frozen=True)
class IndexCacheConfig:
    """Everything a search depends on; validated before any work starts."""

    model: str
    retentions: tuple[float, ...] = (0.5, 0.25, 0.125)
    workers: int = 2
    naive: bool = False
    multi_fidelity: bool = False
    fidelity_rungs: tuple[float, ...] = (0.25, 1.0)
    fidelity_eta: float = 4.0
    corpus: str = "pydoc"
    split_seed: int = 0
    seq_len: int = 0  # 0: the model's max_seq_len
    calib_windows: int = 32
    heldout_windows: int = 128
    batch_size: int = 8
    distill_steps: int = 0
    distill_lr: float = 1e-3
    distill_batch: int = 8
    distill_retentions: tuple[float, ...] = ()  # empty: every retention
    worker_cpus: float = 1.0
    threads: int = 1
    max_steps: int = 0  # 0: run to the end; else stop (resumably) after this many steps
    overlap: bool = True
    experiment: str | None = None
    run_name: str | None = None
    tags: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tuning.indexcache.patterns import validate_retention

        object.__setattr__(self, "retentions", tuple(float(r) for r in self.retentions))
        object.__setattr__(self, "fidelity_rungs", tuple(float(r) for r in self.fidelity_rungs))
        object.__setattr__(self, "distill_retentions", tuple(float(r) for r in self.distill_retentions))
        extra = sorted(set(self.distill_retentions) - set(self.retentions))
        if extra:
            raise ValueError(f"distill_retentions {extra} are not among the searched retentions {self.retentions}")
        if not self.retentions:
            raise ValueError("--retention needs at least one value")
        for r in self.retentions:
            validate_retention(r)
        self.fidelity()  # validates rungs / eta
        checks = {
            "workers": self.workers >= 1,
            "calib_windows": self.calib_windows >= self.workers,
            "heldout_windows": self.heldout_windows >= 2,
            "batch_size": self.batch_size >= 1,
            "seq_len": self.seq_len >= 0,
            "distill_steps": self.distill_steps >= 0,
            "distill_lr": self.distill_lr > 0,
            "distill_batch": self.distill_batch >= 1,
            "worker_cpus": self.worker_cpus > 0,
            "threads": self.threads >= 1,
            "max_steps": self.max_steps >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid (calib_windows must be >= workers)")
        if self.naive and self.multi_fidelity:
            raise ValueError("--naive and --multi-fidelity are exclusive (naive is the exact reference)")

    def with_reports_of(self, other: IndexCacheConfig, source_run: str) -> IndexCacheConfig:
        """This (source) run's search with `other`'s reports and runtime: what --from-search runs."""
        keep = {k: getattr(self, k) for k in SEARCH_FIELDS}
        tags = {**self.tags, **other.tags, "search_from": source_run}
        return replace(other, **keep, tags=tags)

    @property
    def mode(self) -> str:
        return "naive" if self.naive else "prefix"

    def fidelity(self) -> FidelityConfig:
        if not self.multi_fidelity:
            return EXACT
        return FidelityConfig(rungs=self.fidelity_rungs, eta=self.fidelity_eta)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, **overrides) -> IndexCacheConfig:
        d = json.loads(text)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)


@dataclass
class Data:
    calib: torch.Tensor  # [Rc, T + 1]
    heldout: torch.Tensor  # [Rh, T + 1]
    train: torch.Tensor  # [Rt, T + 1] (distillation only)
    summary: dict


def load_data(cfg: IndexCacheConfig, seq_len: int, tokenizer: Tokenizer) -> Data:
    """Disjoint calibration / held-out / train windows of seq_len + 1 tokens (inputs + next token)."""
    corpus = load_corpus(cfg.corpus, SplitConfig(seed=cfg.split_seed))
    calib = corpus.eval_windows("calib", seq_len + 1, cfg.calib_windows, tokenizer)
    heldout = corpus.eval_windows("heldout", seq_len + 1, cfg.heldout_windows, tokenizer)
    if calib.shape[0] < cfg.calib_windows:
        raise ValueError(f"calib_windows={cfg.calib_windows}: the calib split holds only {calib.shape[0]}")
    if heldout.shape[0] < 2:
        raise ValueError(f"seq_len={seq_len}: the held-out split holds {heldout.shape[0]} window(s), reports need 2")
    g = torch.Generator().manual_seed(cfg.split_seed)
    train = corpus.sample_windows("train", seq_len + 1, max(256, 4 * cfg.distill_batch), g, tokenizer)
    summary = {
        **corpus.summary(),
        "tokenizer": tokenizer.name,
        "calib_windows": calib.shape[0],
        "heldout_windows": heldout.shape[0],
    }
    return Data(calib, heldout, train, summary)


def is_hf_model(address: str) -> bool:
    return is_hf_address(address) or is_hf_config(read_config(address))


def check_model(address: str, distill: bool = False) -> int:
    """Refuse, from the config and the weights' headers (before Ray starts), a model IndexCache cannot
    search (or, with `distill`, distill); -> the model's longest context."""
    check_weights(address)  # a truncated safetensors names its file here, not in safetensors' loader
    if is_hf_model(address):
        from transformers import AutoConfig

        from workers.model.hf import DSA_TYPES
        from workers.model.hf.dsa import check_dsa_config

        c = AutoConfig.from_pretrained(config_file(address).parent, local_files_only=True)
        check_dsa_config(c, address)
        if distill and c.model_type in DSA_TYPES:
            raise ValueError(
                f"--distill-steps on model_type {c.model_type!r}: the training-aware variant trains CalibLM "
                "indexers and those of models converted by pipelines.dsa_convert"
            )
        return c.max_position_embeddings
    c = checkpoint.load_config(address)
    if c.indexer is None:
        raise ValueError(f"model={address!r} has no lightning indexer: IndexCache needs a DSA model")
    if c.n_layers < 2:
        raise ValueError(f"model={address!r} has {c.n_layers} layer(s): nothing to search")
    return c.max_seq_len


def load_model(address: str):
    """A CalibLM with an indexer, or a transformers DSA checkpoint behind the same API (DSAModel)."""
    check_model(address)
    if is_hf_model(address):
        from workers.model.hf.dsa import load_dsa

        return load_dsa(address)
    return checkpoint.load(address)


def resume_config(run_id: str, **overrides) -> tuple[IndexCacheConfig, SearchState]:
    """The stopped run's config (with runtime overrides) and its last saved search state."""
    tracking.check_run(run_id)
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    with tempfile.TemporaryDirectory() as d:
        try:
            cfg_path = client.download_artifacts(run_id, CONFIG_ARTIFACT, d)
            state_path = client.download_artifacts(run_id, STATE_ARTIFACT, d)
        except Exception as e:  # mlflow raises several types for a missing artifact
            raise ValueError(f"--resume {run_id!r}: the run has no saved search state ({e})") from e
        with open(cfg_path) as f:
            cfg = IndexCacheConfig.from_json(f.read(), **overrides)
        with open(state_path) as f:
            state = SearchState.loads(f.read())
    return cfg, state


def run(
    cfg: IndexCacheConfig,
    *,
    resume: str | None = None,
    state: SearchState | None = None,
    on_step: Callable[[SearchState, StepRecord, CalibrationPool], None] | None = None,
) -> dict:
    """Run (or resume) a search and its reports in one MLflow run; returns the summary."""
    from workers.indexcache.report import report

    max_seq_len = check_model(cfg.model, distill=cfg.distill_steps > 0)
    seq_len = cfg.seq_len or max_seq_len
    if seq_len > max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={max_seq_len}")
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg, seq_len, tokenizer)
    model = load_model(cfg.model)
    n = model.cfg.n_layers
    if state is not None:
        check_compatible(state, n, cfg.retentions, cfg.mode)
    else:
        state = SearchState(n, cfg.retentions, mode=cfg.mode, fidelity=cfg.fidelity())
    init_ray()
    params = {**{k: v for k, v in asdict(cfg).items() if k != "tags"}, "n_layers": n, "seq_len_resolved": seq_len}
    params.update({"topk": model.cfg.indexer.topk, "model_type": getattr(model.cfg, "model_type", "calib")})
    params.update(data.summary)
    retentions = "r" + ",".join(f"{r:g}" for r in cfg.retentions)
    with tracking.start_run(
        "indexcache",
        experiment=cfg.experiment,
        run_name=cfg.run_name or tracking.run_label("indexcache", cfg.model, retentions),
        run_id=resume,
        params=params,
        tags={"corpus_sha256": data.summary["corpus_sha256"], **cfg.tags},
    ) as active:
        run_id = active.info.run_id
        mlflow.log_text(cfg.to_json(), CONFIG_ARTIFACT)
        mlflow.log_text(state.dumps(), STATE_ARTIFACT)  # a --from-search run holds the search it reports
        pool = CalibrationPool(
            model,
            data.calib,
            cfg.workers,
            batch_size=cfg.batch_size,
            mode=cfg.mode,
            num_cpus=cfg.worker_cpus,
            threads=cfg.threads,
        )
        started, steps_before = time.perf_counter(), len(state.steps)

        def step_done(st: SearchState, rec: StepRecord) -> None:
            tracking.log_metrics(
                {
                    "search/loss": rec.loss,
                    "search/gap": rec.gap if rec.gap is not None else 0.0,
                    "search/committed_layer": rec.committed,
                    "search/n_full": rec.pattern.count("F"),
                    "search/layer_forwards": st.total_units() / pool.total_rows(),
                },
                step=rec.step,
            )
            mlflow.log_text(st.dumps(), STATE_ARTIFACT)
            faults.point("indexcache.step_saved")
            if on_step is not None:
                on_step(st, rec, pool)

        try:
            greedy_search(state, pool, on_step=step_done, max_steps=cfg.max_steps or None)
            search_s = time.perf_counter() - started
            if not state.done:
                mlflow.set_tag("stopped", f"after step {len(state.steps)} of {state.n_steps}")
                raise SearchStopped(f"stopped after {len(state.steps)} of {state.n_steps} steps; --resume {run_id}")
            cost = {
                "search/wall_s": search_s,
                "search/steps_this_run": len(state.steps) - steps_before,
                "search/total_layer_forwards": state.total_units() / pool.total_rows(),
                "search/naive_layer_forwards": naive_units(n, state.n_steps, 1),
                "search/analytic_layer_forwards": analytic_units(state, pool.rows, pool.total_rows())
                / pool.total_rows(),
                "search/actor_replacements": pool.replacements,
                "search/layer_forwards_this_process": pool.units() / pool.total_rows(),
            }
            cost["search/cost_ratio_vs_naive"] = (
                cost["search/total_layer_forwards"] / cost["search/naive_layer_forwards"]
            )
            tracking.log_metrics(cost)
            log_rows(trace_rows(state), "indexcache/trace.json")
            summary = report(cfg, model, data, state, pool)
            summary.update({"run_id": run_id, "cost": cost, "pattern": state.pattern})
            if getattr(model.cfg, "model_type", None) == "glm_moe_dsa":
                summary["glm_configs"] = log_glm_configs(read_config(cfg.model), summary["retentions"])
            return summary
        finally:
            pool.shutdown()


def log_glm_configs(config: dict, retentions: list[dict]) -> dict[float, str]:
    """Log the checkpoint's config.json with each retention's searched pattern; -> {retention: artifact}."""
    out = {}
    for entry in retentions:
        path = GLM_CONFIG_ARTIFACT.format(retention=entry["retention"])
        mlflow.log_text(json.dumps(glm_config(config, entry["searched"]["pattern"]), indent=2), path)
        out[entry["retention"]] = path
    return out


def _run_cli(cfg: IndexCacheConfig, **kw) -> dict:
    try:
        return run(cfg, **kw)
    except SearchStopped as e:
        raise SystemExit(f"indexcache: {e}") from None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        help=f"a DSA model: a CalibLM with an indexer, or a glm_moe_dsa / deepseek_v32 checkpoint; {ADDRESS_HELP}",
    )
    p.add_argument(
        "--retention",
        type=float,
        nargs="+",
        default=[0.5, 0.25, 0.125],
        help="fractions of layers that keep their indexer; one search serves all",
    )
    p.add_argument("--workers", type=int, default=None, help="calibration actors (one shard each; default 2)")
    p.add_argument("--naive", action="store_true", help="recompute every layer per candidate (reference mode)")
    p.add_argument("--multi-fidelity", action="store_true", help="successive halving over calibration slices")
    p.add_argument(
        "--fidelity-rungs",
        type=float,
        nargs="+",
        default=[0.25, 1.0],
        help="calibration fractions per rung (increasing, last 1.0)",
    )
    p.add_argument("--fidelity-eta", type=float, default=4.0, help="keep ceil(n/eta) candidates per rung")
    p.add_argument("--corpus", default="pydoc", help="'pydoc' or a .txt/.jsonl/.parquet path")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/calib/held-out split")
    p.add_argument("--seq-len", type=int, default=0, help="window length (0: the model's max_seq_len)")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (fixed for all candidates)")
    p.add_argument("--heldout-windows", type=int, default=128, help="held-out windows for the reports")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward inside an actor")
    p.add_argument("--distill-steps", type=int, default=0, help="training-aware variant: steps per pattern (0: off)")
    p.add_argument("--distill-lr", type=float, default=1e-3, help="Adam learning rate of the retained indexers")
    p.add_argument("--distill-batch", type=int, default=8, help="train windows per distillation step")
    p.add_argument(
        "--distill-retention",
        type=float,
        nargs="+",
        default=[],
        help="retentions to distill for (default: every --retention)",
    )
    p.add_argument("--worker-cpus", type=float, default=None, help="Ray CPUs per actor (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per actor (default 1)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many greedy steps (resumable)")
    p.add_argument("--no-overlap", action="store_true", help="skip the top-k overlap matrix")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the pipeline's own)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: indexcache-<model>-r<retentions>)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue the stopped search of this MLflow run")
    p.add_argument(
        "--from-search",
        metavar="RUN_ID",
        help="a new run with this run's finished search (its model, data and retentions) and this command's "
        "reports (--distill-*, --no-overlap, --experiment)",
    )
    a = p.parse_args(argv)
    tracking.check_store()  # an unwritable store fails now, not after MLflow's minutes of retries
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runtime = {"workers": a.workers, "worker_cpus": a.worker_cpus, "threads": a.threads, "max_steps": a.max_steps}
    if a.resume and a.from_search:
        p.error("--resume and --from-search are exclusive")
    if a.resume:
        cfg, state = resume_config(a.resume, **runtime)
        tracking.mark_failed_if_running(a.resume)
        summary = _run_cli(cfg, resume=a.resume, state=state)
    else:
        if a.from_search and a.model:
            p.error("--from-search takes the model (and the whole search) from that run; drop --model")
        if not a.model and not a.from_search:
            p.error("--model is required unless --resume or --from-search is given")
        src = state = None
        if a.from_search:
            src, state = resume_config(a.from_search)
            if not state.done:
                raise ValueError(
                    f"--from-search {a.from_search!r}: its search stopped after step {len(state.steps)} of "
                    f"{state.n_steps}; finish it with --resume {a.from_search}"
                )
        cfg = IndexCacheConfig(
            model=a.model or src.model,
            retentions=src.retentions if src else tuple(a.retention),
            naive=a.naive,
            multi_fidelity=a.multi_fidelity,
            fidelity_rungs=tuple(a.fidelity_rungs),
            fidelity_eta=a.fidelity_eta,
            corpus=a.corpus,
            split_seed=a.split_seed,
            seq_len=a.seq_len,
            calib_windows=a.calib_windows,
            heldout_windows=a.heldout_windows,
            batch_size=a.batch_size,
            distill_steps=a.distill_steps,
            distill_lr=a.distill_lr,
            distill_batch=a.distill_batch,
            distill_retentions=tuple(a.distill_retention),
            overlap=not a.no_overlap,
            experiment=a.experiment,
            run_name=a.run_name,
            **{k: v for k, v in runtime.items() if v is not None},
        )
        if src is not None:
            cfg = src.with_reports_of(cfg, a.from_search)
        # a missing or non-DSA checkpoint (or one the variant cannot distill) fails here, before Ray starts
        check_model(cfg.model, distill=cfg.distill_steps > 0)
        summary = _run_cli(cfg, state=state)
    print(json.dumps({k: summary[k] for k in ("run_id", "pattern", "cost", "retentions")}, indent=1, default=str))
    return summary


if __name__ == "__main__":
    cli.run(main)
