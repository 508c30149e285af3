"""Training-aware IndexCache: fine-tune only the retained indexers for the layers they serve.

A retained (F) indexer at layer l serves layers l..l+m (itself and the S layers after it).
It is trained against all of them:

    loss_l = mean_j KL( p^(l+j) || softmax(I^(l)) ),   j = 0..m

where p^(l+j) [B, T, K] is layer l+j's main attention, summed over heads, L1-normalised and
restricted to the top-k set the buffer gives it, and I^(l) are layer l's indexer logits
gathered at that same set. The main path runs without gradients: the indexer changes the
output only through a (non-differentiable) top-k, and its input is detached in the model,
so nothing but the retained indexers can learn from this loss. Models: a CalibLM with an indexer, or
a dense HF model converted by `pipelines.dsa_convert` (`workers.model.hf.dsa.DSAModel`).

Shape legend: B batch, T tokens, H heads, Dh head dim, K top-k, S keys (= T, no cache).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import ray
import torch

from kernels import indexer_logits
from tuning.indexcache.patterns import full_layers, serving_layer, validate_pattern
from workers.indexcache.evaluate import window_nll
from workers.model.attention import head_summed_probs


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"distill steps must be >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"distill lr must be > 0, got {self.lr!r}")
        if self.batch_size < 1:
            raise ValueError(f"distill batch_size must be >= 1, got {self.batch_size!r}")


def observe(model, tokens: torch.Tensor, pattern: str) -> list[tuple]:
    """One no-grad forward under `pattern` -> per layer [N]: (x, pos, q, k, idx), the indexer's input
    [B, T, D] (needed, and for a CalibLM given, on F layers only), positions [B, T], the main attention's q [B, T, H, Dh] and k [B, T, Hkv, Dh], and the
    top-k [B, T, K] it attended. A converted HF model records them in its attention function
    (`DSAModel.observe`); a CalibLM through its observer hook and layer-by-layer run."""
    if hasattr(model, "observe"):
        return model.observe(tokens, pattern)
    n = len(model.layers)
    b, t = tokens.shape
    qk: dict[int, tuple] = {}

    def keep(layer, q, k, q_pos, k_pos):
        qk[layer] = (q.detach(), k.detach())

    ctx = model.context(b, t, attn="sparse", observer=keep)
    h, buf, out = model.embed(tokens), None, []
    with torch.no_grad():
        for layer in range(n):
            x = model.layers[layer].input_norm(h) if pattern[layer] == "F" else None  # only F indexers train
            h, buf, _, _ = model.run_layers(h, layer, layer + 1, ctx=ctx, pattern=pattern, index_buffer=buf)
            out.append((x, ctx.pos, *qk.pop(layer), buf))
    return out


def retained_indexer(model, layer: int) -> torch.nn.Module:
    if hasattr(model, "retained_indexer"):
        return model.retained_indexer(layer)
    return model.layers[layer].attn.indexer


def multi_layer_kl(model, tokens: torch.Tensor, pattern: str) -> torch.Tensor:
    """The multi-layer distillation loss of `pattern` on tokens [B, T], averaged over F layers."""
    serve = serving_layer(validate_pattern(pattern, len(model.layers)))
    targets: dict[int, list[torch.Tensor]] = {}
    inputs: dict[int, tuple] = {}
    with torch.no_grad():
        for layer, (x, pos, q, k, idx) in enumerate(observe(model, tokens, pattern)):
            if pattern[layer] == "F":
                inputs[layer] = (x, pos, idx)
            # Without a cache the buffer's positions are indices into this layer's keys.
            targets.setdefault(serve[layer], []).append(head_summed_probs(q, k, pos, pos, idx))  # [B, T, K]
    losses = []
    for layer, served in targets.items():
        ix = retained_indexer(model, layer)
        x, pos, idx = inputs[layer]
        qi, w = ix.queries(x, pos)
        logits = indexer_logits(qi, ix.keys(x, pos), w, pos, pos)  # [B, T, S]
        logits = torch.gather(logits, 2, idx.long().clamp_min(0)).masked_fill(idx < 0, float("-inf"))
        logq = torch.log_softmax(logits, -1)  # [B, T, K]
        kls = []
        for p in served:
            term = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-9)) - logq), torch.zeros_like(p))
            kls.append(term.sum(-1).mean())
        losses.append(torch.stack(kls).mean())
    return torch.stack(losses).mean()


def distill(model, pattern: str, train: torch.Tensor, cfg: DistillConfig) -> tuple[object, list[float]]:
    """A copy of `model` whose retained indexers were trained for `pattern`; and the loss curve.

    train [R, T + 1] windows; batches are drawn with a seeded generator (inputs only).
    """
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in full_layers(pattern):
        for p in retained_indexer(model, layer).parameters():
            p.requires_grad_(True)
            params.append(p)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for _ in range(cfg.steps):
        rows = torch.randint(0, train.shape[0], (cfg.batch_size,), generator=g)
        loss = multi_layer_kl(model, train[rows, :-1], pattern)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    return model, curve


@ray.remote
def distill_and_score(
    model, pattern: str, train: torch.Tensor, heldout: torch.Tensor, cfg: DistillConfig, batch_size: int, threads: int
) -> dict:
    """Ray task: distill for `pattern`, then score held-out windows [W] under it."""
    torch.set_num_threads(threads)
    tuned, curve = distill(model, pattern, train, cfg)
    return {"pattern": pattern, "curve": curve, "heldout": window_nll(tuned, heldout, pattern, batch_size).tolist()}
