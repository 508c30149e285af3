"""Tokenized shards stored as Parquet (one row per chunk of byte ids), keyed by corpus hash."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workers.data.corpus import SPLITS, Corpus

CHUNK = 65536


def write_shards(corpus: Corpus, root: str | Path) -> Path:
    """Write ``<root>/<sha256[:16]>/<split>.parquet``; reuses shards that already exist."""
    d = Path(root) / corpus.sha256[:16]
    d.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        path = d / f"{split}.parquet"
        if path.exists():
            continue
        data = corpus.split(split)
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        table = pa.table(
            {"chunk": list(range(len(chunks))), "tokens": [list(c) for c in chunks]},
            schema=pa.schema([("chunk", pa.int32()), ("tokens", pa.list_(pa.uint8()))]),
        )
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.rename(path)  # atomic: a crash never leaves a half-written shard behind
    return d


def read_shard(directory: str | Path, split: str) -> torch.Tensor:
    """Read a split's byte ids back as [n] int64."""
    table = pq.read_table(Path(directory) / f"{split}.parquet").sort_by("chunk")
    flat = [b for row in table.column("tokens").to_pylist() for b in row]
    return torch.tensor(flat, dtype=torch.long)
