"""Expert parallelism on transformers MoE models: 2 gloo processes (E / 2 experts each) give the
loss, logits, gradients and router state of 1 process, in float64, for every family."""

from __future__ import annotations

import torch.multiprocessing as mp

from tests.moe.hf_ep_workers import hf_parity_worker
from tests.moe.test_expert_parallel import free_port
from workers.model.hf.tiny_moe import TINY


def test_hf_ep2_matches_single_process():
    """One spawn for all families (each spawn costs two interpreters importing transformers):
    BIP (q from the scores gathered over the group), aux loss (f_j over the group), loss-free
    (bias moved by the loads of both ranks)."""
    strategies = ("bip", "aux_loss", "loss_free")
    mp.spawn(hf_parity_worker, args=(2, free_port(), tuple(sorted(TINY)), strategies), nprocs=2, join=True)
