"""Token -> expert routing. One interface; the balancing strategies plug in here.

Shape legend: N tokens, E experts, K experts per token.

Every strategy changes only WHICH experts are selected; gate weights of the selected
experts always come from the raw scores (`balancing.gate_weights`). Balancing state lives in
registered buffers, so checkpoints carry it:
- `balance_bias` [E]: the loss-free bias b, updated by `end_step` once per optimizer step.
- `bip_price` [E]: the BIP price vector q of the last training batch. `pre` routes a batch
  with the q computed on that same batch (it looks at later tokens: training only);
  `causal` routes with the previous batch's q and then refreshes it. With
  `bip_q_mode="carry"` the T dual rounds of a batch start from this q (the paper maintains q
  across steps); with `"restart"` they start from 0. A checkpoint written before the buffer
  existed loads with q = 0 (the state of step 1).
In eval mode every strategy routes each token on its own (causal): loss-free with its bias,
BIP with q frozen at the last training value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from kernels.bip_select import cpu as bip_cpu
from workers.model.config import MoEConfig
from workers.model.moe.balancing import (
    aux_loss,
    bip_prices,
    bip_route,
    bip_route_causal,
    expert_load,
    gate_weights,
    loss_free_update,
    select_topk,
)
from workers.model.moe.expert_parallel import all_reduce_sum, gather_rows


@dataclass
class Routing:
    expert_idx: torch.Tensor  # [N, K] long
    gates: torch.Tensor  # [N, K] gate weights from raw scores
    aux_loss: torch.Tensor  # scalar (0 unless the strategy adds one)
    load: torch.Tensor  # [E] tokens routed to each expert in this batch (before any dropping)


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.register_buffer("balance_bias", torch.zeros(cfg.n_experts))
        self.register_buffer("bip_price", torch.zeros(cfg.n_experts))
        # loads since the last optimizer step (local rank); not checkpointed: a resumed run
        # restarts its step at the checkpoint, where this sum was zero
        self.register_buffer("step_load", torch.zeros(cfg.n_experts), persistent=False)
        self.ep_group = None  # set by MoEFFN.shard_experts: the batch BIP balances and f_j counts
        self.router_time = 0.0  # seconds spent selecting experts since the last reset
        if cfg.router.strategy == "bip":
            # load (or build) the fused CPU kernel now: its first call in a process takes ~0.3 s,
            # which the first timed step would otherwise charge to routing (1.45 ms/step over 200)
            bip_cpu.available()

    # True when `topk` is not a plain top-K (a subclass's group-limited selection): the causal
    # router then cannot read the first round's token prices off its routing top-(K+1)
    constrained_topk = False

    def topk(self, s: torch.Tensor, k: int, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The selection rule every strategy ranks with: scores [N, E], offset [E] -> [N, K] indices."""
        return select_topk(s, k, offset)

    def gate_values(self, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Gate weights [N, K] of the selected experts, from the raw scores s [N, E]."""
        return gate_weights(s, idx, normalize=self.cfg.router.score_fn == "sigmoid")

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> scores [N, E] in fp32."""
        logits = self.gate(x).float()
        return logits.softmax(-1) if self.cfg.router.score_fn == "softmax" else logits.sigmoid()

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """Which experts each token takes: scores [N, E] (detached) -> [N, K] indices."""
        rc, k = self.cfg.router, self.cfg.top_k
        if rc.strategy == "loss_free":
            return self.topk(s, k, self.balance_bias)
        if rc.strategy != "bip":
            return self.topk(s, k)
        if not self.training:
            return self.topk(s, k, -self.bip_price)
        warm = rc.bip_q_mode == "carry"
        init = self.bip_price if warm else None
        # the fused routing (one C++ call on CPU) ranks by a plain top-K of the batch's own
        # scores: not with a constrained `topk`, nor where q comes from the whole EP group
        fused = not self.constrained_topk and self.ep_group is None
        if rc.bip_mode == "pre":
            if fused:
                q, idx = bip_route(s, k, rc.bip_iters, init=init)
            else:  # the prices of the whole expert-parallel batch: every rank sees the same scores
                q = bip_prices(gather_rows(s, self.ep_group), k, rc.bip_iters, init=init)
                idx = self.topk(s, k, -q)
        elif fused and warm:
            # one top-(K+1) of s - q_prev routes the batch (first K) and gives the first round's
            # token prices (the (K+1)-th value) for free
            q, idx = bip_route_causal(s, k, rc.bip_iters, self.bip_price)
        else:
            idx = self.topk(s, k, -self.bip_price)
            q = bip_prices(gather_rows(s, self.ep_group), k, rc.bip_iters, init=init)
        self.bip_price.copy_(q)
        return idx

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the BIP price buffer: q = 0, the state of a run's first step
        state_dict.setdefault(prefix + "bip_price", torch.zeros_like(self.bip_price))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, D] -> Routing (indices, gates, aux loss, load [E])."""
        start = time.perf_counter()
        s = self.scores(x)
        idx = self.select(s.detach())
        self.router_time += time.perf_counter() - start
        gates = self.gate_values(s, idx)
        load = expert_load(idx, self.cfg.n_experts)
        aux = s.new_zeros(())
        if self.training:
            self.step_load += load
            if self.cfg.router.strategy == "aux_loss":
                group_load = all_reduce_sum(load, self.ep_group)
                aux = aux_loss(s, idx, self.cfg.router.alpha, group_load / group_load.sum().clamp_min(1))
        return Routing(idx, gates, aux, load)

    @torch.no_grad()
    def end_step(self, metric_group=None, world_group=None) -> torch.Tensor:
        """Close one optimizer step: returns the step's load [E] summed over `metric_group`.

        The loss-free bias moves by the load summed over `world_group` (all ranks; with one
        data-parallel replica this is the expert-parallel group), so that every replica keeps
        the same bias; None = this process only.
        """
        load = all_reduce_sum(self.step_load, metric_group).clone()
        if self.cfg.router.strategy == "loss_free":
            total = load if world_group is metric_group else all_reduce_sum(self.step_load, world_group)
            self.balance_bias.copy_(loss_free_update(self.balance_bias, total, self.cfg.router.bias_rate))
        self.step_load.zero_()
        return load
