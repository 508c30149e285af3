"""Worker bodies for the multi-process parity tests (spawned by torch.multiprocessing, gloo).

Every rank builds the same model from the same seed, computes the single-process reference
on the whole batch itself, then runs its own slice through the expert-parallel copy and
compares outputs and (synchronised) gradients with the reference.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from workers.model.config import ModelConfig, MoEConfig, RouterConfig
from workers.model.moe.distributed import balancing_step, moe_layers, shard_model
from workers.model.moe.expert_parallel import EPGroups, init_ep_groups, is_expert_param, sync_gradients
from workers.model.transformer import CalibLM, lm_loss
from workers.training.moe_optim import MoEOptimizer

ROWS_PER_RANK = 2


def config(strategy: str, capacity_factor: float | None = None) -> ModelConfig:
    router = RouterConfig(strategy=strategy, bip_iters=4, alpha=0.1)
    moe = MoEConfig(
        n_experts=4, top_k=2, expert_hidden=16, shared_expert=False, router=router, capacity_factor=capacity_factor
    )
    return ModelConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=32, moe=moe)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-12
    if err > tol * max(1.0, scale):
        raise AssertionError(f"{what}: max abs diff {err:.3g} (scale {scale:.3g})")


def parity_worker(
    rank: int, world: int, ep_size: int, port: int, strategies: tuple[str, ...], zero_stages: tuple[int, ...] = ()
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = init_ep_groups(ep_size)
        for strategy in strategies:
            check_strategy(rank, world, ep_size, groups, strategy)
        for stage in zero_stages:
            check_optimizer_step(rank, world, groups, stage)
    finally:
        dist.destroy_process_group()


def check_strategy(rank: int, world: int, ep_size: int, groups, strategy: str) -> None:
    """One strategy: outputs, gradients, loads and loss-free bias against the 1-process run."""
    torch.manual_seed(0)
    ref = CalibLM(config(strategy)).train()
    model = shard_model(copy.deepcopy(ref), groups)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (world * ROWS_PER_RANK, 24), generator=g)
    out = ref(x, attn="dense")
    (lm_loss(out.logits, x) + out.aux_loss).backward()
    mine = x[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    out_p = model(mine, attn="dense")
    (lm_loss(out_p.logits, mine) + out_p.aux_loss).backward()
    sync_gradients(list(model.parameters()), groups)
    _close(out_p.logits, out.logits[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK], "logits")
    ref_params = dict(ref.named_parameters())
    n_expert = 0
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if is_expert_param(p):
            n_expert += 1
            el = p.shape[0]
            want = want[groups.ep_rank * el : (groups.ep_rank + 1) * el]
        _close(p.grad, want, f"grad {name}", tol=1e-4)
    if ep_size > 1 and n_expert != 3 * len(moe_layers(model)):
        raise AssertionError(f"expected 3 expert tensors per MoE layer, found {n_expert}")
    for a, b in zip(balancing_step(ref), balancing_step(model, groups)):
        if ep_size == world:  # the expert-parallel batch is the whole batch
            _close(b, a, "step load")
    for (name, a), b in zip(
        [(n, t) for n, t in ref.named_buffers() if n.endswith("balance_bias")],
        [t for n, t in model.named_buffers() if n.endswith("balance_bias")],
    ):
        _close(b, a, f"loss-free bias {name}")


def check_optimizer_step(rank: int, world: int, groups, zero_stage: int) -> None:
    """One MoEOptimizer step (dense params under DeepSpeed ZeRO when zero_stage > 0) moves every
    parameter exactly as a 1-process step on the whole batch does.

    AdamW with eps = lr = 1e3 makes the first update lr * g / (|g| + eps) ~= g, so the parameter
    change exposes the reduced gradient itself (a gradient off by a factor 2 would show).
    """
    kw = {"lr": 1e3, "eps": 1e3, "weight_decay": 0.0, "grad_clip": 1e9}
    torch.manual_seed(0)
    ref = CalibLM(config("none")).train()
    model = shard_model(copy.deepcopy(ref), groups)
    ref_opt = MoEOptimizer(ref, EPGroups(1, 1, 0, 0, None, None), **kw)
    opt = MoEOptimizer(model, groups, zero_stage=zero_stage, micro_batch=ROWS_PER_RANK, **kw)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    x = torch.randint(0, 256, (world * ROWS_PER_RANK, 24), generator=torch.Generator().manual_seed(2))
    out = ref(x, attn="dense")
    ref_opt.backward(lm_loss(out.logits, x))
    ref_opt.step(1e3)
    mine = x[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    out_p = opt(mine, attn="dense")
    opt.backward(lm_loss(out_p.logits, mine))
    opt.step(1e3)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want, start = ref_params[name].detach() - before[name], before[name]
        if is_expert_param(p):
            el = p.shape[0]
            want = want[groups.ep_rank * el : (groups.ep_rank + 1) * el]
            start = start[groups.ep_rank * el : (groups.ep_rank + 1) * el]
        _close(p.detach() - start, want, f"zero{zero_stage} update {name}", tol=1e-3)


def state_parity_worker(rank: int, world: int, port: int, strategy: str, steps: int) -> None:
    """`steps` real optimizer steps in float64, 1 process on the whole batch (the 1-worker path:
    AdamWOptimizer) against `world` expert-parallel ranks on their slices (MoEOptimizer): after
    every step the states agree (parameters, router buffers incl. the carried BIP q, AdamW moments).

    The scores and BIP prices stay float32 by design (Router.scores), so agreement is to ~1e-6,
    not to float64 rounding; the q of the expert-parallel ranks comes from the gathered batch.
    """
    from workers.training.optim import AdamWOptimizer

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = init_ep_groups(world)
        torch.manual_seed(0)
        cfg = config(strategy)
        if strategy == "bip":
            moe = cfg.moe
            cfg = cfg.replace(moe=type(moe)(**{**moe.__dict__, "router": RouterConfig(strategy="bip", bip_iters=2)}))
        ref = CalibLM(cfg).double().train()
        model = shard_model(copy.deepcopy(ref), groups)
        kw = {"lr": 1e-2, "weight_decay": 0.1, "grad_clip": 1.0}
        ref_opt = AdamWOptimizer(ref, **kw)
        opt = MoEOptimizer(model, groups, micro_batch=ROWS_PER_RANK, **kw)
        for step in range(steps):
            x = torch.randint(0, 256, (world * ROWS_PER_RANK, 24), generator=torch.Generator().manual_seed(10 + step))
            out = ref_opt(x, attn="dense")
            ref_opt.backward(lm_loss(out.logits, x) + out.aux_loss)
            ref_opt.step(1e-2)
            balancing_step(ref)
            mine = x[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
            out_p = opt(mine, attn="dense")
            opt.backward(lm_loss(out_p.logits, mine) + out_p.aux_loss)
            opt.step(1e-2)
            balancing_step(model, groups)
            _compare_states(ref, ref_opt, model, opt, groups, f"{strategy} step {step + 1}")
    finally:
        dist.destroy_process_group()


def _compare_states(ref, ref_opt, model, opt, groups, what: str, tol: float = 1e-6) -> None:
    ref_params = dict(ref.named_parameters())
    ref_state = ref_opt.opt.state
    states = {**opt.dense_opt.state, **(opt.expert_opt.state if opt.expert_opt is not None else {})}
    for name, p in model.named_parameters():
        want, moments = ref_params[name].detach(), ref_state[ref_params[name]]
        mine = states[p]
        cut = slice(None)
        if is_expert_param(p):
            el = p.shape[0]
            cut = slice(groups.ep_rank * el, (groups.ep_rank + 1) * el)
        _close(p.detach(), want[cut], f"{what}: parameter {name}", tol)
        for key in ("exp_avg", "exp_avg_sq"):
            _close(mine[key], moments[key][cut], f"{what}: AdamW {key} of {name}", tol)
        if float(mine["step"]) != float(moments["step"]):
            raise AssertionError(f"{what}: AdamW step of {name}: {mine['step']} vs {moments['step']}")
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        if name.endswith(("bip_price", "balance_bias")):
            _close(b, ref_buffers[name], f"{what}: buffer {name}", tol)


def dp_bias_worker(rank: int, world: int, port: int) -> None:
    """Plain data parallel (the DataParallel layout, no expert parallelism): each rank routes its
    own batch; the loss-free bias then moves by the loads of all ranks, the same on every rank."""
    from workers.model.moe.balancing import loss_free_update
    from workers.training.config import tiny
    from workers.training.parallel import DataParallel

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        par = DataParallel(tiny(), world)
        torch.manual_seed(0)
        model = CalibLM(config("loss_free")).train()
        x = torch.randint(0, 256, (ROWS_PER_RANK, 24), generator=torch.Generator().manual_seed(100 + rank))
        model(x, attn="dense")
        local = [layer.router.step_load.clone() for _, layer in moe_layers(model)]
        balancing_step(model, par.groups)
        for i, (_, layer) in enumerate(moe_layers(model)):
            total = local[i].clone()
            dist.all_reduce(total)
            u = layer.cfg.router.bias_rate
            _close(layer.router.balance_bias, loss_free_update(torch.zeros_like(total), total, u), f"bias layer {i}")
            biases = [torch.empty_like(layer.router.balance_bias) for _ in range(world)]
            dist.all_gather(biases, layer.router.balance_bias)
            if not all(torch.equal(b, biases[0]) for b in biases):
                raise AssertionError(f"layer {i}: loss-free bias differs between data-parallel ranks")
            if torch.equal(total, local[i] * world):
                raise AssertionError("the ranks' batches route alike: the check would not see a local-only update")
    finally:
        dist.destroy_process_group()
