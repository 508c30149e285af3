"""Next-token choice: logit bias, presence/frequency penalties, greedy, temperature and nucleus
(top-p) sampling with a per-request generator, and the log-probabilities a request asked for.

Each request owns a ``torch.Generator`` seeded from its ``seed`` (or from the OS when none is
given), so a request's text depends only on its own seed, never on what else shares its batch.

Order, as in OpenAI's and vLLM's documentation: logit bias, then the penalties
(``logit[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0)``, c[j] = times token j
was generated in this completion; prompt tokens are not counted), then temperature and top-p.
Reported log-probabilities are the model's own distribution (log-softmax of the raw logits,
before bias, penalties and temperature), vLLM's default: they say what the model thinks of a
token, whatever sampling settings chose it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. logprobs: how many top alternatives to report (None: no logprobs)."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature!r}: must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [-2, 2]")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs!r}: must be >= 0")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass(frozen=True)
class Choice:
    """One chosen token; logprob and top ([(id, logprob)], best first) only when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: sampling runs on CPU so the same seed gives the same text on any device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """logprobs [V] -> the k most likely (id, logprob), best first (ties: lowest id)."""
    if k <= 0:
        return []
    vals, ids = torch.sort(logprobs, descending=True, stable=True)
    return [(int(i), float(v)) for i, v in zip(ids[:k], vals[:k])]


def choose(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator, counts: Counter) -> Choice:
    """logits [V] of the next position; counts: tokens generated so far -> a Choice.

    temperature 0 is greedy (ties: lowest id, as torch.argmax)."""
    raw = logits.detach().float().cpu()
    x = raw
    if p.logit_bias or (p.penalised and counts):
        x = raw.clone()
        for tok, bias in p.logit_bias.items():
            x[tok] += bias
        if p.penalised and counts:
            ids = torch.tensor(list(counts.keys()), dtype=torch.long)
            c = torch.tensor(list(counts.values()), dtype=torch.float32)
            x[ids] -= p.frequency_penalty * c + p.presence_penalty
    token = _pick(x, p.temperature, p.top_p, generator)
    if p.logprobs is None:
        return Choice(token)
    lp = torch.log_softmax(raw, dim=-1)
    return Choice(token, float(lp[token]), top_logprobs(lp, p.logprobs))


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
