"""PrefixKV (calibray) side by side with NVIDIA kvpress presses, same HF model, same tokens.

kvpress 0.5.5 pins transformers < 5.3, so it lives in its own environment that reuses the
main one's torch (never a second torch):

    python -m venv .venv-kvpress
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-kvpress/lib/python3.11/site-packages/zz_main.pth
    .venv-kvpress/bin/pip install kvpress==0.5.5          # pulls transformers 5.2 into .venv-kvpress only
    .venv-kvpress/bin/python -m benchmarks.prefixkv_kvpress --model hf:<dir> --calibration runs:/<id>/prefixkv.json
    .venv-kvpress/bin/python -m benchmarks.prefixkv_kvpress --data retrieval --model hf:<dir> --calibration <json>

For every keep ratio r (kvpress compression_ratio = 1 - r) and every method, on the same
held-out windows: prefill the context with the method, then score the continuation with the
cache left as it is (kvpress compresses only during prefill; our cache's decode cap acts only
after a forward, so one teacher-forced forward is the same protocol). Reported: continuation
NLL (nats, paired SE versus the full cache) and the measured bytes of cached keys and values,
as a ratio to the full cache. kvpress runs token by token, exactly as its own pipeline decodes.
The calibray half runs in a child process of the main environment (`--python`), on the same
windows, so each environment keeps its own transformers; `--part` runs one half alone.

`--data retrieval` runs the same comparison on held-out queries of the retrieval task
(workers.data.retrieval.eval_set, sequences of --context + 3 bytes, default 256: the prompt
ends with `?key=`, the 3 value bytes follow). Exact match = the argmax at the prompt's last
position and at the next two positions (value bytes teacher-forced) gives all 3 value bytes;
reported with its binomial SE, the paired difference versus the full cache (paired SE over the
same queries), the value bytes' mean NLL and the KV bytes ratio. Two settings, both halves:

- `agnostic` (question after compression, kvpress's default pipeline: the question is not
  compressed and the press never sees it): prefill prompt[:-5] (the prompt without `?key=`)
  under the method, then feed `?key=` and the first two value bytes through the cache as left.
- `aware` (question inside the compressed prefill, kvpress's `compress_questions` setting):
  prefill the prompt minus its final `=` (so `?key` is scored by the method), evict, then feed
  `=` and two value bytes, so every value byte is predicted through the compressed cache (the
  prefill forward, which still sees everything, predicts nothing that is scored). Same split
  as workers.eval.retrieval_accuracy and pipelines.prefixkv. calibray scores this setting with
  `--aware-score` (default `window`: attention from the last `window` prefill queries, which
  cover the question, like SnapKV's observation window); `agnostic` uses `--score`.

KV bytes are measured right after the prefill, so each setting's ratio is to its own full cache.

`--run <id>` (text) scores the held-out windows of a finished `pipelines.prefixkv` text run (a
real checkpoint such as `smollm2-135m`, in its own tokens): the main environment rebuilds them from
the run's params exactly as the pipeline did (`pipelines.prefixkv.eval_data`), checks that its
full cache reproduces the run's logged full-cache NLL on every window, and hands the tokens and the
run's per-window NLL of each arm (PrefixKV, uniform, pyramid, recency, random) to the kvpress
half, which scores only its presses and the full cache on them. The kvpress rows are then paired
against the run's own arms on the same windows; the calibray arms are not recomputed.

`--retrieval-run <work dir>` does the same for a finished `benchmarks.kv_retrieval` run (its
`--work-dir`): the first `--samples` of its held-out queries are rebuilt in the model's tokens
from the run's params and chosen length, our full cache must give the run's logged answer on
every one of them, and the kvpress half prefills each prompt minus its last token under each
press (the run's protocol: the question is inside the compressed prefill, as the run's `window`
scoring saw it), then decodes the last prompt token and the value tokens one by one. The presses'
exact match is paired against the run's own arms (uniform budget, PrefixKV) on the same queries;
both environments' full caches must also give the same greedy value tokens (argmax at every value
position) on every query.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from workers.data.corpus import load_corpus
from workers.data.retrieval import KEY_LEN, VALUE_LEN, eval_set
from workers.eval import exact_match, token_nll
from workers.stats import mean_se, paired_difference

# Prompt bytes fed after the compressed prefill, per retrieval setting.
SETTINGS = {"agnostic": 1 + KEY_LEN + 1, "aware": 1}  # "?key=" / "="


def kvpress_presses(ratio: float) -> dict:
    """kvpress presses at their default settings (nothing tuned), compression_ratio = 1 - keep."""
    from kvpress import ExpectedAttentionPress, KnormPress, PyramidKVPress, SnapKVPress

    c = round(1.0 - ratio, 6)
    return {
        "kvpress-snapkv": SnapKVPress(compression_ratio=c),
        "kvpress-pyramidkv": PyramidKVPress(compression_ratio=c),
        "kvpress-expected-attention": ExpectedAttentionPress(compression_ratio=c),
        "kvpress-knorm": KnormPress(compression_ratio=c),
    }


@torch.no_grad()
def kvpress_logits(hf, context, continuation, press):
    """HF model + press: prefill context[:, :-1] under the press, then decode token by token.

    Returns logits [N, M, V] fp32 for the continuation tokens and the KV bytes after prefill.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    pre = context[:, :-1]
    n = pre.shape[1]
    pos = torch.arange(n).unsqueeze(0).expand(pre.shape[0], -1)
    if press is None:
        hf(input_ids=pre, past_key_values=cache, position_ids=pos, use_cache=True)
    else:
        with press(hf):
            hf(input_ids=pre, past_key_values=cache, position_ids=pos, use_cache=True)
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    feed = torch.cat([context[:, -1:], continuation[:, :-1]], 1)
    logits = []
    for t in range(feed.shape[1]):
        p = torch.full((feed.shape[0], 1), n + t)
        out = hf(
            input_ids=feed[:, t : t + 1], past_key_values=cache, position_ids=p, cache_position=p[0], use_cache=True
        )
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1), kv_bytes


