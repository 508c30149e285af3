"""RULER-style long-range retrieval task, generated (no downloads), seeded and deterministic.

A sequence is filler text with several ``#key=value;`` records scattered through it and,
at the end, ``?key=`` queries whose answers are the values::

    ...filler #k3x=9ab; filler ... #q01=zzz; filler ...?k3x=9ab

Keys and values are 3 characters from ``[a-z0-9]``; 4-8 records per sequence; evaluation
sequences carry exactly one query, which ends the sequence, so the value is the last 3
bytes. Exact match = all value tokens right under argmax after the teacher-forced ``?key=``.
Only ``random.Random(seed)`` and lists are used: no set iteration, no hash randomness.

With a model's own tokenizer (``eval_set(..., tokenizer=)``) the sequence is built in token
space, ``length`` counted in tokens: filler is a slice of the tokenized filler text, a record is
``encode(" #key=") + encode(value) + encode(";")`` inserted at a token boundary, the query is
``encode(" ?key=")`` and the answer ``encode(value)``. Built from pieces, the answer span is
exact (no merge across the ``=`` can move it) and every example has the same shape: values are
drawn until they encode to ``value_tokens(tokenizer)`` tokens. (Tokenizing the finished text
instead would let BPE merge the value with its neighbours, so neither its span nor its length
would be known.) A ``length`` too short for ``max_records`` records, the query and some filler
is refused. The byte path (no tokenizer, or the byte tokenizer) is unchanged, bit for bit.

Shape legend: n sequences, L = length (bytes, or the tokenizer's tokens), V = value tokens
(``value_tokens(tokenizer)``, 3 for bytes); ``eval_set`` gives prompt [n, L-V], value [n, V].
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from workers.data.corpus import is_bytes
from workers.data.tokenizer import Tokenizer

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


def value_tokens(tokenizer: Tokenizer | None = None) -> int:
    """Tokens of every answer: VALUE_LEN for bytes; for a real tokenizer the most common encoded
    length of 3-character values (a fixed-seed sample; ties to the smaller), so most draws fit."""
    if is_bytes(tokenizer):
        return VALUE_LEN
    rng = random.Random(0)
    counts = Counter(len(tokenizer.encode(_word(rng, VALUE_LEN))) for _ in range(64))
    return min(counts, key=lambda n: (-counts[n], n))


def _value_ids(rng: random.Random, tokenizer: Tokenizer, n_tokens: int) -> list[int]:
    """The ids of a random 3-character value that encodes to exactly n_tokens tokens."""
    for _ in range(1000):
        ids = tokenizer.encode(_word(rng, VALUE_LEN))
        if len(ids) == n_tokens:
            return ids
    raise RetrievalError(f"no 3-character value encodes to {n_tokens} tokens in 1000 draws")


def min_token_length(tokenizer: Tokenizer, max_records: int, n_value: int) -> int:
    """Tokens a sequence needs: ``max_records`` of the longest records and the longest query over a
    fixed-seed sample of keys, the answer and 4 filler tokens (the byte version's margin)."""
    rng = random.Random(0)
    keys = [_word(rng, KEY_LEN) for _ in range(64)]
    record = max(len(tokenizer.encode(f" #{k}=")) for k in keys) + n_value + len(tokenizer.encode(";"))
    query = max(len(tokenizer.encode(f" ?{k}=")) for k in keys)
    return max_records * record + query + n_value + 4


def make_token_sequence(
    rng: random.Random, filler: list[int], cfg: RetrievalConfig, tokenizer: Tokenizer, n_value: int
) -> list[int]:
    """One single-query sequence of exactly ``cfg.length`` token ids; the last ``n_value`` are the answer."""
    n_rec = rng.randint(cfg.min_records, cfg.max_records)
    keys: list[str] = []
    while len(keys) < n_rec:
        k = _word(rng, KEY_LEN)
        if k not in keys:
            keys.append(k)
    values = [_value_ids(rng, tokenizer, n_value) for _ in keys]
    asked = rng.randrange(n_rec)
    records = [tokenizer.encode(f" #{k}=") + v + tokenizer.encode(";") for k, v in zip(keys, values)]
    query = tokenizer.encode(f" ?{keys[asked]}=")
    n_fill = cfg.length - sum(map(len, records)) - len(query) - n_value
    if n_fill < 1:
        raise RetrievalError(
            f"length={cfg.length}: too short for {n_rec} records and a query in tokens "
            f"({cfg.length - n_fill + 1} needed by this draw)"
        )
    start = rng.randrange(0, len(filler) - n_fill)
    fill = filler[start : start + n_fill]
    cuts = sorted(rng.randrange(0, n_fill + 1) for _ in range(n_rec))
    seq, prev = [], 0
    for cut, rec in zip(cuts, records):
        seq += fill[prev:cut] + rec
        prev = cut
    seq += fill[prev:] + query + values[asked]
    assert len(seq) == cfg.length
    return seq


@dataclass
class RetrievalEvalSet:
    """Single-query sequences: ``prompt`` [n, L-V] ends with ``?key=``; ``value`` [n, V]."""

    prompt: torch.Tensor
    value: torch.Tensor
    seed: int
    split: str

    def __len__(self) -> int:
        return self.prompt.shape[0]

    @property
    def value_len(self) -> int:
        return self.value.shape[1]


def eval_set(
    filler: bytes,
    n: int = 1000,
    length: int = 256,
    seed: int = 1234,
    split: str = "heldout",
    min_records: int = 4,
    max_records: int = 8,
    tokenizer: Tokenizer | None = None,
) -> RetrievalEvalSet:
    """Held-out evaluation queries (filler from the given split, one query per sequence).

    ``tokenizer``: the model's; ``length`` is then in its tokens (see the module docstring)."""
    cfg = RetrievalConfig(length=length, min_records=min_records, max_records=max_records)
    if is_bytes(tokenizer):
        seqs, _ = make_batch(filler, cfg, n, seed)
        return RetrievalEvalSet(seqs[:, : length - VALUE_LEN], seqs[:, length - VALUE_LEN :], seed, split)
    n_value = value_tokens(tokenizer)
    need = min_token_length(tokenizer, max_records, n_value)
    if length < need:
        raise RetrievalError(
            f"length={length}: too short for {max_records} records and a query in "
            f"{getattr(tokenizer, 'name', 'the tokenizer')}'s tokens (need >= {need})"
        )
    text = filler.decode("utf-8", errors="replace").translate({ord("#"): " ", ord("?"): " "})
    ids = tokenizer.encode(text)  # once per call: slices of it are the filler
    if len(ids) < 2 * length:
        raise RetrievalError(f"filler has {len(ids)} tokens; need at least {2 * length}")
    rng = random.Random(seed)
    seqs = torch.tensor([make_token_sequence(rng, ids, cfg, tokenizer, n_value) for _ in range(n)], dtype=torch.long)
    return RetrievalEvalSet(seqs[:, : length - n_value], seqs[:, length - n_value :], seed, split)
