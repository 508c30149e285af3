"""One evaluation module for every pipeline.

- ``heldout_nll``: mean next-token NLL over windows (nats and bits per byte), per window
  values kept so two settings on the same windows can be compared as paired differences
  (``workers.stats``).
- ``continuation_nll``: prefill a context into a cache, optionally transform the cache
  (compress, quantize), then score the next M tokens through it.
- ``retrieval_accuracy``: exact match on the generated retrieval task (a continuation of
  the ``?key=`` prompt) with its binomial standard error.

Shape legend: N examples, L window length, C context length, M continuation length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from workers.caches.protocol import DynamicCache, KVView
from workers.caches.scoring import ScoreConfig, received
from workers.data.retrieval import RetrievalEvalSet
from workers.stats import mean_se

LN2 = math.log(2.0)


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Mean NLL per token (nats) over n_tokens scored tokens standing for n_bytes bytes -> bits/byte."""
    return nats_per_token * n_tokens / (LN2 * n_bytes)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> NLL [B, T] in nats (fp32).

    The class dimension stays last: CPU cross-entropy over the [B, V, T] layout (``transpose(1, 2)``)
    is off by 1.6e-4 nats/token against float64 at SmolLM2's 49K vocabulary; this one by 2e-5."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def scored_bytes(tokenizer, ids: torch.Tensor) -> int | None:
    """UTF-8 bytes of the scored ids [N, M] under ``tokenizer``; None when there is none (ids are bytes)."""
    if tokenizer is None:
        return None
    return sum(tokenizer.n_bytes(row) for row in ids)


@dataclass
class NLLResult:
    nats: float  # mean NLL per predicted token
    se: float  # standard error over examples (windows)
    n_tokens: int
    per_example: list[float] = field(default_factory=list)  # mean NLL of each example (nats)
    n_bytes: int | None = None  # UTF-8 bytes the scored tokens stand for; None = tokens are bytes

    @property
    def bpb(self) -> float:
        """Bits per byte: NLL sum in nats / (ln 2 x UTF-8 bytes of the scored tokens), so models with
        different tokenizers compare (every example scores the same number of tokens, so the sum is
        ``nats * n_tokens``)."""
        return bits_per_byte(self.nats, self.n_tokens, self.n_tokens if self.n_bytes is None else self.n_bytes)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_nll": self.nats, f"{prefix}_nll_se": self.se, f"{prefix}_bpb": self.bpb}


@dataclass
class AccuracyResult:
    accuracy: float
    se: float  # binomial sqrt(p(1-p)/n)
    n: int
    per_example: list[int] = field(default_factory=list)  # 1 = exact match

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_acc": self.accuracy, f"{prefix}_acc_se": self.se}


@torch.no_grad()
def heldout_nll(model, windows: torch.Tensor, *, batch_size: int = 16, tokenizer=None, **forward_kwargs) -> NLLResult:
    """windows [N, L] -> NLL of tokens 1..L-1 given their prefixes (one forward per batch).

    ``tokenizer`` (the model's) gives the bytes behind the scored tokens for bits/byte."""
    model.eval()
    per = []
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]
        logits = model(x, **forward_kwargs).logits
        nll = token_nll(logits[:, :-1], x[:, 1:])  # [b, L-1]
        per.extend(nll.mean(1).tolist())
    m, se = mean_se(per)
    return NLLResult(m, se, windows.shape[0] * (windows.shape[1] - 1), per, scored_bytes(tokenizer, windows[:, 1:]))


CacheFactory = Callable[[], object]
AfterPrefill = Callable[[object, torch.Tensor], None]


@torch.no_grad()
def prefill_kv(model, context: torch.Tensor, **forward_kwargs) -> list[KVView]:
    """The full-precision keys and values [L] of ``context[:, :-1]`` (what ``continuation_logits``
    prefills), computed once so many caches can share them (``prefilled=``)."""
    model.eval()
    cache = DynamicCache(model.cfg.n_layers)
    model(context[:, :-1], cache=cache, **forward_kwargs)
    return list(cache.layers)


@dataclass(frozen=True)
class ScoredPrefill:
    """One prefill shared by evicting caches as well: the full-precision keys and values [L] and,
    per token score, the attention that score's queries gave each key in that forward
    (received {ScoreConfig: [L] of [B, S] fp32}, ``workers.caches.scoring.received``)."""

    kv: list[KVView]
    received: dict[ScoreConfig, list[torch.Tensor]]


@torch.no_grad()
def prefill_scored(model, context: torch.Tensor, scores: Sequence[ScoreConfig] = (), **forward_kwargs) -> ScoredPrefill:
    """``prefill_kv`` that also records, for each attention score in ``scores``, what an evicting
    cache scoring by it adds up during that forward (the same queries and keys), so that every
    budget's eviction can be replayed from one prefill. Position scores need nothing recorded."""
    tapped = list(dict.fromkeys(s for s in scores if s.uses_attention))
    got = {s: [None] * model.cfg.n_layers for s in tapped}

    def tap(layer, q, k, q_pos, k_pos) -> None:
        for s in tapped:
            got[s][layer] = received(s, q, k, q_pos, k_pos)

    kv = prefill_kv(model, context, observer=tap if tapped else None, **forward_kwargs)
    return ScoredPrefill(kv, got)


