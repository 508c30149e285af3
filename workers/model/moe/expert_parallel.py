"""Expert parallelism: process groups, a differentiable uneven all-to-all, and the EP expert pass.

Shape legend: N local tokens, K experts per token, E experts in total, El = E / ep experts
per rank, D model width, M = routed slots this rank sends (N*K minus dropped ones).

Rank layout (the same as DeepSpeed's): rank = dp_index * ep_size + ep_rank. The ranks
dp_index*ep .. dp_index*ep + ep - 1 form one expert-parallel group and together hold all E
experts (rank r holds experts r*El .. r*El + El - 1); the ranks with the same ep_rank hold the
same experts and form that expert's data-parallel group (its replicas).

The expert pass: every rank has its slots sorted by global expert (kernels.moe_dispatch.
permute); counts go round with an all-to-all, then the rows with an uneven differentiable
all-to-all; the receiver regroups them by local expert, runs grouped_swiglu, undoes the
regrouping and sends them back along the same route.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels.moe_dispatch import grouped_swiglu


@dataclass
class EPGroups:
    """Process groups of one (dp_size x ep_size) layout, as seen from this rank."""

    ep_size: int
    dp_size: int
    rank: int
    ep_rank: int
    ep_group: object | None  # ranks sharing one batch's experts (None when ep_size == 1)
    expert_dp_group: object | None  # replicas of this rank's experts (None when dp_size == 1)

    @property
    def world_size(self) -> int:
        return self.ep_size * self.dp_size


def init_ep_groups(ep_size: int) -> EPGroups:
    """Create the expert-parallel and expert-data-parallel groups; every rank must call it."""
    if not dist.is_initialized():
        if ep_size != 1:
            raise ValueError(f"ep_size={ep_size} needs torch.distributed to be initialized")
        return EPGroups(1, 1, 0, 0, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide the world size {world}")
    dp_size = world // ep_size
    ep_group = expert_dp_group = None
    # new_group is collective over the whole world: every rank creates every group in order
    for d in range(dp_size):
        ranks = list(range(d * ep_size, (d + 1) * ep_size))
        g = dist.new_group(ranks) if ep_size > 1 else None
        if rank in ranks:
            ep_group = g
    for e in range(ep_size):
        ranks = list(range(e, world, ep_size))
        g = dist.new_group(ranks) if dp_size > 1 else None
        if rank in ranks:
            expert_dp_group = g
    return EPGroups(ep_size, dp_size, rank, rank % ep_size, ep_group, expert_dp_group)


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits = (in_splits, out_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        out = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all: x [sum(in_splits), ...] -> [sum(out_splits), ...]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _regroup_index(recv: torch.Tensor) -> torch.Tensor:
    """Rows arrive ordered (source rank, local expert); return the gather index that orders
    them (local expert, source rank). recv [ep, El] row counts -> index [sum(recv)]."""
    seg = recv.reshape(-1)
    starts = (torch.cumsum(seg, 0) - seg).view_as(recv)  # where block (r, e) begins
    seg_t, starts_t = recv.t().reshape(-1), starts.t().reshape(-1)  # blocks in (e, r) order
    total = int(seg.sum())
    offsets_t = torch.cumsum(seg_t, 0) - seg_t
    within = torch.arange(total, device=recv.device) - torch.repeat_interleave(offsets_t, seg_t)
    return torch.repeat_interleave(starts_t, seg_t) + within


def ep_expert_pass(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    groups: EPGroups,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the slots of this rank on the experts of the whole expert-parallel group.

    x_sorted [M, D] sorted by global expert, counts [E] slots per global expert;
    w_gate/w_up [El, D, F], w_down [El, F, D] the local experts. Returns (y_sorted [M, D] in the
    order of x_sorted, local_load [El] rows this rank's experts processed).
    """
    ep, el = groups.ep_size, w_gate.shape[0]
    if counts.numel() != ep * el:
        raise ValueError(f"counts has {counts.numel()} experts, expected ep_size*El = {ep}*{el}")
    send = counts.to(torch.int64).view(ep, el)  # [ep, El] rows for each destination's experts
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=groups.ep_group)  # recv[r, e]: rows from rank r
    in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    x_recv = all_to_all(x_sorted, out_splits, in_splits, groups.ep_group)  # [R, D]
    index = _regroup_index(recv)  # [R]
    y_local = grouped_swiglu(x_recv[index], recv.sum(0), w_gate, w_up, w_down)  # [R, D]
    if x_recv.shape[0] == 0 and x_recv.requires_grad:
        # No rows for this rank's experts: keep the output attached to x_recv anyway, or autograd
        # skips this rank's backward all-to-alls while its peers run theirs (a gloo size mismatch
        # that aborted training once routing collapsed onto the other rank's experts).
        y_local = y_local + 0 * x_recv.sum()
    y_recv = torch.zeros_like(y_local).index_copy(0, index, y_local)  # back to (rank, expert)
    y_sorted = all_to_all(y_recv, in_splits, out_splits, groups.ep_group)  # [M, D]
    return y_sorted, recv.sum(0)


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate x [n_r, ...] of every rank of `group` in rank order (no gradient)."""
    if group is None:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    top = int(max(s.item() for s in sizes))
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of x over `group` (x itself when group is None); no gradient."""
    if group is None:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


def mark_expert_param(p: torch.nn.Parameter, ep_size: int) -> torch.nn.Parameter:
    """Tag a parameter as expert-local: its gradient is reduced over its replicas only."""
    p.expert_parallel = True
    # DeepSpeed's names for the same fact, so a DeepSpeed engine treats it as an expert too
    p.allreduce = False
    p.group_name = f"ep_size_{ep_size}"
    return p


def is_expert_param(p: torch.Tensor) -> bool:
    return bool(getattr(p, "expert_parallel", False))


def sync_gradients(params, groups: EPGroups) -> None:
    """Turn per-rank gradients into the gradient of the mean loss over all ranks.

    Each rank's loss is the mean over its own tokens. Dense gradients are summed over the
    world; an expert's gradient already holds the contributions of its whole expert-parallel
    group (the all-to-all backward brings them home), so it is summed over the replicas of
    that expert only. Both are divided by the world size.
    """
    world = groups.world_size
    if world == 1:
        return
    dense = [p.grad for p in params if p.grad is not None and not is_expert_param(p)]
    expert = [p.grad for p in params if p.grad is not None and is_expert_param(p)]
    for grads, group in ((dense, None), (expert, groups.expert_dp_group)):
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        if group is not None or grads is dense:
            dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
