"""Training-aware IndexCache: fine-tune only the retained indexers for the layers they serve.

A retained (F) indexer at layer l serves layers l..l+m (itself and the S layers after it).
It is trained against all of them:

    loss_l = mean_j KL( p^(l+j) || softmax(I^(l)) ),   j = 0..m

where p^(l+j) [B, T, K] is layer l+j's main attention, summed over heads, L1-normalised and
restricted to the top-k set the buffer gives it, and I^(l) are layer l's indexer logits
gathered at that same set. The main path runs without gradients: the indexer changes the
output only through a (non-differentiable) top-k, and its input is detached in the model,
so nothing but the retained indexers can learn from this loss.

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


def multi_layer_kl(model, tokens: torch.Tensor, pattern: str) -> torch.Tensor:
    """The multi-layer distillation loss of `pattern` on tokens [B, T], averaged over F layers."""
    n = len(model.layers)
    serve = serving_layer(validate_pattern(pattern, n))
    b, t = tokens.shape
    seen: dict[int, tuple] = {}

    def observe(layer, q, k, q_pos, k_pos):
        seen[layer] = (q.detach(), k.detach())

    ctx = model.context(b, t, attn="sparse", observer=observe)
    h, buf = model.embed(tokens), None
    xi: dict[int, torch.Tensor] = {}
    targets: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for layer in range(n):
            if pattern[layer] == "F":
                xi[layer] = model.layers[layer].input_norm(h)
            h, buf, _, _ = model.run_layers(h, layer, layer + 1, ctx=ctx, pattern=pattern, index_buffer=buf)
            q, k = seen.pop(layer)
            # Without a cache the buffer's positions are indices into this layer's keys.
            p = head_summed_probs(q, k, ctx.pos, ctx.pos, buf)  # [B, T, K]
            targets.setdefault(serve[layer], []).append((p, buf))
    losses = []
    for layer, served in targets.items():
        ix = model.layers[layer].attn.indexer
        x = xi[layer]
        qi, w = ix.queries(x, ctx.pos)
        logits = indexer_logits(qi, ix.keys(x, ctx.pos), w, ctx.pos, ctx.pos)  # [B, T, S]
        idx = served[0][1]
        logits = torch.gather(logits, 2, idx.clamp_min(0)).masked_fill(idx < 0, float("-inf"))
        logq = torch.log_softmax(logits, -1)  # [B, T, K]
        kls = []
        for p, _ in served:
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
        for p in model.layers[layer].attn.indexer.parameters():
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