def kvpress_nll(hf, context, continuation, press, batch: int | None = None):
    """Per-window continuation NLL (nats/token) and the KV bytes after prefill, summed over batches
    of `batch` windows (None: all at once)."""
    batch = batch or context.shape[0]
    nll, kv_bytes = [], 0
    for i in range(0, context.shape[0], batch):
        logits, b = kvpress_logits(hf, context[i : i + batch], continuation[i : i + batch], press)
        nll += token_nll(logits, continuation[i : i + batch]).mean(1).tolist()
        kv_bytes += b
    return nll, kv_bytes


@torch.no_grad()
def calibray_logits(model, context, continuation, method):
    """Our HF path + an evicting cache; KV bytes measured right after prefill, like kvpress's."""
    from workers.eval import continuation_logits

    seen = {}

    def after_prefill(cache, _context):
        seen["bytes"] = sum(
            cache.layers[i].k.numel() * cache.layers[i].k.element_size() * 2 for i in range(len(cache.layers))
        )

    logits = continuation_logits(model, context, continuation, after_prefill=after_prefill, **method.forward_kwargs())
    return logits.float(), seen["bytes"]


def calibray_nll(model, context, continuation, method):
    logits, kv_bytes = calibray_logits(model, context, continuation, method)
    nll = token_nll(logits, continuation).mean(1)
    return nll.tolist(), kv_bytes


def run_windows(run_id: str, n: int | None):
    """A finished pipelines.prefixkv text run -> (its params, context [n, C], continuation [n, M],
    {arm@keep: per-window NLL} as it logged them); the first `n` of its held-out windows (all: None)."""
    import mlflow

    from pipelines.prefixkv import RunConfig, eval_data
    from workers.model.hf.address import load_tokenizer
    from workers.runtime.tracking import download

    params = mlflow.get_run(run_id).data.params
    if params.get("data") != "text":
        raise ValueError(f"--run {run_id}: a {params.get('data')!r} run; --run takes a text run")
    ints = ("samples", "context", "continuation", "eval_samples", "seed")
    cfg = RunConfig(model=params["model"], corpus=params["corpus"], workers=1, **{k: int(params[k]) for k in ints})
    if params.get("eval_seed", "None") != "None":  # runs before --eval-seed existed used seed + 1
        cfg = dataclasses.replace(cfg, eval_seed=int(params["eval_seed"]))
    ctx, cont = eval_data(cfg, load_corpus(cfg.corpus), load_tokenizer(cfg.model))
    per_example = json.loads(download(f"runs:/{run_id}/eval/eval.json").read_text())["per_example"]
    n = ctx.shape[0] if n is None else min(n, ctx.shape[0])
    return params, ctx[:n], cont[:n], {k: v[:n] for k, v in per_example.items()}


