"""Next-token choice: greedy, temperature and nucleus (top-p) sampling with a per-request generator.

Each request owns a ``torch.Generator`` seeded from its ``seed`` (or from the OS when none is
given), so a request's text depends only on its own seed, never on what else shares its batch.
"""

from __future__ import annotations

import os

import torch


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: sampling runs on CPU so the same seed gives the same text on any device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """logits [V] -> token id. temperature 0 is greedy (ties: lowest id, as torch.argmax)."""
    logits = logits.detach().float().cpu()
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
