"""Calibrated KV caches on natural-language retrieval: a KVTuner run's maps and PrefixKV runs' budgets, one prefill.

    python -m benchmarks.kv_retrieval --kvtuner <text run's --work-dir> --prefixkv <prefixkv.json | runs:/<id>/prefixkv.json> \\
        --work-dir <dir> [--lengths 512 1024 2048] [--calib-n 64] [--n 500] [--ratios 0.2 0.5]
    python -m benchmarks.kv_retrieval --prefixkv pool1=<prefixkv.json> pool5=<prefixkv.json> --work-dir <dir>

``--kvtuner`` is optional (without it: the full cache and the eviction arms only). Several
``--prefixkv`` files (each ``LABEL=FILE`` when there are more than one) are scored on the same
queries from the same prefill, their arms named ``prefixkv-window@0.2 [LABEL]``: one command
compares calibrations (another pooling, another calibration seed) paired query by query.

The task (issue 15 item 3b): ``#key=value;`` records (``--records`` MIN MAX per sequence, one of them queried) in real filler text (the ``pydoc`` corpus by
default: the interpreter's documentation, prose), queried at the end by ``?key=``, in the model's own
tokens (workers.data.retrieval). Exact match = every value token right under argmax.

1. The length, before any method runs: the full cache's exact match on ``--calib-n`` queries of the
   calib split at each of ``--lengths``; the longest at >= ``--min-em`` (0.8) is used. Kept in the
   work dir, so a resumed run uses the same length.
2. ``--n`` held-out queries at that length (heldout split, another seed). Per batch, one full-precision
   prefill (``workers.eval.prefill_scored``, which also records the PrefixKV run's token scores),
   shared by every arm:
   - the full cache;
   - every map the KVTuner run reported (searched maps, reversed ablations, uniform KV8 ... KV2) at
     that run's quantizer settings, and KIVI-4 / KIVI-2 at the KIVI paper's G32 R128;
   - at each ``--ratios``: per PrefixKV file, its budgets, the uniform budget and pyramid (all with
     that run's token scoring); recency once.
   With a KVTuner run, on the first ``--external-n`` queries also transformers' ``QuantizedCache``
   (quanto, 4 and 2 bits, its defaults), on the transformers model, from its own full-precision prefill.
3. Exact match per arm with its binomial SE, paired differences (95% CI) against the full cache, and
   PrefixKV against the uniform budget at each ratio; MLflow run (pipeline kv_retrieval) with the
   per-query hits as an artifact, markdown printed.

Resumable: finished batches are kept in ``--work-dir`` (``batches.jsonl``) and a rerun with the same
work dir resumes the same MLflow run from the next batch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from workers.runtime import tracking

KIVI_PAPER = {"mode": "kivi", "group": 32, "residual": 128}  # KIVI's own setting (Liu et al. 2024)
SCORED_ARMS = ("prefixkv", "uniform", "pyramid")  # budget schedules: they use a PrefixKV run's token scoring
UNSCORED_ARMS = ("recency",)  # the same whichever run: built once


def choose_length(
    model, tok, filler: bytes, lengths, n: int, seed: int, min_em: float, batch: int, records
) -> tuple[int, dict]:
    """The longest of ``lengths`` where the full cache's exact match on n calib queries is >= min_em."""
    from workers.caches.protocol import DynamicCache
    from workers.data.retrieval import eval_set
    from workers.eval import retrieval_accuracy

    em = {}
    for length in sorted(lengths):
        es = eval_set(filler, n=n, length=length, seed=seed, split="calib", tokenizer=tok, **records)
        r = retrieval_accuracy(model, es, make_cache=lambda: DynamicCache(model.cfg.n_layers), batch_size=batch)
        em[length] = r.accuracy
        print(f"calibration: length {length}, full-cache exact match {r.accuracy:.3f} (n={n})", file=sys.stderr)
    ok = [length for length, v in em.items() if v >= min_em]
    if not ok:
        raise SystemExit(f"--lengths {sorted(lengths)}: the full cache reaches {max(em.values()):.3f} < {min_em}")
    return max(ok), em