def _windows(a):
    g = torch.Generator().manual_seed(a.seed)
    w = load_corpus().sample_windows("heldout", a.context + a.continuation, a.samples, g)
    return w[:, : a.context], w[:, a.context :]


def _queries(a):
    """Held-out retrieval queries: prompt [n, context] ending with `?key=`, value [n, 3]."""
    es = eval_set(load_corpus().heldout, n=a.samples, length=a.context + VALUE_LEN, seed=a.seed, split="heldout")
    return es.prompt, es.value


def retrieval_split(prompt, value, fed: int):
    """(context, continuation) for the continuation protocol: context[:, :-1] = prompt[:, :-fed] is
    prefilled; prompt[:, -fed:] and value[:, :-1] are fed; the last 3 logits predict the value."""
    seq = torch.cat([prompt, value], 1)
    cut = prompt.shape[1] - fed + 1
    return seq[:, :cut], seq[:, cut:]


def retrieval_row(logits, value, kv_bytes) -> dict:
    """logits [N, M, V] whose last 3 positions predict value [N, 3] -> hits, value NLL, KV bytes."""
    lg = logits[:, -VALUE_LEN:]
    hits = exact_match(lg, value)
    nll = token_nll(lg, value).mean(1).tolist()
    return {"hits": hits, "nll": nll, "kv_bytes": kv_bytes}


def _retrieval_rows(a, ratios, run) -> dict:
    """run(context, continuation, setting, ratio | None) -> {name: (logits, kv_bytes)} per cell."""
    prompt, value = _queries(a)
    rows = {}
    for setting in a.settings.split(","):
        ctx, cont = retrieval_split(prompt, value, SETTINGS[setting])
        for r in [None, *ratios]:
            for name, (logits, b) in run(ctx, cont, setting, r).items():
                rows[f"{setting}/{name}@{1 if r is None else r:g}"] = retrieval_row(logits, value, b)
    return rows


def retrieval_run_queries(work: str, n: int):
    """A finished benchmarks.kv_retrieval run (its --work-dir) -> (model address, prompt [n, L-V],
    value [n, V], {arm: per-query hits} as it logged them) for its first `n` held-out queries."""
    import ast

    import mlflow

    from benchmarks.kvtuner_libraries import run_params
    from workers.data.retrieval import eval_set
    from workers.model.hf.address import load_tokenizer

    work = Path(work)
    run_id = (work / "run_id").read_text().strip()
    p = mlflow.get_run(run_id).data.params
    # runs before the `model` param was logged always had a KVTuner run, whose params name it
    model = p["model"] if "model" in p else run_params(Path(p["kvtuner"]))[1]["model"]
    length = json.loads((work / "length.json").read_text())["length"]
    lo, hi = ast.literal_eval(p["records"])
    n = min(n, int(p["n"]))
    es = eval_set(
        load_corpus(p["corpus"]).heldout,
        n=int(p["n"]),
        length=length,
        seed=int(p["seed"]) + 1,
        split="heldout",
        tokenizer=load_tokenizer(model),
        min_records=lo,
        max_records=hi,
    )
    logged: dict[str, list[int]] = {}
    for line in (work / "batches.jsonl").read_text().splitlines():
        for k, v in json.loads(line)["hits"].items():
            logged.setdefault(k, []).extend(v)
    if len(logged.get("full", [])) < n:
        raise ValueError(f"--retrieval-run {work}: {len(logged.get('full', []))} queries logged, {n} asked")
    return run_id, model, es.prompt[:n], es.value[:n], {k: v[:n] for k, v in logged.items() if len(v) >= n}


def _greedy(logits, value) -> list[list[int]]:
    """The argmax token at each value position (value tokens teacher-forced): [N][V]."""
    return logits[:, -value.shape[1] :].argmax(-1).tolist()


