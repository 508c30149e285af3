"""The demo's one summary table: each method against its baseline, held-out numbers, run ids."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from workers.runtime import tracking


def _m(run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    return MlflowClient(tracking.tracking_uri()).get_run(run_id).data.metrics


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _first(m: dict, *names: str):
    for n in names:
        if n in m:
            return m[n]
    return None


def rows(runs: dict) -> list[tuple[str, str, str, str, str]]:
    out = []
    moe = _m(runs.get("train_moe"))
    out.append(
        (
            "DSA-MoE (BIP) training",
            "held-out bits/byte",
            _fmt(moe.get("heldout_bpb")),
            "unigram",
            _fmt(moe.get("unigram_bpb")),
        )
    )
    out.append(
        (
            "DSA sparse attention (own indexer)",
            "held-out bits/byte",
            _fmt(moe.get("heldout_bpb")),
            "k random positions",
            _fmt(moe.get("heldout_random_k_bpb")),
        )
    )
    out.append(
        (
            "BIP balancing",
            "MaxVio at step 1 (training)",
            _fmt(_first(moe, "maxvio_step1")),
            "held-out global MaxVio (causal)",
            _fmt(_first(moe, "heldout_global_maxvio")),
        )
    )
    ic = _m(runs.get("indexcache"))
    for r in ("0.25", "0.5", "0.125"):
        s = _first(ic, f"r{r}/searched_heldout_nll")
        u = _first(ic, f"r{r}/uniform_heldout_nll")
        if s is not None:
            out.append(
                (f"IndexCache greedy, retention {r}", "held-out NLL (nats)", _fmt(s), "uniform interleave", _fmt(u))
            )
    out.append(("IndexCache all-F", "held-out NLL (nats)", _fmt(ic.get("all_f/heldout_nll")), "", ""))
    for key, label, base in (
        ("kvtuner_text", "KVTuner (demo model, text)", "KV4"),
        ("kvtuner_retrieval", "KVTuner (retrieval testbed)", "K4V2"),
    ):
        m = _m(runs.get(key))
        chosen = sorted(k for k in m if k.startswith("heldout_kvtuner_b") and not k.endswith("_se"))
        for k in chosen:
            b = k.removeprefix("heldout_kvtuner_b")
            out.append(
                (
                    f"{label} <= {b} bits",
                    "held-out metric",
                    _fmt(m[k]),
                    f"uniform {base}",
                    _fmt(m.get(f"heldout_{base}")),
                )
            )
        if m:
            out.append(
                (
                    f"{label}: full precision",
                    "held-out metric",
                    _fmt(m.get("heldout_full")),
                    "uniform KV2",
                    _fmt(m.get("heldout_KV2")),
                )
            )
    for key, label in (
        ("prefixkv_text", "PrefixKV (demo model, text NLL)"),
        ("prefixkv_retrieval", "PrefixKV (retrieval testbed)"),
    ):
        m = _m(runs.get(key))
        for r in ("0.2", "0.5"):
            for score in ("window", "sum"):
                for kind in ("nll", "acc"):
                    v = m.get(f"{kind}_prefixkv-{score}_r{r}")
                    if v is not None:
                        out.append(
                            (
                                f"{label} keep {r} ({score} scores)",
                                kind,
                                _fmt(v),
                                "uniform budget",
                                _fmt(m.get(f"{kind}_uniform-{score}_r{r}")),
                            )
                        )
        full = _first(m, "nll_full_r1", "acc_full_r1")
        if full is not None:
            out.append(
                (
                    f"{label}: full cache",
                    "",
                    _fmt(full),
                    "random eviction keep 0.1",
                    _fmt(_first(m, "nll_random_r0.1", "acc_random_r0.1")),
                )
            )
    return out


def print_summary(runs: dict, served: dict | None, wall_s: float, stage_times: dict) -> None:
    table = rows(runs)
    widths = [max(len(r[i]) for r in [("method", "metric", "value", "baseline", "value")] + table) for i in range(5)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print("\n" + "=" * 100)
    print(
        f"calibray demo: {wall_s / 60:.1f} min wall time; stages: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in stage_times.items())
    )
    print(line.format("method", "metric", "value", "baseline", "value"))
    for r in table:
        print(line.format(*r))
    if served:
        print(
            f"\nserving: KV-cache bytes for the same {len(served['full'])} requests: full {served['kv_bytes_full']}, "
            f"calibrated {served['kv_bytes_calibrated']}"
        )
        print(
            f"endpoint: curl -s {served['endpoint']}/v1/completions -H 'Content-Type: application/json' "
            '-d \'{"model": "demo-calibrated", "prompt": "The with statement", "max_tokens": 32}\''
        )
    print("MLflow runs: " + ", ".join(f"{k}={v}" for k, v in runs.items() if v))
    print(f"browse: .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()} --host 127.0.0.1 --port 5000")