def _hf_hits(hf, prompt, value, cache) -> list[int]:
    from workers.eval import exact_match

    feed = torch.cat([prompt[:, -1:], value[:, :-1]], 1)
    return exact_match(hf(input_ids=feed, cache=cache, use_cache=True).logits, value)


def quant_arms(kvt_work: Path, p: dict, n_layers: int) -> dict:
    """{report name: KVQuantConfig | None (full)}: every map of the KVTuner run (p: its params)
    and KIVI-4 / KIVI-2 at the KIVI paper's setting."""
    from benchmarks.kvtuner_libraries import run_maps
    from workers.caches.precision import KVQuantConfig

    report = json.loads((kvt_work / "out" / "report.json").read_text())
    maps = run_maps({r["name"]: r for r in report["rows"]}, p)
    maps["KIVI-4 (G32 R128)"] = KVQuantConfig.uniform("KV4", n_layers, **KIVI_PAPER)
    maps["KIVI-2 (G32 R128)"] = KVQuantConfig.uniform("KV2", n_layers, **KIVI_PAPER)
    return maps


def parse_prefixkv(values: list[str]) -> dict[str, str]:
    """``--prefixkv`` values -> {label: address}; one unlabelled file gets the label "" (arms keep
    their plain names), several must each be ``LABEL=FILE`` with distinct labels."""
    if len(values) == 1 and not re.match(r"^\w+=", values[0]):
        return {"": values[0]}
    out = {}
    for v in values:
        m = re.match(r"^(\w+)=(.+)$", v)
        if not m:
            raise ValueError(f"--prefixkv {v}: with several files each must be LABEL=FILE (LABEL: letters, digits, _)")
        if m[1] in out:
            raise ValueError(f"--prefixkv {v}: label {m[1]!r} given twice")
        out[m[1]] = m[2]
    return out


def evict_arms(arts: dict, ratios, n_layers: int) -> dict:
    """{result key: Method}: per ratio, each PrefixKV file's scored arms (its fractions, scoring,
    window and pool), keyed ``prefixkv-window@0.2`` or ``prefixkv-window@0.2 [LABEL]``, and the
    unscored arms once (untagged)."""
    from workers.prefixkv.evaluate import MethodSpec, build_method
    from workers.prefixkv.methods import method_label

    out = {}
    for label, art in arts.items():
        mode = art.data["default_score"]
        calibrated = {mode: art.fractions()}
        window, pool = int(art.data["window"]), int(art.data.get("pool", 1))
        for r in ratios:
            for name in SCORED_ARMS:
                spec = MethodSpec(name, r, mode)
                key = arm_key(method_label(name, mode), r, label)
                out[key] = build_method(spec, n_layers, art.n_sink, window, calibrated, pool=pool)
    first = next(iter(arts.values()))
    for r in ratios:
        for name in UNSCORED_ARMS:
            spec = MethodSpec(name, r)
            out[spec.key] = build_method(spec, n_layers, first.n_sink, int(first.data["window"]), None)
    return out


ARM_KEY = re.compile(r"^(?P<method>[\w-]+)@(?P<keep>[0-9.]+)(?: \[(?P<label>\w+)\])?$")


def arm_key(method: str, keep: float, label: str = "") -> str:
    """An eviction arm's result key: ``prefixkv-window@0.2``, with `` [LABEL]`` for a labelled file."""
    return f"{method}@{keep:g}" + (f" [{label}]" if label else "")


def split_key(key: str) -> tuple[str, float, str] | None:
    """An eviction arm's key -> (method label, keep ratio, PrefixKV file label or ""); None for
    the others (full, quantized maps, external caches)."""
    m = ARM_KEY.match(key)
    return (m["method"], float(m["keep"]), m["label"] or "") if m else None  # the inverse of arm_key