def _fill(cache, prefilled: list[KVView] | ScoredPrefill) -> None:
    """Write a shared prefill into a fresh cache: evicting caches replay their eviction from the
    recorded scores (``load_prefill``), every other cache stores the keys and values."""
    scored = isinstance(prefilled, ScoredPrefill)
    evicts = hasattr(cache, "load_prefill")
    if evicts and not scored:
        raise ValueError(f"{type(cache).__name__} evicts at prefill: share a ScoredPrefill (prefill_scored)")
    got = prefilled.received.get(cache.score) if evicts else None
    if evicts and cache.score.uses_attention and got is None:
        raise ValueError(f"the shared prefill was not scored by {cache.score} (it has {list(prefilled.received)})")
    for layer, kv in enumerate(prefilled.kv if scored else prefilled):
        if evicts:
            cache.load_prefill(layer, kv, None if got is None else got[layer])
        else:
            cache.update(layer, kv.k, kv.v, kv.pos, kv.idx_k)


@torch.no_grad()
def continuation_logits(
    model,
    context: torch.Tensor,
    continuation: torch.Tensor,
    *,
    make_cache: CacheFactory,
    after_prefill: AfterPrefill | None = None,
    prefilled: list[KVView] | ScoredPrefill | None = None,
    **forward_kwargs,
) -> torch.Tensor:
    """Logits for each continuation token, predicted through the (transformed) cache.

    context [N, C], continuation [N, M] -> logits [N, M, V]. The context minus its last token
    is prefilled into a fresh cache; ``after_prefill(cache, context)`` may compress or quantize
    it; then ``[context[-1], continuation[:-1]]`` runs through the cache, so every scored
    token, the first included, sees only what the cache kept.

    ``prefilled`` (``prefill_kv`` of this context) writes those keys and values into the cache
    instead of running the prefill: the same cache contents, bit for bit, whenever the prefill
    attends to its own tokens at full precision (quantized caches with prefill="full"), since
    every layer's input is then the full-precision model's. Evicting caches need a
    ``ScoredPrefill`` (``prefill_scored``): eviction never changes the prefill's own attention,
    so replaying it from the recorded scores leaves the same cache. Not for caches that attend
    quantized values during the prefill.
    """
    model.eval()
    cache = make_cache()
    if prefilled is None:
        model(context[:, :-1], cache=cache, **forward_kwargs)
    else:
        _fill(cache, prefilled)
    if after_prefill is not None:
        after_prefill(cache, context)
    C = context.shape[1]
    feed = torch.cat([context[:, -1:], continuation[:, :-1]], dim=1)
    pos = torch.arange(C - 1, C - 1 + feed.shape[1], device=feed.device).expand(feed.shape[0], -1)
    return model(feed, positions=pos, cache=cache, **forward_kwargs).logits


def continuation_nll(
    model,
    context: torch.Tensor,
    continuation: torch.Tensor,
    *,
    make_cache: CacheFactory,
    after_prefill: AfterPrefill | None = None,
    batch_size: int = 16,
    tokenizer=None,
    prefilled: list[list[KVView]] | None = None,
    **forward_kwargs,
) -> NLLResult:
    """Mean NLL of ``continuation`` [N, M] after ``context`` [N, C], per example kept (bits/byte
    through ``tokenizer`` as in ``heldout_nll``)."""
    per = []
    for i in range(0, context.shape[0], batch_size):
        c, y = context[i : i + batch_size], continuation[i : i + batch_size]
        pre = None if prefilled is None else prefilled[i // batch_size]  # one entry per batch
        logits = continuation_logits(
            model, c, y, make_cache=make_cache, after_prefill=after_prefill, prefilled=pre, **forward_kwargs
        )
        nll = token_nll(logits, y)
        per.extend(nll.mean(1).tolist())
    m, se = mean_se(per)
    return NLLResult(m, se, continuation.numel(), per, scored_bytes(tokenizer, continuation))


def exact_match(logits: torch.Tensor, value: torch.Tensor) -> list[int]:
    """logits [N, V_len, vocab], value [N, V_len] -> per example 1 if every value token is the argmax."""
    return (logits.argmax(-1) == value).all(1).long().tolist()


def retrieval_accuracy(
    model,
    data: RetrievalEvalSet,
    *,
    make_cache: CacheFactory,
    after_prefill: AfterPrefill | None = None,
    batch_size: int = 50,
    prefilled: list[list[KVView]] | None = None,
    **forward_kwargs,
) -> AccuracyResult:
    """Exact match: every value token right under argmax after the teacher-forced ``?key=``."""
    hits: list[int] = []
    for i in range(0, len(data), batch_size):
        c, y = data.prompt[i : i + batch_size], data.value[i : i + batch_size]
        pre = None if prefilled is None else prefilled[i // batch_size]
        logits = continuation_logits(
            model, c, y, make_cache=make_cache, after_prefill=after_prefill, prefilled=pre, **forward_kwargs
        )
        hits.extend(exact_match(logits, y))
    n = len(hits)
    p = sum(hits) / n
    return AccuracyResult(p, math.sqrt(max(p * (1 - p), 1e-12) / n), n, hits)


def unigram_bpb(train: torch.Tensor, heldout: torch.Tensor, vocab: int = 256) -> float:
    """Bits per byte of an add-one unigram model fitted on train, scored on held-out."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout].mean() / LN2)
