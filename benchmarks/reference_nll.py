"""Check a KVTuner or PrefixKV run's full-precision NLL against plain transformers on the same tokens.

    python -m benchmarks.reference_nll <run_id> [<run_id> ...]

Rebuilds the run's held-out text examples from its logged parameters (model, corpus, lengths, seed)
with the model's own tokenizer, scores the continuation tokens with `AutoModelForCausalLM(...,
labels=...)` (context tokens masked with -100), and prints one JSON line per run: the run's
logged value, the reference, their difference, and bits/byte from the formula.
"""

from __future__ import annotations

import json
import math
import sys

import mlflow
import torch

from workers.data.corpus import load_corpus
from workers.model.hf.address import load_tokenizer, local_dir, resolve_dtype
from workers.runtime import cli, tracking


def held_out(pipeline: str, params: dict[str, str], tokenizer) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(context [N, C], continuation [N, M], the metric the run logged its full-precision NLL as)."""
    corpus = load_corpus(params["corpus"])
    if pipeline == "kvtuner":
        from pipelines.kvtuner import heldout_seed
        from workers.kvtuner.evaluate import build_data

        p = {k: int(params[k]) for k in ("report_n", "length", "continuation")}
        seed = heldout_seed(params)
        d = build_data(
            "text", corpus, "heldout", p["report_n"], seed, p["length"], p["continuation"], tokenizer=tokenizer
        )
        return d.context, d.continuation, "heldout_full"
    from pipelines import prefixkv

    argv = ["--model", params["model"], "--corpus", params["corpus"], "--seed", params["seed"]]
    for k in ("context", "continuation", "eval_samples"):
        argv += [f"--{k.replace('_', '-')}", params[k]]
    if params.get("eval_seed") not in (None, "None"):
        argv += ["--eval-seed", params["eval_seed"]]
    context, continuation = prefixkv.eval_data(prefixkv.parse_args(argv), corpus, tokenizer)
    return context, continuation, "nll_full_r1"


@torch.no_grad()
def check(run_id: str, batch_size: int = 4) -> dict:
    from transformers import AutoModelForCausalLM

    run = mlflow.MlflowClient().get_run(run_id)
    pipeline, params = run.data.tags["pipeline"], run.data.params
    if params.get("task", params.get("data")) != "text":
        raise SystemExit(f"run {run_id}: only text runs have a continuation NLL to check")
    tok = load_tokenizer(params["model"])
    context, continuation, key = held_out(pipeline, params, tok)
    dtype = resolve_dtype(params.get("model_dtype", "fp32"), "cpu")  # the dtype the run's actors used
    ref = AutoModelForCausalLM.from_pretrained(local_dir(params["model"]), dtype=dtype, local_files_only=True).eval()
    x = torch.cat([context, continuation], 1)
    labels = x.clone()
    labels[:, : context.shape[1]] = -100
    per = [
        float(ref(x[i : i + batch_size], labels=labels[i : i + batch_size]).loss) for i in range(0, len(x), batch_size)
    ]
    sizes = [min(batch_size, len(x) - i) for i in range(0, len(x), batch_size)]
    nll = sum(p * s for p, s in zip(per, sizes)) / sum(sizes)  # every example scores the same M tokens
    n_bytes = sum(tok.n_bytes(row) for row in continuation)
    logged = run.data.metrics[key]
    return {
        "run_id": run_id,
        "pipeline": pipeline,
        "examples": len(x),
        "logged_nll": logged,
        "transformers_nll": nll,
        "difference": logged - nll,
        "bits_per_byte": nll * continuation.numel() / (math.log(2) * n_bytes),
    }


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.reference_nll <run_id> ...: one JSON line per run."""
    run_ids = sys.argv[1:] if argv is None else argv
    if not run_ids:
        raise ValueError("give the MLflow run ids of kvtuner or prefixkv text runs to check")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    for rid in run_ids:  # every id is checked before the first model loads
        tracking.check_run(rid, "run")
    cli.work_started()
    for rid in run_ids:
        print(json.dumps(check(rid)))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