def uniform_of(key: str) -> str | None:
    """The uniform-budget arm a PrefixKV arm is paired with: same scoring, keep and file."""
    parts = split_key(key)
    if parts is None or not parts[0].startswith("prefixkv-"):
        return None
    method, keep, label = parts
    return arm_key("uniform-" + method[len("prefixkv-") :], keep, label)


def _ci(d: float, se: float) -> str:
    return f"{d:+.3f} ± {se:.3f} [{d - 1.96 * se:+.3f}, {d + 1.96 * se:+.3f}]"


def summarize(hits: dict[str, list[int]]) -> list[dict]:
    """Per arm: exact match, SE, paired difference vs full (and PrefixKV vs uniform at its ratio)."""
    from workers.stats import mean_se, paired_difference

    rows = []
    for name, h in hits.items():
        em, se = mean_se([float(x) for x in h])
        row = {"arm": name, "n": len(h), "em": em, "se": se}
        full = hits["full"][: len(h)]
        if name != "full":
            row["minus_full"], row["minus_full_se"] = paired_difference([float(x) for x in h], [float(x) for x in full])
        uni_key = uniform_of(name)
        if uni_key in hits:
            uni = hits[uni_key]
            row["minus_uniform"], row["minus_uniform_se"] = paired_difference(
                [float(x) for x in h], [float(x) for x in uni]
            )
        rows.append(row)
    return rows


