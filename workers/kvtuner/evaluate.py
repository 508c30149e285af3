"""Evaluation data and metrics for the KVTuner search, all through a quantized cache.

Shape legend: N examples, C context tokens, M scored continuation tokens, V vocab.

Every metric goes through `workers.eval.continuation_logits`: the context is prefilled into
the cache, then the scored tokens run *through the cache*, so they see the quantized keys
and values (never a single full-precision forward).
- task "text":      context = first C tokens of a window, continuation = the next M tokens.
- task "retrieval": context = the `?key=` prompt, continuation = the value's tokens.
Tokens are the model's own (`workers.model.hf.address.load_tokenizer`); UTF-8 bytes for CalibLMs.
Proxy metrics against the full-precision model on the same tokens: mean next-token
KL(full || quantized) and NLL over the continuation; the task metric is continuation NLL
(text) or exact match (retrieval), both with per-example values for paired comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.caches.precision import KVQuantConfig
from workers.caches.quantized import make_cache
from workers.data.corpus import draw_windows, is_bytes
from workers.eval import (
    AccuracyResult,
    continuation_logits,
    continuation_nll,
    prefill_kv,
    retrieval_accuracy,
    scored_bytes,
)

TASKS = ("text", "retrieval")
# Tokens per forward. 32 windows of 1088 tokens in one prefill took GBs of attention activations
# per actor and ran a 24 GiB machine with two actors out of memory (SmolLM2, run 41562189).
TOKENS_PER_BATCH = 8192


def batch_windows(length: int) -> int:
    """Examples per forward for examples of `length` tokens: 32 up to 256 tokens, 7 at 1088."""
    return max(1, min(32, TOKENS_PER_BATCH // length))


@dataclass
class EvalData:
    """context [N, C], continuation [N, M] int64; `task` says how to read the continuation.

    `n_bytes`: UTF-8 bytes the continuation tokens stand for (None: the tokens are bytes), so a
    continuation NLL is also reported in bits/byte."""

    task: str
    context: torch.Tensor
    continuation: torch.Tensor
    name: str = ""
    n_bytes: int | None = None

    def bpb(self, nats_per_token: float) -> float:
        from workers.eval import bits_per_byte

        n = self.continuation.numel()
        return bits_per_byte(nats_per_token, n, n if self.n_bytes is None else self.n_bytes)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    def __len__(self) -> int:
        return self.context.shape[0]


def build_data(
    task: str,
    corpus,
    split: str,
    n: int,
    seed: int,
    length: int,
    continuation: int = 32,
    part: tuple[int, int] = (0, 1),
    tokenizer=None,
) -> EvalData:
    """n examples of `length` tokens from a corpus split (text windows or retrieval prompts).

    `part` = (i, k) restricts text windows to the i-th of k equal slices of the split, so the
    search's calibration tokens and its validation tokens (second fidelity) never overlap;
    retrieval examples differ by seed (records and filler offsets drawn from it). `tokenizer`:
    the model's (None: UTF-8 bytes); with a real tokenizer text windows are disjoint
    (`workers.data.corpus.draw_windows`).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "retrieval":
        from workers.data.retrieval import eval_set

        es = eval_set(corpus.split(split), n=n, length=length, seed=seed, split=split, tokenizer=tokenizer)
        return EvalData(task, es.prompt, es.value, f"retrieval/{split}/seed{seed}", scored_bytes(tokenizer, es.value))
    if not 0 < continuation < length:
        raise ValueError(f"continuation must be in (0, length={length}), got {continuation!r}")
    t = corpus.tokens(split, tokenizer)
    i, k = part
    t = t[i * t.numel() // k : (i + 1) * t.numel() // k]
    if t.numel() <= length:
        raise ValueError(f"split {split!r} part {part} has {t.numel()} tokens, not more than length={length}")
    g = torch.Generator().manual_seed(seed)
    w = draw_windows(t, length, n, g, disjoint=not is_bytes(tokenizer))
    name = f"text/{split}[{i}/{k}]/seed{seed}"
    y = w[:, length - continuation :]
    return EvalData(task, w[:, : length - continuation], y, name, scored_bytes(tokenizer, y))


class RoutedCache:
    """Full precision everywhere except `layer`, which goes to a quantized cache (the profile's probe)."""

    def __init__(self, quant, full, layer: int):
        self.quant, self.full, self.layer = quant, full, layer

    def update(self, layer, k, v, pos, idx_k=None):
        return (self.quant if layer == self.layer else self.full).update(layer, k, v, pos, idx_k)

    def length(self, layer: int) -> int:
        return (self.quant if layer == self.layer else self.full).length(layer)

    def nbytes(self) -> int:
        return self.quant.nbytes() + self.full.nbytes()


def cache_factory(config: KVQuantConfig | None, n_layers: int, kind: str = "fake", only_layer: int | None = None):
    """A zero-argument factory of fresh caches (what workers.eval expects)."""

    def make():
        if only_layer is None:
            return make_cache(config, n_layers, kind)
        return RoutedCache(make_cache(config, n_layers, kind), make_cache(None, n_layers), only_layer)

    return make


@torch.no_grad()
def prefills(model, data: EvalData, batch_size: int = 32) -> list:
    """Per batch, the full-precision prefill of its contexts (`workers.eval.prefill_kv`): with
    prefill="full" every map's cache starts from these same keys and values, so they are computed
    once per data set instead of once per evaluated map."""
    return [prefill_kv(model, data.context[i : i + batch_size]) for i in range(0, len(data), batch_size)]


@torch.no_grad()
def logprobs(model, data: EvalData, make, batch_size: int = 32, prefilled: list | None = None) -> torch.Tensor:
    """Log-probabilities [N, M, V] of every continuation position, through caches from `make`
    (`prefilled`: `prefills(model, data, batch_size)`, shared by every map)."""
    out = []
    for j, i in enumerate(range(0, len(data), batch_size)):
        c, y = data.context[i : i + batch_size], data.continuation[i : i + batch_size]
        pre = None if prefilled is None else prefilled[j]
        out.append(F.log_softmax(continuation_logits(model, c, y, make_cache=make, prefilled=pre).float(), -1))
    return torch.cat(out)


def proxy_metrics(ref_logp: torch.Tensor, logp: torch.Tensor, data: EvalData) -> dict:
    """KL(full || quantized) and NLL per example (means over continuation positions) and overall."""
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0).mean(1)  # [N]
    nll = -logp.gather(-1, data.continuation[..., None]).squeeze(-1).mean(1)  # [N]
    hit = (logp.argmax(-1) == data.continuation).all(1).float()
    return {
        "damage": float(kl.mean()),
        "nll": float(nll.mean()),
        "exact": float(hit.mean()),
        "per_kl": kl.tolist(),
        "per_nll": nll.tolist(),
        "per_exact": hit.tolist(),
    }


