"""Worker body of the transformers-MoE expert-parallel parity test (spawned, gloo, float64).

Every rank builds the same tiny model of each family, runs the 1-process reference on the
whole batch itself, then its own rows through the expert-parallel copy (E / world experts per
rank, tokens exchanged by all-to-all) and compares loss, logits, synchronised gradients and the
routers' state after the step with the reference.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from tests.moe.ep_workers import _close
from workers.model.config import RouterConfig
from workers.model.hf.moe import HFMoELM, install, shard
from workers.model.hf.tiny_moe import tiny_model
from workers.model.moe.distributed import balancing_step, routers
from workers.model.moe.expert_parallel import init_ep_groups, is_expert_param, sync_gradients
from workers.model.transformer import lm_loss

ROWS_PER_RANK = 2


def hf_parity_worker(rank: int, world: int, port: int, families: tuple[str, ...], strategies: tuple[str, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = init_ep_groups(world)
        for kind in families:
            for strategy in strategies:
                check(rank, world, groups, kind, strategy)
    finally:
        dist.destroy_process_group()


def check(rank: int, world: int, groups, kind: str, strategy: str) -> None:
    what = f"{kind}/{strategy}"
    hf = tiny_model(kind, dtype=torch.float64)
    install(hf, RouterConfig(strategy, alpha=0.1, bip_iters=4))
    ref = HFMoELM(hf).train()
    model = copy.deepcopy(ref)
    shard(model, groups)
    x = torch.randint(0, 256, (world * ROWS_PER_RANK, 16), generator=torch.Generator().manual_seed(1))
    out = ref(x)
    loss = lm_loss(out.logits, x) + out.aux_loss
    loss.backward()
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    out_p = model(x[rows])
    loss_p = lm_loss(out_p.logits, x[rows]) + out_p.aux_loss
    loss_p.backward()
    sync_gradients(list(model.parameters()), groups)
    mean_loss = loss_p.detach().clone()
    dist.all_reduce(mean_loss)
    _close(mean_loss / world, loss.detach(), f"{what} loss", tol=1e-6)
    _close(out_p.logits, out.logits[rows], f"{what} logits", tol=1e-6)
    ref_params = dict(ref.named_parameters())
    n_expert = 0
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if is_expert_param(p):
            n_expert += 1
            el = p.shape[0]
            want = want[groups.ep_rank * el : (groups.ep_rank + 1) * el]
        _close(p.grad, want, f"{what} grad {name}", tol=1e-6)
    assert n_expert == 2 * len(routers(model)), what  # gate_up_proj and down_proj of every MoE block
    for a, b in zip(balancing_step(ref), balancing_step(model, groups)):
        _close(b, a, f"{what} loads", tol=0)
    for (name, a), b in zip(ref.named_buffers(), model.buffers()):
        if name.endswith(("balance_bias", "bip_price", "e_score_correction_bias")):
            _close(b, a, f"{what} {name}", tol=1e-7)
    if strategy == "loss_free":
        assert all(float(r.balance_bias.abs().sum()) > 0 for r in routers(model)), what
    if strategy == "bip":
        assert all(float(r.bip_price.max()) > 0 for r in routers(model)), what