def markdown(res: dict) -> str:
    out = [
        f"Retrieval on `{res['model']}`: {res['n']} held-out queries of {res['length']} tokens, {res['records'][0]}-"
        f"{res['records'][1]} key-value records each (filler `{res['corpus']}`, "
        f"length chosen on {res['calib_n']} calibration queries: full-cache exact match "
        + ", ".join(f"{k}: {v:.3f}" for k, v in res["calib_em"].items())
        + (f"; KVTuner run `{res['kvtuner_run']}`" if res["kvtuner_run"] else "; no KVTuner run")
        + "; PrefixKV "
        + ", ".join(f"{lab} = `{f}`" if lab else f"`{f}`" for lab, f in res["prefixkv"].items())
        + (
            f"; transformers' full cache and ours disagree on {res['full_disagreements_transformers']} of the "
            "QuantizedCache queries."
            if res["kvtuner_run"]
            else "."
        ),
        "",
        "| cache | n | exact match (± SE) | minus full (95% CI) | PrefixKV minus uniform (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        diff = _ci(r["minus_full"], r["minus_full_se"]) if "minus_full" in r else ""
        uni = _ci(r["minus_uniform"], r["minus_uniform_se"]) if "minus_uniform" in r else ""
        out.append(f"| {r['arm']} | {r['n']} | {r['em']:.3f} ± {r['se']:.3f} | {diff} | {uni} |")
    return "\n".join(out)


def model_address(kvtuner_params: dict, arts: dict) -> str:
    """The one model every input was calibrated on: the KVTuner run's, else the PrefixKV files'."""
    named = {"--kvtuner": kvtuner_params.get("model")} if kvtuner_params else {}
    named |= {f"--prefixkv {label or 'file'}": art.data.get("model") for label, art in arts.items()}
    models = {m for m in named.values() if m is not None}
    if len(models) != 1:
        given = ", ".join(f"{k}: {v!r}" for k, v in named.items())
        raise ValueError(f"the inputs must name one model ({given})")
    return models.pop()


@torch.no_grad()
def run(a, work: Path, arts: dict) -> dict:
    """arts: {label: PrefixKVArtifact}, as main() loaded and checked them."""
    from transformers import AutoModelForCausalLM

    from benchmarks.kvtuner_libraries import hf_cache, hf_prefill, run_params
    from workers.data.corpus import load_corpus
    from workers.data.retrieval import eval_set
    from workers.eval import continuation_logits, exact_match, prefill_scored
    from workers.kvtuner.evaluate import cache_factory
    from workers.model.hf.address import load_any, load_tokenizer, local_dir

    kvt_run, p = run_params(a.kvtuner) if a.kvtuner else (None, {})
    model_addr = model_address(p, arts)
    tok, model = load_tokenizer(model_addr), load_any(model_addr)
    L = model.cfg.n_layers
    for art in arts.values():
        art.check_layers(L)
    corpus = load_corpus(a.corpus)
    records = {"min_records": a.records[0], "max_records": a.records[1]}

    length_file = work / "length.json"
    if length_file.is_file():
        chosen = json.loads(length_file.read_text())
    else:
        length, em = choose_length(model, tok, corpus.calib, a.lengths, a.calib_n, a.seed, a.min_em, a.batch, records)
        chosen = {"length": length, "calib_em": {str(k): v for k, v in em.items()}}
        length_file.write_text(json.dumps(chosen))
    tracking.log_metrics({f"calib_em/len_{k}": v for k, v in chosen["calib_em"].items()})
    tracking.log_params({"length_chosen": chosen["length"]})
    data = eval_set(
        corpus.heldout, n=a.n, length=chosen["length"], seed=a.seed + 1, split="heldout", tokenizer=tok, **records
    )

    maps = quant_arms(a.kvtuner, p, L) if a.kvtuner else {"full": None}
    methods = evict_arms(arts, a.ratios, L)
    scores = [m.score for m in methods.values()]
    hf_arms = {"quanto 4-bit (G64 R128)": 4, "quanto 2-bit (G64 R128)": 2}
    hf = None

    done_file = work / "batches.jsonl"
    done = [json.loads(x) for x in done_file.read_text().splitlines()] if done_file.is_file() else []
    start = sum(d["n"] for d in done)
    for i in range(start, a.n, a.batch):
        c, y = data.prompt[i : i + a.batch], data.value[i : i + a.batch]
        pre = prefill_scored(model, c, scores)
        hits = {}
        for name, cfg in maps.items():  # "full" (None) first: the report's first row
            hits[name] = exact_match(
                continuation_logits(model, c, y, make_cache=cache_factory(cfg, L), prefilled=pre), y
            )
        for name, m in methods.items():
            hits[name] = exact_match(continuation_logits(model, c, y, prefilled=pre, **m.forward_kwargs()), y)
        del pre
        if a.kvtuner and i < a.external_n:
            if hf is None:
                hf = AutoModelForCausalLM.from_pretrained(local_dir(model_addr), dtype=torch.float32).eval()
            kv = hf_prefill(hf, c)
            hits["transformers full"] = _hf_hits(hf, c, y, hf_cache(hf, kv, None))
            for name, nbits in hf_arms.items():
                hits[name] = _hf_hits(hf, c, y, hf_cache(hf, kv, nbits))
            del kv
        done.append({"start": i, "n": len(c), "hits": hits})
        with done_file.open("a") as f:
            f.write(json.dumps(done[-1]) + "\n")
        tracking.log_metrics({"queries_done": i + len(c)}, step=i + len(c))
        print(f"queries {i + len(c)}/{a.n}", file=sys.stderr, flush=True)

    per: dict[str, list[int]] = {}
    for d in done:
        for k, v in d["hits"].items():
            per.setdefault(k, []).extend(v)
    ext = per.get("transformers full", [])
    disagree = sum(a != b for a, b in zip(ext, per["full"]))  # the two stacks' full caches, answer by answer
    return {
        "model": model_addr,
        "corpus": a.corpus,
        "records": a.records,
        "length": chosen["length"],
        "calib_n": a.calib_n,
        "calib_em": chosen["calib_em"],
        "n": len(per["full"]),
        "kvtuner_run": kvt_run,
        "full_disagreements_transformers": disagree,
        "prefixkv": a.prefixkv_files,
        "rows": summarize(per),
        "hits": per,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_retrieval", description=__doc__.splitlines()[0])
    p.add_argument("--kvtuner", type=Path, help="a finished text run's pipelines.kvtuner --work-dir (optional)")
    p.add_argument(
        "--prefixkv",
        required=True,
        nargs="+",
        metavar="[LABEL=]FILE",
        help="prefixkv.json of PrefixKV runs on the same model (path, run id, runs:/); LABEL=FILE each when several",
    )
    p.add_argument("--work-dir", required=True, type=Path, help="resumable state of this benchmark")
    p.add_argument("--corpus", default="pydoc", help="filler text source")
    p.add_argument(
        "--records", type=int, nargs=2, default=[4, 8], metavar=("MIN", "MAX"), help="key-value records per sequence"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], help="candidate lengths (tokens)")
    p.add_argument("--min-em", type=float, default=0.8, help="the full cache's exact match the length must reach")
    p.add_argument("--calib-n", type=int, default=64, help="calibration queries per candidate length")
    p.add_argument("--n", type=int, default=500, help="held-out queries")
    p.add_argument("--external-n", type=int, default=100, help="held-out queries that also run QuantizedCache")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5], help="PrefixKV keep ratios")
    p.add_argument("--seed", type=int, default=0, help="calibration queries' seed (held-out: seed + 1)")
    p.add_argument("--batch", type=int, default=8, help="queries per forward")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: kv_retrieval)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: kv-retrieval-<model>)")
    a = p.parse_args(argv)
    if a.kvtuner and not ((a.kvtuner / "run_id").is_file() and (a.kvtuner / "out" / "report.json").is_file()):
        p.error(f"--kvtuner {a.kvtuner}: no run_id and out/report.json (not a finished pipelines.kvtuner run)")
    try:
        a.prefixkv_files = parse_prefixkv(a.prefixkv)
    except ValueError as e:
        p.error(str(e))
    for name in ("calib_n", "n", "batch", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)}: must be >= 1")
    if not 1 <= a.records[0] <= a.records[1]:
        p.error(f"--records {a.records[0]} {a.records[1]}: need 1 <= MIN <= MAX")
    if a.external_n < 0:
        p.error(f"--external-n={a.external_n}: must be >= 0")
    if not 0 < a.min_em <= 1:
        p.error(f"--min-em={a.min_em}: must be in (0, 1]")
    bad = [r for r in a.ratios if not 0 < r < 1]
    if bad:
        p.error(f"--ratios {bad[0]}: a keep ratio must be in (0, 1)")
    from benchmarks.kvtuner_libraries import run_params
    from workers.prefixkv import artifact as pkv

    try:  # every input is read (and checked) before any work: the KVTuner run's params come from this store
        if a.kvtuner:
            tracking.check_run((a.kvtuner / "run_id").read_text().strip(), f"--kvtuner {a.kvtuner}: run")
        arts = {}
        for label, f in a.prefixkv_files.items():
            try:
                arts[label] = pkv.load(f)
            except (ValueError, OSError) as e:
                raise ValueError(f"--prefixkv {f}: {e}") from e
        model = model_address(run_params(a.kvtuner)[1] if a.kvtuner else {}, arts)
    except (tracking.TrackingError, ValueError, OSError) as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    a.work_dir.mkdir(parents=True, exist_ok=True)
    id_file = a.work_dir / "run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if run_id:
        tracking.mark_failed_if_running(run_id)
    params = {k: str(v) for k, v in vars(a).items() if k not in ("experiment", "run_name", "prefixkv_files")}
    params |= {"prefixkv": " ".join(a.prefixkv), "model": model}  # one file: the param as runs before labels logged it
    with tracking.start_run(
        "kv_retrieval",
        experiment=a.experiment,
        run_name=a.run_name or f"kv-retrieval-{model}",
        params=params,
        run_id=run_id,
    ) as active:
        id_file.write_text(active.info.run_id)
        res = run(a, a.work_dir, arts)
        key = tracking.metric_key
        tracking.log_metrics({f"em/{key(r['arm'])}": r["em"] for r in res["rows"]})
        for m in ("minus_full", "minus_full_se", "minus_uniform", "minus_uniform_se"):
            tracking.log_metrics({f"{m}/{key(r['arm'])}": r[m] for r in res["rows"] if m in r})
        text = markdown(res)
        tracking.log_report(res, text, "kv_retrieval")
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
