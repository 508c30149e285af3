"""Corpora and their deterministic train / calibration / held-out split.

The default corpus is the English text of Python's ``pydoc_data.topics`` (about 465 KB on
every machine). Documents (topics, lines of JSONL, rows of Parquet, blank-line-separated
paragraphs of text files) are shuffled with a seeded RNG and assigned to splits by bytes,
so the splits are disjoint at the document level. The text differs between Python patch
releases, so every run logs the corpus SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "calib", "heldout")


class CorpusError(ValueError):
    """A corpus source or split setting is invalid."""


@dataclass(frozen=True)
class SplitConfig:
    calib_frac: float = 0.1
    heldout_frac: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("calib_frac", "heldout_frac"):
            v = getattr(self, name)
            if not 0 < v < 0.5:
                raise CorpusError(f"{name}={v!r}: must be in (0, 0.5)")


@dataclass
class Corpus:
    name: str
    sha256: str  # of the full text, before splitting
    train: bytes
    calib: bytes
    heldout: bytes

    def split(self, name: str) -> bytes:
        if name not in SPLITS:
            raise CorpusError(f"split={name!r}: one of {SPLITS}")
        return getattr(self, name)

    def tokens(self, name: str) -> torch.Tensor:
        """Split as byte ids [n] int64."""
        return torch.frombuffer(bytearray(self.split(name)), dtype=torch.uint8).long()

    def eval_windows(self, name: str, length: int, max_windows: int | None = None) -> torch.Tensor:
        """Consecutive non-overlapping windows of a split, [n, length] (deterministic)."""
        t = self.tokens(name)
        n = t.numel() // length
        if n == 0:
            raise CorpusError(f"split {name!r} has {t.numel()} bytes, fewer than length={length}")
        if max_windows is not None:
            n = min(n, max_windows)
        return t[: n * length].view(n, length)

    def sample_windows(self, name: str, length: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Random windows [n, length] from a split."""
        t = self.tokens(name)
        starts = torch.randint(0, t.numel() - length, (n,), generator=generator)
        return torch.stack([t[s : s + length] for s in starts.tolist()])

    def summary(self) -> dict[str, object]:
        return {
            "corpus": self.name,
            "corpus_sha256": self.sha256,
            **{f"corpus_{s}_bytes": len(self.split(s)) for s in SPLITS},
        }


def _default_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]  # sorted: dict order must not matter


def _file_documents(path: Path) -> list[str]:
    if not path.exists():
        raise CorpusError(f"corpus={str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CorpusError(f"corpus={str(path)!r}: Parquet file has no 'text' column ({table.column_names})")
        return [t for t in table.column("text").to_pylist() if t]
    if suffix in (".jsonl", ".json"):
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorpusError(f"corpus={str(path)!r}: line {i + 1} is not a JSON object with 'text' ({e})") from e
        return docs
    if suffix in (".txt", ".md", ".text", ""):
        return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    raise CorpusError(f"corpus={str(path)!r}: unsupported suffix {suffix!r} (use .txt, .jsonl or .parquet)")


def _dedupe_paragraphs(docs: list[str]) -> list[str]:
    """Drop every paragraph already seen in an earlier document.

    Text shared by two documents in two splits would leak held-out text into training:
    pydoc_data.topics holds one topic twice and repeats long passages across topics.
    """
    seen: dict[str, None] = {}
    out = []
    for doc in docs:
        kept = []
        for para in doc.split("\n\n"):
            key = para.strip()
            if key and key in seen:
                continue
            seen[key] = None
            kept.append(para)
        text = "\n\n".join(kept)
        if text.strip():
            out.append(text)
    return out


def load_corpus(source: str = "pydoc", split: SplitConfig | None = None) -> Corpus:
    """Load and split a corpus. ``source``: "pydoc" (default) or a path to .txt/.jsonl/.parquet."""
    split = split or SplitConfig()
    docs = _default_documents() if source == "pydoc" else _file_documents(Path(source))
    if not docs:
        raise CorpusError(f"corpus={source!r}: no documents")
    docs = _dedupe_paragraphs(docs)
    full = "\n\n".join(docs).encode("utf-8")
    order = list(range(len(docs)))
    random.Random(split.seed).shuffle(order)
    total = len(full)
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    seen = 0
    for i in order:
        doc = docs[i].encode("utf-8")
        frac = seen / total
        if frac < split.heldout_frac:
            parts["heldout"].append(doc)
        elif frac < split.heldout_frac + split.calib_frac:
            parts["calib"].append(doc)
        else:
            parts["train"].append(doc)
        seen += len(doc) + 2
    joined = {s: b"\n\n".join(v) for s, v in parts.items()}
    for s, v in joined.items():
        if not v:
            raise CorpusError(f"corpus={source!r}: split {s!r} is empty; the corpus is too small")
    name = "pydoc_data.topics" if source == "pydoc" else str(source)
    return Corpus(name, hashlib.sha256(full).hexdigest(), joined["train"], joined["calib"], joined["heldout"])
