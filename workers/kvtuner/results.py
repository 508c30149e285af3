"""KVTuner held-out report: chosen maps beside uniform baselines on the same tokens, paired.

For each budget the chosen map is compared (paired over the same held-out examples) with
full precision, every uniform baseline, uniform K2V4, the same map with its layers reversed,
and the best uniform map with at most as many bits, chosen by its calibration proxy (KL to full
precision on the calibration tokens, as the search scores maps), never by held-out. Deltas are
chosen - other in the task's unit: exact match (higher is better) or NLL in nats (lower is better). Writes `kv_precision.json`
(every budget) and `budgets/<b>/kv_precision.json` (workers.kvtuner.artifact), `report.json`, `report.md`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tuning.kvtuner.space import equivalent_bits, parse_pair
from workers.kvtuner import artifact
from workers.kvtuner.actors import run_jobs
from workers.model.hf.address import dtype_name
from workers.stats import markdown_table, paired_difference


def _bits(map_str: str | None) -> float:
    return 16.0 if map_str is None else equivalent_bits([parse_pair(x) for x in map_str.split(",")])


def final_report(
    cfg, chosen: dict, calib_kl: dict[str, float], n_layers: int, head_dim: int, n_kv_heads: int, pool, data, work: Path
) -> dict:
    """chosen {budget: search row with "map"}, calib_kl {uniform baseline name: calibration KL}
    -> {"metrics", "rows", "comparisons"}; files under work/out*."""
    from workers.caches.precision import KVQuantConfig

    uni = lambda b: ",".join([parse_pair(b).name] * n_layers)
    named: dict[str, str | None] = {"full": None}
    for b in [*cfg.baselines, "K2V4"]:
        named[parse_pair(b).name] = uni(b)
    for b, row in chosen.items():
        named[f"kvtuner_b{b}"] = row["map"]
        named[f"reversed_b{b}"] = ",".join(reversed(row["map"].split(",")))
    distinct = list(dict.fromkeys(named.values()))
    res = run_jobs(pool, [{"op": "task", "map": m, "data": "report"} for m in distinct])
    by_map = dict(zip(distinct, res))

    rows = []
    for name, m in named.items():
        r = by_map[m]
        qc = None if m is None else KVQuantConfig(tuple(m.split(",")), **cfg.quant())
        stored = 32.0 if qc is None else qc.stored_bits(cfg.length, head_dim)
        rows.append(
            {
                "name": name,
                "map": "fp32" if m is None else (qc.name()),
                "nominal_bits": _bits(m) if m is not None else 32.0,
                "stored_bits": stored,
                "kv_bytes_per_token": stored * 2 * n_kv_heads * head_dim * n_layers / 8,
                "metric": r["metric"],
                "value": r["value"],
                "se": r["se"],
                **({"bpb": r["bpb"]} if "bpb" in r else {}),  # text: the NLL in bits/byte too
                "per_example": r["per_example"],
            }
        )
    by_name = {r["name"]: r for r in rows}

    comps = []

    def compare(a: str, b: str, label: str) -> None:
        d, se = paired_difference(by_name[a]["per_example"], by_name[b]["per_example"])
        comps.append({"a": a, "b": b, "label": label, "delta": d, "se": se})

    if "KV8" in by_name:
        compare("KV8", "full", "KV8 vs full precision")
    for b, row in chosen.items():
        me = f"kvtuner_b{b}"
        # dict.fromkeys: K2V4 is compared once when it is also one of the baselines
        for other in dict.fromkeys(["full", *[parse_pair(x).name for x in cfg.baselines], "K2V4", f"reversed_b{b}"]):
            compare(me, other, f"{me} vs {other}")
        bits = _bits(row["map"])
        fits = [n for n in {parse_pair(x).name for x in cfg.baselines} if parse_pair(n).bits <= bits + 1e-9]
        if fits:
            best = min(fits, key=lambda n: calib_kl[n])
            compare(me, best, f"{me} vs best uniform at <= {bits:g} bits on calibration ({best})")

    out, bdir = work / "out", work / "out_budgets"
    bdir.mkdir(exist_ok=True)
    maps = {}
    for b, row in chosen.items():
        qc = KVQuantConfig(tuple(row["map"].split(",")), **cfg.quant())
        extra = {
            "budget": b,
            "stored_bits": qc.stored_bits(cfg.length, head_dim),
            "stored_bits_context": cfg.length,
            "calib_kl": row["damage"],
            "heldout": {k: v for k, v in by_name[f"kvtuner_b{b}"].items() if k in ("metric", "value", "se", "bpb")},
            "model": cfg.model,
            "dtype": dtype_name(cfg.dtype),
        }
        (bdir / f"{b:g}").mkdir(exist_ok=True)
        artifact.write_map(bdir / f"{b:g}" / artifact.FILE_NAME, qc, **extra)
        maps[b] = artifact.map_entry(qc, **extra)
    artifact.write_budgets(out / artifact.FILE_NAME, maps)
    table = [{k: v for k, v in r.items() if k != "per_example"} for r in rows]
    (out / "report.json").write_text(json.dumps({"rows": rows, "comparisons": comps, "data": data.name}, indent=1))
    cols = ["name", "map", "nominal_bits", "stored_bits", "kv_bytes_per_token", "value", "se"]
    md = markdown_table(table, cols + (["bpb"] if "bpb" in rows[0] else []))
    md += "\n" + markdown_table(comps, ["label", "delta", "se"])
    (out / "report.md").write_text(md)

    metrics = {}
    for r in rows:
        metrics[f"heldout_{r['name']}"] = r["value"]
        metrics[f"heldout_{r['name']}_se"] = r["se"]
        if "bpb" in r:
            metrics[f"heldout_{r['name']}_bpb"] = r["bpb"]
    for c in comps:
        key = f"delta_{c['a']}_vs_{c['b']}"
        metrics[key], metrics[key + "_se"] = c["delta"], c["se"]
    for b, row in chosen.items():
        metrics[f"chosen_b{b}_bits"] = _bits(row["map"])
        metrics[f"chosen_b{b}_mixed"] = float(len(set(row["map"].split(","))) > 1)
    return {"metrics": metrics, "rows": table, "comparisons": comps}


def budget_metrics(metrics: dict[str, float], budget: float) -> dict[str, float]:
    """The run's metrics as one budget's child run logs them: that budget's keys without the budget
    in their names (`delta_kvtuner_b3.25_vs_full` -> `delta_vs_full`, `chosen_b3.25_bits` ->
    `chosen_bits`), every budget-free key (uniform baselines, full precision) as is, other budgets'
    keys left out; so runs at different budgets compare column by column in the MLflow UI."""
    b = str(float(budget))  # final_report's keys: f"{b}" of the float budget (3.0, 3.25)
    me, rev = f"kvtuner_b{b}", f"reversed_b{b}"
    renames = [
        (f"delta_{me}_vs_{rev}", "delta_vs_reversed"),
        (f"delta_{me}_vs_", "delta_vs_"),
        (f"heldout_{me}", "heldout_kvtuner"),
        (f"heldout_{rev}", "heldout_reversed"),
        (f"chosen_b{b}_", "chosen_"),
    ]
    out = {}
    for key, value in metrics.items():
        for old, new in renames:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            if not _BUDGETED.search(key):
                out[key] = value
    return out


# A metric key naming one budget (final_report's `kvtuner_b3.25`, `reversed_b3.25`, `chosen_b3.25`).
_BUDGETED = re.compile(r"(kvtuner|reversed|chosen)_b[0-9.]+")


def shared_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics every budget shares (uniform baselines, full precision, the search's counts): what
    the search run itself logs; each budget's own are its child run's (`budget_metrics`)."""
    return {k: v for k, v in metrics.items() if not _BUDGETED.search(k)}