def calibray_retrieval_run_half(a) -> dict:
    """--retrieval-run: the run's queries rebuilt, our full cache on them (its answers checked
    against the run's), the run's per-query hits per arm; the tokens go to the kvpress half."""
    import transformers

    from workers.caches.protocol import DynamicCache
    from workers.eval import continuation_logits
    from workers.model.hf.address import load_any, local_dir

    run_id, model_addr, prompt, value, logged = retrieval_run_queries(a.retrieval_run, a.samples)
    model = load_any(model_addr)
    hits, greedy = [], []
    for i in range(0, prompt.shape[0], a.batch):
        c, y = prompt[i : i + a.batch], value[i : i + a.batch]
        lg = continuation_logits(model, c, y, make_cache=lambda: DynamicCache(model.cfg.n_layers))
        hits += exact_match(lg, y)
        greedy += _greedy(lg, y)
        print(f"calibray full cache: {i + len(c)}/{prompt.shape[0]} queries", file=sys.stderr, flush=True)
    differ = sum(x != y for x, y in zip(hits, logged["full"]))
    if differ:
        raise RuntimeError(f"--retrieval-run {a.retrieval_run}: rebuilt queries change {differ} full-cache answers")
    return {
        "transformers": transformers.__version__,
        "run_id": run_id,
        "model": model_addr,
        "model_dir": str(local_dir(model_addr)),
        "prompt": prompt.tolist(),
        "value": value.tolist(),
        "full_greedy": greedy,
        "logged": logged,
    }


def kvpress_retrieval_run(a, ratios) -> dict:
    """kvpress half of --retrieval-run: {full, press@keep: {hits, greedy, kv_bytes}} on the handed queries."""
    import transformers

    half = json.loads(Path(a.windows_from).read_text())
    hf = _load_kvpress_model(half["model_dir"])
    prompt, value = torch.tensor(half["prompt"]), torch.tensor(half["value"])
    cells = [("full@1", None)] + [(f"{n}@{r:g}", p) for r in ratios for n, p in kvpress_presses(r).items()]
    rows = {}
    for j, (key, press) in enumerate(cells):
        t, row = time.time(), {"hits": [], "greedy": [], "kv_bytes": 0}
        for i in range(0, prompt.shape[0], a.batch):
            c, y = prompt[i : i + a.batch], value[i : i + a.batch]
            lg, b = kvpress_logits(hf, c, y, press)
            row["hits"] += exact_match(lg, y)
            row["greedy"] += _greedy(lg, y)
            row["kv_bytes"] += b
        rows[key] = row
        print(f"kvpress {key}: {time.time() - t:.0f} s ({j + 1}/{len(cells)})", file=sys.stderr, flush=True)
    return {"transformers": transformers.__version__, "rows": rows}


def report_retrieval_run(a, kv, ours, t0) -> dict:
    """Presses' exact match paired against the kvpress full cache and the run's uniform budget at
    the same keep; the run's own PrefixKV and uniform rows on the same queries beside them."""
    from benchmarks.kv_retrieval import arm_key, split_key
    from workers.stats import ci95

    def ci(d, se):
        lo, hi = ci95(d, se)
        return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    full = kv["rows"].pop("full@1")
    n = len(full["hits"])
    labels = sorted({split_key(k)[2] for k in ours["logged"] if split_key(k)} - {""})  # "": unlabelled arms
    first = labels[0] if labels else ""
    greedy_differ = sum(x != y for x, y in zip(full["greedy"], ours["full_greedy"]))
    out = {
        "transformers": {"kvpress": kv["transformers"], "calibray": ours["transformers"]},
        "args": vars(a),
        "retrieval_run": ours["run_id"],
        "model": ours["model"],
        "n": n,
        "full_hits_differ_from_run": sum(x != y for x, y in zip(full["hits"], ours["logged"]["full"])),
        "full_greedy_differ": greedy_differ,
        "rows": [],
        "seconds": round(time.time() - t0, 1),
    }
    rows = {k: {"hits": v} for k, v in ours["logged"].items() if split_key(k)}
    rows.update(kv["rows"])
    keeps = {float(r) for r in a.ratios.split(",")}
    rows = {k: v for k, v in rows.items() if split_key(k)[1] in keeps}
    em0 = sum(full["hits"]) / n
    lines = [
        f"Run `{ours['run_id']}`'s first {n} held-out queries on `{ours['model']}`: full cache exact match "
        f"{em0:.3f} (kvpress's transformers {kv['transformers']}, ours {ours['transformers']}); the two full "
        f"caches' greedy value tokens differ on {greedy_differ} of {n} queries, their answers on "
        f"{out['full_hits_differ_from_run']} (kvpress against the run's logged answers)."
        + (f" Presses are paired with the uniform budget of PrefixKV file `{first}`." if first else ""),
        "",
        "| method@keep | exact match (± SE) | minus full (95% CI) | minus uniform budget (95% CI) | KV bytes / full |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, row in sorted(rows.items(), key=lambda kv_: (split_key(kv_[0])[1], kv_[0])):
        h = [float(x) for x in row["hits"]]
        em, se = mean_se(h)
        d, dse = paired_difference(h, [float(x) for x in full["hits"]])
        # our arms against their own file's uniform budget; a press (no label) against the first file's
        _, keep, label = split_key(key)
        uni = ours["logged"].get(arm_key("uniform-window", keep, label or first))
        du, duse = (
            paired_difference(h, [float(x) for x in uni]) if uni and not key.startswith("uniform") else (None, None)
        )
        ratio = row["kv_bytes"] / full["kv_bytes"] if "kv_bytes" in row else None
        out["rows"].append(
            {
                "key": key,
                "exact_match": em,
                "se": se,
                "diff_vs_full": d,
                "diff_se": dse,
                "diff_vs_uniform": du,
                "diff_vs_uniform_se": duse,
                "kv_ratio": ratio,
                "per_example": row["hits"],
            }
        )
        lines.append(
            f"| {key} | {em:.3f} ± {se:.3f} | {ci(d, dse)} | {'' if du is None else ci(du, duse)} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} |"
        )
    return _printed(out, lines)


def _load_kvpress_model(path: str):
    """An HF directory (`hf:<dir>` or a path) in this environment's transformers, fp32, sdpa."""
    from transformers import AutoModelForCausalLM

    path = path[3:] if path.startswith("hf:") else path
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    ).eval()


