"""Tokenizers: what turns corpus text into a model's token ids, and back.

Every model address resolves to a model AND its tokenizer (`workers.model.hf.address.load_tokenizer`):
CalibLM checkpoints use `ByteTokenizer` (ids are UTF-8 bytes, vocabulary 256, nothing to download);
Hugging Face checkpoints use their own tokenizer files through `HFTokenizer`.

`n_bytes(ids)` is the number of UTF-8 bytes of text the ids stand for, the denominator of
bits/byte (NLL in nats / (ln 2 x bytes)), so models with different tokenizers compare.
"""

from __future__ import annotations

import json
import re
from functools import cache, cached_property
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

VOCAB_SIZE = 256


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def n_bytes(self, ids) -> int: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes of text one id stands for (b"" for special tokens): streamed text is the UTF-8
        decoding of the concatenation, so a character split across tokens is never split in output."""
        ...


def _as_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


class ByteTokenizer:
    name = "bytes"
    vocab_size = VOCAB_SIZE

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids) -> str:
        return bytes(_as_list(ids)).decode("utf-8", errors="replace")

    def n_bytes(self, ids) -> int:
        return len(ids)

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this tokenizer as Hugging Face tokenizer files that `AutoTokenizer` loads and that encode
        text to the same ids: a byte-level BPE whose 256 symbols are the bytes (id = byte value), no merges."""
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        rust = RustTokenizer(models.BPE(vocab=dict(unicode_to_bytes()), merges=[]))
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        rust.decoder = decoders.ByteLevel()
        PreTrainedTokenizerFast(tokenizer_object=rust, clean_up_tokenization_spaces=False).save_pretrained(directory)
        return Path(directory)


@cache
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: the printable character a byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + shifted
            shifted += 1
    return {chr(c): b for b, c in chars.items()}


def _is_byte_level(backend_json: dict) -> bool:
    decoder = backend_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


class TokenizerError(ValueError):
    """Tokenizer files that cannot be loaded; the message names the directory and the files."""


class HFTokenizer:
    """A transformers tokenizer from a local directory (no hub access) behind the `Tokenizer` protocol.

    `encode` returns the ids of the text only (no BOS/EOS added): windows of a corpus are cut from
    one long id sequence. The wrapped tokenizer is `.hf` (chat template, special tokens).

    `n_bytes`: for byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen, Llama-3) each token is a fixed
    byte string, read from its token text through the GPT-2 byte alphabet. That count is exact and
    additive over windows, which decoding is not: a window cut inside a multi-byte character
    decodes to U+FFFD (3 bytes) and decode-time clean-up rewrites spaces. Other tokenizers
    (SentencePiece) fall back to the UTF-8 length of the decoded text. Special tokens stand for
    no corpus text and count 0 bytes either way.
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.name = name or str(path)
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # json, the tokenizers library (a bare Exception) and transformers each raise their own
            files = ", ".join(sorted(f.name for f in self.path.glob("*token*"))) or "no tokenizer files"
            raise TokenizerError(
                f"{self.path}: tokenizer files ({files}) do not load: {type(e).__name__}: {e}"
            ) from None
        self.vocab_size = len(self.hf)
        backend = getattr(self.hf, "backend_tokenizer", None)
        self.byte_level = backend is not None and _is_byte_level(json.loads(backend.to_str()))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode(_as_list(ids))

    def n_bytes(self, ids) -> int:
        if not self.byte_level:
            return len(self.hf.decode(_as_list(ids), skip_special_tokens=True).encode("utf-8"))
        ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(_as_list(ids), dtype=torch.long)
        return int(self._token_sizes[ids].sum())

    def token_bytes(self, token: int) -> bytes:
        # ids past the tokenizer (embedding rows padded to a round size) stand for no text
        return self._token_table[token] if token < self.vocab_size else b""

    @cached_property
    def _token_sizes(self) -> torch.Tensor:
        """[vocab_size] UTF-8 bytes each id stands for."""
        return torch.tensor([len(b) for b in self._token_table], dtype=torch.long)

    @cached_property
    def _token_table(self) -> list[bytes]:
        """[vocab_size] the bytes each id stands for. Byte-level BPE: the token text read through the
        GPT-2 byte alphabet. SentencePiece: the piece with "▁" as a space, and `<0xNN>` byte-fallback
        pieces as their byte. Special tokens stand for no text; other added tokens for their content."""
        inv = unicode_to_bytes()
        special = set(self.hf.all_special_ids)
        added = {i: t.content for i, t in self.hf.added_tokens_decoder.items()}  # plain text, not byte alphabet

        def piece(i: int, token: str | None) -> bytes:
            if i in special or token is None:
                return b""
            if i in added:
                return added[i].encode("utf-8")
            if self.byte_level:
                return bytes(inv[c] for c in token)
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                return bytes([int(token[3:5], 16)])
            return token.replace("\u2581", " ").encode("utf-8")

        tokens = self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))
        return [piece(i, t) for i, t in enumerate(tokens)]
