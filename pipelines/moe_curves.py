"""Overlay the per-step train loss of train_moe runs in one plot: the 1-vs-2-worker comparison.

    python -m pipelines.moe_curves --runs <id1>,<id2>,<id3> --out docs/results/moe/workers_curves.png

Reads each run's `train_loss` history from MLflow (rank 0 logs it every `log_every` steps) and
prints a markdown table: layout, final train loss (mean of the last five logged values) and
held-out bits/byte. `--paired` also loads each run's logged model and scores them all on the
same held-out windows (the first run's corpus, sequence length and window count), printing each
run's bits/byte minus the first run's, paired window by window, with its SE: one seed's held-out
numbers differ by less than their unpaired SEs, so only the paired difference separates them.
Nothing is written to MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from workers.runtime import cli, tracking
from workers.stats import markdown_table


def layout_label(params: dict[str, str]) -> str:
    workers, ep = params.get("train.num_workers", "?"), params.get("train.ep_size", "1")
    zero, batch = params.get("train.zero_stage", "0"), params.get("train.batch_size", "?")
    kind = "expert parallel" if ep not in ("1", "None") else "data parallel"
    return f"{workers} worker(s) x batch {batch}, {kind} (ep {ep}, ZeRO {zero})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.moe_curves", description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="comma-separated MLflow run ids of train_moe runs")
    p.add_argument("--out", default="artifacts/moe_curves.png", help="where to write the plot (PNG)")
    p.add_argument("--title", default="train loss per step, same seed", help="plot title")
    p.add_argument("--paired", action="store_true", help="score every run's model on the same held-out windows")
    args = p.parse_args(argv)
    ids = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not ids:
        raise SystemExit(f"--runs={args.runs!r}: at least one run id")
    client = MlflowClient(tracking.tracking_uri())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = []
    for rid in ids:
        run = client.get_run(rid)
        hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, "train_loss"))
        if not hist:
            raise SystemExit(f"run {rid} has no train_loss history")
        label = layout_label(run.data.params)
        ax.plot([s for s, _ in hist], [v for _, v in hist], label=f"{label} ({rid[:8]})", lw=1.2)
        tail = [v for _, v in hist[-5:]]
        rows.append(
            {
                "run": rid,
                "layout": label,
                "final train loss": f"{sum(tail) / len(tail):.4f}",
                "held-out bits/byte": f"{run.data.metrics.get('heldout_bpb', float('nan')):.4f}",
            }
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (nats/byte, rank 0's batch)")
    ax.set_title(args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(markdown_table(rows, ["run", "layout", "final train loss", "held-out bits/byte"]))
    print(f"\nplot: {out}")
    if args.paired:
        print("\n" + paired_heldout(client, ids))
    return 0


def paired_heldout(client: MlflowClient, ids: list[str]) -> str:
    """Markdown: each run's held-out bits/byte and its paired difference from the first run's."""
    import math

    import torch

    from workers.data.corpus import load_corpus
    from workers.eval import heldout_nll
    from workers.model.hf.address import load_any
    from workers.stats import paired_difference

    first = client.get_run(ids[0]).data.params
    length, n = int(first["train.seq_len"]), int(first["train.eval_windows"])
    windows = load_corpus(first["train.corpus"]).eval_windows("heldout", length, n)
    to_bits = 1 / math.log(2)  # byte-level models: nats per byte -> bits per byte
    per = {}
    with torch.no_grad():
        for rid in ids:
            per[rid] = heldout_nll(load_any(f"runs:/{rid}/model"), windows).per_example
    rows = []
    for rid in ids:
        d, se = paired_difference(per[rid], per[ids[0]])
        rows.append(
            {
                "run": rid,
                "held-out bits/byte": f"{to_bits * sum(per[rid]) / len(per[rid]):.4f}",
                f"minus {ids[0][:8]}": f"{to_bits * d:+.4f} +- {to_bits * se:.4f}",
            }
        )
    head = f"Paired over the same {windows.shape[0]} held-out windows of {length} bytes ({first['train.corpus']}):\n\n"
    return head + markdown_table(rows, ["run", "held-out bits/byte", f"minus {ids[0][:8]}"])


if __name__ == "__main__":
    sys.exit(cli.run(main))
