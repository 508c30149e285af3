"""RULER-style long-range retrieval task, generated (no downloads), seeded and deterministic.

A sequence is filler text with several ``#key=value;`` records scattered through it and,
at the end, ``?key=`` queries whose answers are the values::

    ...filler #k3x=9ab; filler ... #q01=zzz; filler ...?k3x=9ab

Keys and values are 3 characters from ``[a-z0-9]``; 4-8 records per sequence; evaluation
sequences carry exactly one query, which ends the sequence, so the value is the last 3
bytes. Exact match = all value bytes right under argmax after the teacher-forced ``?key=``.
Only ``random.Random(seed)`` and lists are used: no set iteration, no hash randomness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
KEY_LEN = 3
VALUE_LEN = 3
RECORD_LEN = 1 + KEY_LEN + 1 + VALUE_LEN + 1  # "#kkk=vvv;"
_FILLER_TABLE = bytes.maketrans(b"#?", b"  ")  # markers never occur in filler


class RetrievalError(ValueError):
    pass


@dataclass(frozen=True)
class RetrievalConfig:
    length: int = 256
    min_records: int = 4
    max_records: int = 8
    min_queries: int = 1
    max_queries: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_records <= self.max_records:
            raise RetrievalError(
                f"min_records={self.min_records}, max_records={self.max_records}: need 1 <= min <= max"
            )
        if not 1 <= self.min_queries <= self.max_queries:
            raise RetrievalError(
                f"min_queries={self.min_queries}, max_queries={self.max_queries}: need 1 <= min <= max"
            )
        if self.min_queries > self.min_records:
            raise RetrievalError(f"min_queries={self.min_queries}: cannot exceed min_records={self.min_records}")
        need = self.max_records * RECORD_LEN + min(self.max_queries, self.max_records) * (RECORD_LEN - 1) + 4
        if self.length < need:
            raise RetrievalError(
                f"length={self.length}: too short for {self.max_records} records and "
                f"{min(self.max_queries, self.max_records)} queries (need >= {need})"
            )


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def make_sequence(rng: random.Random, filler: bytes, cfg: RetrievalConfig) -> tuple[bytes, list[int]]:
    """One sequence of exactly ``cfg.length`` bytes and the start offsets of its answers."""
    n_rec = rng.randint(cfg.min_records, cfg.max_records)
    n_q = rng.randint(cfg.min_queries, min(cfg.max_queries, n_rec))
    keys: list[str] = []
    while len(keys) < n_rec:
        k = _word(rng, KEY_LEN)
        if k not in keys:
            keys.append(k)
    values = [_word(rng, VALUE_LEN) for _ in keys]
    asked = rng.sample(range(n_rec), n_q)
    queries = "".join(f"?{keys[i]}={values[i]};" for i in asked)[:-1]  # the last query ends the sequence
    body_len = cfg.length - len(queries)
    n_fill = body_len - n_rec * RECORD_LEN
    start = rng.randrange(0, len(filler) - n_fill)
    fill = filler[start : start + n_fill].translate(_FILLER_TABLE)
    cuts = sorted(rng.randrange(0, n_fill + 1) for _ in range(n_rec))
    parts, prev = [], 0
    for cut, k, v in zip(cuts, keys, values):
        parts.append(fill[prev:cut])
        parts.append(f"#{k}={v};".encode())
        prev = cut
    parts.append(fill[prev:])
    seq = b"".join(parts) + queries.encode()
    answers, offset = [], len(seq) - len(queries)
    for i in asked:
        offset += 1 + KEY_LEN + 1
        answers.append(offset)
        offset += VALUE_LEN + 1
        del i
    assert len(seq) == cfg.length
    return seq, answers


def make_batch(filler: bytes, cfg: RetrievalConfig, n: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """n sequences [n, length] int64 plus per-sequence answer offsets."""
    if len(filler) < cfg.length * 2:
        raise RetrievalError(f"filler has {len(filler)} bytes; need at least {cfg.length * 2}")
    rng = random.Random(seed)
    seqs, answers = [], []
    for _ in range(n):
        s, a = make_sequence(rng, filler, cfg)
        seqs.append(torch.frombuffer(bytearray(s), dtype=torch.uint8).long())
        answers.append(a)
    return torch.stack(seqs), answers


@dataclass
class RetrievalEvalSet:
    """Single-query sequences: ``prompt`` [n, L-3] ends with ``?key=``; ``value`` [n, 3]."""

    prompt: torch.Tensor
    value: torch.Tensor
    seed: int
    split: str

    def __len__(self) -> int:
        return self.prompt.shape[0]


def eval_set(
    filler: bytes,
    n: int = 1000,
    length: int = 256,
    seed: int = 1234,
    split: str = "heldout",
    min_records: int = 4,
    max_records: int = 8,
) -> RetrievalEvalSet:
    """Held-out evaluation queries (filler from the given split, one query per sequence)."""
    cfg = RetrievalConfig(length=length, min_records=min_records, max_records=max_records)
    seqs, _ = make_batch(filler, cfg, n, seed)
    return RetrievalEvalSet(seqs[:, : length - VALUE_LEN], seqs[:, length - VALUE_LEN :], seed, split)