def run_kvpress(a, ratios) -> dict:
    """kvpress half (this environment must have kvpress): {key: (per-example NLL, KV bytes)}
    for text, {key: retrieval_row} for retrieval."""
    import transformers

    if a.retrieval_run:
        return kvpress_retrieval_run(a, ratios)
    if a.run:  # the main environment's half resolved the model and rebuilt the run's windows
        half = json.loads(Path(a.windows_from).read_text())
        hf = _load_kvpress_model(half["model_dir"])
        ctx, cont = torch.tensor(half["context"]), torch.tensor(half["continuation"])
    else:
        hf = _load_kvpress_model(a.model)
    out = {"transformers": transformers.__version__, "rows": {}}
    if a.data == "retrieval":

        def run(ctx, cont, _setting, r):
            presses = {"full": None} if r is None else kvpress_presses(r)
            return {name: kvpress_logits(hf, ctx, cont, press) for name, press in presses.items()}

        out["rows"] = _retrieval_rows(a, ratios, run)
        return out
    if not a.run:
        ctx, cont = _windows(a)
    cells = [("full@1", None)] + [(f"{n}@{r:g}", p) for r in ratios for n, p in kvpress_presses(r).items()]
    for i, (key, press) in enumerate(cells):
        t = time.time()
        out["rows"][key] = kvpress_nll(hf, ctx, cont, press, a.batch)
        print(f"kvpress {key}: {time.time() - t:.0f} s ({i + 1}/{len(cells)})", file=sys.stderr, flush=True)
    return out


def run_calibray(a, ratios) -> dict:
    """calibray half (main environment): PrefixKV, uniform and pyramid with the calibrated scoring."""
    import transformers

    from workers.model.hf.address import load_hf
    from workers.prefixkv import artifact
    from workers.prefixkv.methods import Method

    if a.retrieval_run:
        return calibray_retrieval_run_half(a)
    if a.run:
        return calibray_run_half(a)
    cal = artifact.load(a.calibration)
    ours = load_hf(a.model)
    n_layers = ours.cfg.n_layers
    if cal.n_layers != n_layers:
        raise ValueError(f"--calibration has {cal.n_layers} layers, --model has {n_layers}")
    out = {"transformers": transformers.__version__, "rows": {}}
    if a.data == "retrieval":
        modes = {"agnostic": a.score, "aware": a.aware_score}

        def run(ctx, cont, setting, r):
            if r is None:
                return {"full": calibray_logits(ours, ctx, cont, Method("full", 1.0, n_layers))}
            score, fractions = cal.score(modes[setting]), cal.fractions(modes[setting])
            res = {}
            for name in ("prefixkv", "uniform", "pyramid"):
                m = Method(name, r, n_layers, score, cal.n_sink, calibrated=fractions)
                res[f"calibray-{name}-{score.mode}"] = calibray_logits(ours, ctx, cont, m)
            return res

        out["rows"] = _retrieval_rows(a, ratios, run)
        return out
    ctx, cont = _windows(a)
    score = cal.score(a.score)
    out["rows"]["full@1"] = calibray_nll(ours, ctx, cont, Method("full", 1.0, n_layers))
    for r in ratios:
        for name in ("prefixkv", "uniform", "pyramid"):
            m = Method(name, r, n_layers, score, cal.n_sink, calibrated=cal.fractions(a.score))
            out["rows"][f"calibray-{name}-{score.mode}@{r:g}"] = calibray_nll(ours, ctx, cont, m)
    return out


