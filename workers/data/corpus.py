"""Corpora, their deterministic train / calibration / held-out split, and their tokens.

Built-in corpora ship with every Python (nothing to download):
- "pydoc" (default): the English text of ``pydoc_data.topics``, about 465 KB;
- "stdlib": the interpreter's own top-level ``Lib/*.py`` sources, one document per file, about
  4.7 MB: enough held-out text to evaluate a real BPE model (pydoc holds ~10K such tokens).
Documents (topics, files, lines of JSONL, rows of Parquet, blank-line-separated paragraphs of
text files) are shuffled with a seeded RNG and assigned to splits by bytes, so the splits are
disjoint at the document level. The split is TEXT; a model's tokenizer turns it into ids
(``Corpus.tokens(split, tokenizer)``), so windows are counted in the model's tokens. Without a
tokenizer (or with the byte tokenizer) ids are the UTF-8 bytes, exactly as before tokenizers
existed. The text differs between Python patch releases, so every run logs the corpus SHA-256
with its split (``Corpus.summary``).

Shape legend: T tokens of a split, N windows, L window length.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.data.tokenizer import ByteTokenizer, Tokenizer

SPLITS = ("train", "calib", "heldout")


class CorpusError(ValueError):
    """A corpus source or split setting is invalid."""


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of the corpus bytes held out and kept for calibration; the rest is train.

    A corpus no model is trained on (a real model evaluated here) may be mostly held-out.
    """

    calib_frac: float = 0.1
    heldout_frac: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("calib_frac", "heldout_frac"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise CorpusError(f"{name}={v!r}: must be in (0, 1)")
        if self.calib_frac + self.heldout_frac >= 1:
            raise CorpusError(
                f"calib_frac={self.calib_frac!r} + heldout_frac={self.heldout_frac!r}: must sum to < 1 "
                "(the train split may not be empty)"
            )


def is_bytes(tokenizer: Tokenizer | None) -> bool:
    """True when ids are the UTF-8 bytes themselves (no tokenizer, or the byte tokenizer)."""
    return tokenizer is None or isinstance(tokenizer, ByteTokenizer)


@dataclass
class Corpus:
    name: str
    sha256: str  # of the full text, before splitting
    train: bytes
    calib: bytes
    heldout: bytes
    split_config: SplitConfig = field(default_factory=SplitConfig)
    # (split, id(tokenizer)) -> (tokenizer, ids [T]): a split is tokenized once per tokenizer
    _tokens: dict = field(default_factory=dict, repr=False, compare=False)

    def split(self, name: str) -> bytes:
        if name not in SPLITS:
            raise CorpusError(f"split={name!r}: one of {SPLITS}")
        return getattr(self, name)

    def text(self, name: str) -> str:
        return self.split(name).decode("utf-8")

    def tokens(self, name: str, tokenizer: Tokenizer | None = None) -> torch.Tensor:
        """A split's ids [T] int64: UTF-8 bytes (no tokenizer / the byte tokenizer) or the tokenizer's ids
        of the split's text (encoded as one text, so no window boundary is baked into the ids)."""
        if is_bytes(tokenizer):
            return torch.frombuffer(bytearray(self.split(name)), dtype=torch.uint8).long()
        key = (name, id(tokenizer))
        if key not in self._tokens:
            self._tokens[key] = (tokenizer, torch.tensor(tokenizer.encode(self.text(name)), dtype=torch.long))
        return self._tokens[key][1]

    def eval_windows(
        self, name: str, length: int, max_windows: int | None = None, tokenizer: Tokenizer | None = None
    ) -> torch.Tensor:
        """Consecutive non-overlapping windows of a split, [N, length] (deterministic)."""
        t = self.tokens(name, tokenizer)
        n = t.numel() // length
        if n == 0:
            raise CorpusError(f"split {name!r} has {t.numel()} tokens, fewer than length={length}")
        if max_windows is not None:
            n = min(n, max_windows)
        return t[: n * length].view(n, length)

    def sample_windows(
        self, name: str, length: int, n: int, generator: torch.Generator, tokenizer: Tokenizer | None = None
    ) -> torch.Tensor:
        """n windows [N, length] from a split, drawn with ``generator``: see ``draw_windows``."""
        return draw_windows(self.tokens(name, tokenizer), length, n, generator, disjoint=not is_bytes(tokenizer))

    def summary(self) -> dict[str, object]:
        sc = self.split_config
        return {
            "corpus": self.name,
            "corpus_sha256": self.sha256,
            "corpus_split": f"calib={sc.calib_frac:g},heldout={sc.heldout_frac:g},seed={sc.seed}",
            **{f"corpus_{s}_bytes": len(self.split(s)) for s in SPLITS},
        }


def draw_windows(t: torch.Tensor, length: int, n: int, generator: torch.Generator, disjoint: bool) -> torch.Tensor:
    """n windows [N, length] of ids t [T].

    ``disjoint``: n distinct slots of the consecutive non-overlapping windows, in drawn order, so no
    token is scored twice (a split too short for n windows is refused by name). Byte ids keep the
    overlapping draw from random starts they always had: results recorded on the project's byte
    models then reproduce exactly.
    """
    if disjoint:
        slots = t.numel() // length
        if slots < n:
            raise CorpusError(
                f"{t.numel()} tokens hold {slots} disjoint windows of length={length}, fewer than n={n}: "
                "ask for fewer or shorter examples, or use a larger corpus (--corpus stdlib)"
            )
        pick = torch.randperm(slots, generator=generator)[:n] * length
        return torch.stack([t[s : s + length] for s in pick.tolist()])
    if t.numel() <= length:
        raise CorpusError(f"{t.numel()} tokens: not more than length={length}")
    starts = torch.randint(0, t.numel() - length, (n,), generator=generator)
    return torch.stack([t[s : s + length] for s in starts.tolist()])


def _default_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]  # sorted: dict order must not matter


def _stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.py"))]  # sorted: listing order must not matter


# name -> (documents, display name, default split). The stdlib sources train nothing here, so their
# default split is mostly held-out: text a real model is evaluated on.
BUILTIN = {
    "pydoc": (_default_documents, "pydoc_data.topics", SplitConfig()),
    "stdlib": (_stdlib_documents, "stdlib", SplitConfig(calib_frac=0.2, heldout_frac=0.7)),
}


def _file_documents(path: Path) -> list[str]:
    if not path.exists():
        raise CorpusError(f"corpus={str(path)!r}: no such file")
    try:
        return _read_documents(path)
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus={str(path)!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_documents(path: Path) -> list[str]:
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
    """Load and split a corpus. ``source``: a built-in name ("pydoc" default, "stdlib") or a path to
    .txt/.jsonl/.parquet; ``split`` defaults to the built-in corpus's own (0.1 / 0.1 for files)."""
    if source in BUILTIN:
        documents, name, default_split = BUILTIN[source]
        docs = documents()
    else:
        name, default_split = str(source), SplitConfig()
        docs = _file_documents(Path(source))
    split = split or default_split
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
    return Corpus(name, hashlib.sha256(full).hexdigest(), joined["train"], joined["calib"], joined["heldout"], split)