def task_metric(
    model,
    data: EvalData,
    config: KVQuantConfig | None,
    n_layers: int,
    batch_size: int = 32,
    prefilled: list | None = None,
):
    """The task's own measure through the quantized cache: NLLResult (text) or AccuracyResult (retrieval)."""
    make = cache_factory(config, n_layers)
    if data.task == "retrieval":
        from workers.data.retrieval import RetrievalEvalSet

        es = RetrievalEvalSet(data.context, data.continuation, seed=0, split=data.name)
        return retrieval_accuracy(model, es, make_cache=make, batch_size=batch_size, prefilled=prefilled)
    # batch by batch: [N, M, V] log-probabilities of a held-out set with a 49K vocabulary would be GBs
    r = continuation_nll(
        model, data.context, data.continuation, make_cache=make, batch_size=batch_size, prefilled=prefilled
    )
    r.n_bytes = data.n_bytes
    return r


def score(result) -> list[float]:
    """Per-example values of a task metric, higher-is-better for accuracy, as stored."""
    return list(result.per_example)


def summary(result) -> dict:
    if isinstance(result, AccuracyResult):
        return {"metric": "exact_match", "value": result.accuracy, "se": result.se, "n": result.n}
    return {"metric": "nll", "value": result.nats, "se": result.se, "n": len(result.per_example), "bpb": result.bpb}