def calibray_run_half(a) -> dict:
    """--run: the run's windows rebuilt, our full cache on them (checked against the run's own
    full-cache NLL), and the run's per-window arms; the tokens go to the kvpress half."""
    import transformers

    from workers.model.hf.address import load_hf, local_dir
    from workers.prefixkv.methods import Method

    params, ctx, cont, logged = run_windows(a.run, a.samples)
    ours = load_hf(params["model"])
    n_layers = ours.cfg.n_layers

    full = []
    for i in range(0, ctx.shape[0], a.batch):
        full += calibray_nll(ours, ctx[i : i + a.batch], cont[i : i + a.batch], Method("full", 1.0, n_layers))[0]
    drift = max(abs(x - y) for x, y in zip(full, logged["full@1"]))
    if drift > 1e-4:
        raise RuntimeError(f"--run {a.run}: rebuilt windows give a full-cache NLL {drift:.2e} nats from the run's")
    return {
        "transformers": transformers.__version__,
        "model_dir": str(local_dir(params["model"])),
        "model": params["model"],
        "context": ctx.tolist(),
        "continuation": cont.tolist(),
        "run_drift": drift,
        "rows": {"full@1": (full, None), **{f"run:{k}": (v, None) for k, v in logged.items() if k != "full@1"}},
    }


def _printed(out: dict, lines: list[str]) -> dict:
    """A report with its markdown table, printed."""
    out["markdown"] = "\n".join(lines)
    print(out["markdown"])
    return out


