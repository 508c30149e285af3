"""Expert-parallel parity on real gloo process groups: same outputs and gradients as 1 process."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp

from tests.moe.ep_workers import dp_bias_worker, parity_worker, state_parity_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ep2_matches_single_process():
    """2 ranks, 2 experts each: logits, dense and expert gradients equal the 1-process run.
    BIP prices come from the scores gathered over the expert-parallel group (= whole batch)."""
    mp.spawn(parity_worker, args=(2, 2, free_port(), ("none", "aux_loss", "bip")), nprocs=2, join=True)


def test_2dp_x_2ep_matches_single_process():
    """4 ranks = 2 data-parallel replicas x 2 expert-parallel ranks: expert gradients reduced
    over the replicas of the same expert only, dense ones over all ranks; the loss-free bias
    moves by the load of all ranks, identically on every replica. Then one optimizer step,
    with DeepSpeed ZeRO 1 and 2 on the dense parameters, updates every parameter as
    the 1-process step does."""
    mp.spawn(parity_worker, args=(4, 2, free_port(), ("none", "loss_free"), (1, 2)), nprocs=4, join=True)


def test_ep2_state_matches_single_process_over_five_steps():
    """5 float64 optimizer steps, 1 process (the 1-worker optimizer) vs 2 expert-parallel ranks:
    parameters, AdamW moments, and router state (the carried BIP q; the loss-free bias) agree
    after every step, so nothing drifts apart over steps that one step's gradients would hide."""
    for strategy in ("bip", "loss_free"):
        mp.spawn(state_parity_worker, args=(2, free_port(), strategy, 5), nprocs=2, join=True)


def test_data_parallel_loss_free_bias_moves_by_all_ranks_loads():
    """2 data-parallel ranks (the DataParallel layout Ray Train uses without --ep-size): the
    loss-free bias moves by the loads summed over both ranks and stays equal on both."""
    mp.spawn(dp_bias_worker, args=(2, free_port()), nprocs=2, join=True)
