"""End-of-training evaluation on held-out data, run by the driver (the MLflow writer)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from workers.caches.protocol import DynamicCache
from workers.data.corpus import Corpus
from workers.data.retrieval import eval_set
from workers.eval import heldout_nll, retrieval_accuracy, unigram_bpb
from workers.model import checkpoint
from workers.model.transformer import CalibLM
from workers.stats import paired_difference
from workers.training.config import TrainConfig
from workers.training.train_state import load_model_state


def load_trained(tc: TrainConfig, ckpt_dir: Path) -> CalibLM:
    model = CalibLM(tc.model)
    model.load_state_dict(load_model_state(ckpt_dir))
    return model.eval()


@torch.no_grad()
def evaluate_model(model: CalibLM, tc: TrainConfig, corpus: Corpus, n_queries: int = 1000) -> dict[str, float]:
    """Held-out bits per byte against a unigram baseline; for DSA models sparse vs dense vs k random
    positions (paired over the same windows); for the retrieval testbed, exact match."""
    windows = corpus.eval_windows("heldout", tc.seq_len, tc.eval_windows)
    m: dict[str, float] = {"heldout_windows": float(windows.shape[0])}
    main = heldout_nll(model, windows)
    m.update(main.as_metrics("heldout"))
    m["unigram_bpb"] = unigram_bpb(corpus.tokens("train"), corpus.tokens("heldout"))
    if tc.model.indexer is not None:
        dense = heldout_nll(model, windows, attn="dense")
        rand = heldout_nll(model, windows, attn="random")
        m.update(dense.as_metrics("heldout_dense"))
        m.update(rand.as_metrics("heldout_random_k"))
        d, se = paired_difference(main.per_example, dense.per_example)
        m["sparse_minus_dense_nll"], m["sparse_minus_dense_nll_se"] = d, se
        m["sparse_vs_dense_rel"] = main.nats / dense.nats - 1
        d, se = paired_difference(rand.per_example, main.per_example)
        m["random_minus_sparse_nll"], m["random_minus_sparse_nll_se"] = d, se
    if tc.task == "retrieval":
        data = eval_set(corpus.heldout, n=n_queries, length=tc.seq_len)
        acc = retrieval_accuracy(model, data, make_cache=lambda: DynamicCache(tc.model.n_layers))
        m.update(acc.as_metrics("retrieval"))
    return m


def final_report(tc: TrainConfig, ckpt_dir: Path, corpus: Corpus) -> tuple[Path, dict[str, float]]:
    """Load the final training state, write the model checkpoint (and HF export), evaluate."""
    model = load_trained(tc, ckpt_dir)
    out = Path(tempfile.mkdtemp(prefix="calibray-model-"))
    checkpoint.save(model, out / "model", meta={"preset": tc.preset, "corpus_sha256": corpus.sha256})
    if tc.model.is_dense_llama:
        from workers.model.hf.export import export_llama

        export_llama(model, out / "hf_model")
    metrics = evaluate_model(model, tc, corpus)
    metrics["num_params"] = float(model.num_params())
    return out, metrics