def report_text(a, kv, ours, t0) -> dict:
    """Each row's NLL paired against the kvpress full cache and, with `--run`, against the run's
    uniform budget at the same keep (scoring `--score`, default `window`) on the same windows."""
    reference = f"run:uniform-{a.score or 'window'}"
    full_nll, full_bytes = kv["rows"].pop("full@1")
    ours_full, _ = ours["rows"].pop("full@1")
    out = {
        "transformers": {"kvpress": kv["transformers"], "calibray": ours["transformers"]},
        "args": vars(a),
        "n_windows": len(full_nll),
        "full_nll": mean_se(full_nll),
        "full_per_example": full_nll,
        "full_kv_bytes": full_bytes,
        "full_paths_max_abs_diff": max(abs(x - y) for x, y in zip(full_nll, ours_full)),
        "rows": [],
        "seconds": round(time.time() - t0, 1),
    }
    lines = [
        f"full cache ({out['n_windows']} windows): NLL {out['full_nll'][0]:.4f} +- {out['full_nll'][1]:.4f}, KV "
        f"{full_bytes} bytes; kvpress vs calibray full-cache paths differ by at most "
        f"{out['full_paths_max_abs_diff']:.2e} nats per window",
        "",
        f"| method@keep | NLL | SE | minus full (paired SE) | minus {reference} (paired SE) | KV bytes / full |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = {**kv["rows"], **ours["rows"]}
    for key, (nll, b) in sorted(rows.items(), key=lambda kv_: (float(kv_[0].split("@")[1]), kv_[0])):
        m, se = mean_se(nll)
        d, dse = paired_difference(nll, full_nll)
        ref = rows.get(f"{reference}@{key.split('@')[1]}")
        du, duse = paired_difference(nll, ref[0]) if ref else (None, None)
        out["rows"].append(
            {
                "key": key,
                "nll": m,
                "se": se,
                "diff_vs_full": d,
                "diff_se": dse,
                "diff_vs_uniform": du,
                "diff_vs_uniform_se": duse,
                "kv_bytes": b,
                "per_example": nll,
            }
        )
        vs_uniform = "" if ref is None else f"{du:+.4f} ({duse:.4f})"
        ratio = "" if b is None else f"{b / full_bytes:.3f}"
        lines.append(f"| {key} | {m:.4f} | {se:.4f} | {d:+.4f} ({dse:.4f}) | {vs_uniform} | {ratio} |")
    return _printed(out, lines)


def report_retrieval(a, kv, ours, t0) -> dict:
    """Exact match per (setting, method, keep), paired against the setting's kvpress full cache."""
    out = {
        "transformers": {"kvpress": kv["transformers"], "calibray": ours["transformers"]},
        "args": vars(a),
        "full": {},
        "rows": [],
        "seconds": round(time.time() - t0, 1),
    }
    table = [
        "| setting | method@keep | exact match | SE | minus full | paired SE | value NLL | KV bytes / full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting in a.settings.split(","):
        full, ours_full = kv["rows"].pop(f"{setting}/full@1"), ours["rows"].pop(f"{setting}/full@1")
        n = len(full["hits"])
        acc = sum(full["hits"]) / n
        out["full"][setting] = {
            "exact_match": acc,
            "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n),
            "n": n,
            "per_example": full["hits"],
            "value_nll": mean_se(full["nll"]),
            "kv_bytes": full["kv_bytes"],
            "calibray_kv_bytes": ours_full["kv_bytes"],
            "paths_hit_mismatches": sum(x != y for x, y in zip(full["hits"], ours_full["hits"])),
            "paths_max_abs_nll_diff": max(abs(x - y) for x, y in zip(full["nll"], ours_full["nll"])),
        }
        f = out["full"][setting]
        print(
            f"{setting}: full cache exact match {acc:.3f} +- {f['se']:.3f} ({n} queries), KV {f['kv_bytes']} bytes; "
            f"kvpress vs calibray full-cache paths: {f['paths_hit_mismatches']} of {n} hits differ, "
            f"value NLL differs by at most {f['paths_max_abs_nll_diff']:.2e} nats"
        )
        table.append(f"| {setting} | full@1 | {acc:.3f} | {f['se']:.3f} | | | {f['value_nll'][0]:.4f} | 1.000 |")
        cells = {k: v for k, v in {**kv["rows"], **ours["rows"]}.items() if k.startswith(f"{setting}/")}
        for key, row in sorted(cells.items(), key=lambda c: (float(c[0].split("@")[1]), c[0])):
            hits = row["hits"]
            p = sum(hits) / n
            se = math.sqrt(max(p * (1 - p), 1e-12) / n)
            d, dse = paired_difference(hits, full["hits"])
            ratio = row["kv_bytes"] / full["kv_bytes"]
            out["rows"].append(
                {
                    "key": key,
                    "setting": setting,
                    "exact_match": p,
                    "se": se,
                    "diff_vs_full": d,
                    "diff_se": dse,
                    "value_nll": mean_se(row["nll"]),
                    "kv_bytes": row["kv_bytes"],
                    "kv_ratio": ratio,
                    "per_example": hits,
                }
            )
            name = key.split("/", 1)[1]
            table.append(
                f"| {setting} | {name} | {p:.3f} | {se:.3f} | {d:+.3f} | {dse:.3f} | "
                f"{out['rows'][-1]['value_nll'][0]:.4f} | {ratio:.3f} |"
            )
    return _printed(out, table)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefixkv_kvpress", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="hf:<dir> of a Llama-shaped model (e.g. the exported dense model)")
    p.add_argument("--calibration", help="prefixkv.json (path or runs:/<id>/prefixkv.json)")
    p.add_argument("--run", default=None, help="a pipelines.prefixkv text run id: its model and held-out windows")
    p.add_argument(
        "--retrieval-run", default=None, help="a benchmarks.kv_retrieval --work-dir: its model and held-out queries"
    )
    p.add_argument("--batch", type=int, default=8, help="windows or queries per forward")
    p.add_argument("--windows-from", default=None, help=argparse.SUPPRESS)  # --run: the calibray half's JSON
    p.add_argument("--data", choices=("text", "retrieval"), default="text", help="held-out text or retrieval queries")
    p.add_argument("--score", default=None, help="calibrated score mode to use (default: the file's default)")
    p.add_argument("--aware-score", default="window", help="retrieval: calibray score mode in the 'aware' setting")
    p.add_argument("--settings", default="agnostic,aware", help="retrieval settings (see the module docstring)")
    p.add_argument("--ratios", default="0.1,0.2,0.5", help="keep ratios")
    p.add_argument("--context", type=int, default=None, help="context tokens (text: 192; retrieval: prompt, 253)")
    p.add_argument("--continuation", type=int, default=64, help="scored tokens (text)")
    p.add_argument("--samples", type=int, default=64, help="held-out windows or retrieval queries")
    p.add_argument("--seed", type=int, default=1, help="window / query sampling seed")
    p.add_argument("--part", choices=("both", "kvpress", "calibray"), default="both", help="which half to run")
    p.add_argument("--python", default=".venv/bin/python", help="main-environment python for the calibray half")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--experiment", default=None, help="log the result as a run of this MLflow experiment")
    a = p.parse_args(argv)
    if a.run and a.retrieval_run:
        p.error("--run and --retrieval-run: give one")
    if a.retrieval_run and not (Path(a.retrieval_run) / "batches.jsonl").is_file():
        p.error(f"--retrieval-run {a.retrieval_run}: no batches.jsonl (not a benchmarks.kv_retrieval work dir)")
    if a.run:
        if a.data != "text":
            p.error(f"--data={a.data}: --run takes a text run")
    elif a.retrieval_run:
        a.data = "retrieval"
    elif not (a.model and a.calibration):
        p.error("--model and --calibration are required without --run")
    if a.context is None:
        a.context = 192 if a.data == "text" else 256 - VALUE_LEN
    ratios = [float(r) for r in a.ratios.split(",")]
    for r in ratios:
        if not 0 < r < 1:
            raise ValueError(f"--ratios: keep ratio {r} must be in (0, 1) (kvpress compression_ratio = 1 - keep)")
    for s in a.settings.split(","):
        if s not in SETTINGS:
            raise ValueError(f"--settings: {s!r} is not one of {tuple(SETTINGS)}")
    t0 = time.time()
    if a.part != "both":
        res = run_kvpress(a, ratios) if a.part == "kvpress" else run_calibray(a, ratios)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f)
        return res
    if not a.experiment:
        return compare(a, ratios, t0)
    from workers.runtime import tracking

    source = a.run or (a.retrieval_run and Path(a.retrieval_run, "run_id").read_text().strip())
    name = f"kvpress-vs-prefixkv-{a.data}-" + (f"run-{source[:8]}" if source else Path(a.model).name)
    params = {k: str(v) for k, v in vars(a).items() if k not in ("experiment", "windows_from")}
    with tracking.start_run("prefixkv_kvpress", experiment=a.experiment, run_name=name, params=params):
        out = compare(a, ratios, t0)
        key = tracking.metric_key
        for r in out["rows"]:
            metrics = {"nll": r.get("nll"), "exact_match": r.get("exact_match"), "minus_full": r["diff_vs_full"]}
            metrics["minus_uniform"] = r.get("diff_vs_uniform")
            tracking.log_metrics({f"{m}/{key(r['key'])}": v for m, v in metrics.items() if v is not None})
        tracking.log_report(out, out["markdown"], "prefixkv_kvpress")
    return out


def compare(a, ratios, t0) -> dict:
    """Both halves, one after the other, and the report."""
    # The calibray half runs first, in the main environment (its transformers), on the same windows:
    # never beside the kvpress half, since two multi-threaded torch processes on a few cores
    # spin-wait each other to a crawl.
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        args = [a.python, "-m", "benchmarks.prefixkv_kvpress", "--part", "calibray", "--out", tmp.name]
        flags = (
            "model",
            "calibration",
            "run",
            "retrieval_run",
            "data",
            "score",
            "aware_score",
            "settings",
            "ratios",
            "context",
        )
        for flag in (*flags, "continuation", "samples", "seed", "batch"):
            if getattr(a, flag) is not None:
                args += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        if subprocess.run(args).returncode != 0:
            raise RuntimeError(f"calibray half failed: {' '.join(args)}")
        a.windows_from = tmp.name
        ours = json.loads(Path(tmp.name).read_text())
        kv = run_kvpress(a, ratios)
    report = report_retrieval_run if a.retrieval_run else report_retrieval if a.data == "retrieval" else report_text
    out = report(a, kv, ours, t0)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
