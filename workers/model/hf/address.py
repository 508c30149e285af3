"""Model addresses -> (model, tokenizer): CalibLM checkpoints and Hugging Face causal LMs behind one API.

    model = load_any("smollm2-135m")                 # or hf:<dir>, runs:/<id>/hf_model, runs:/<id>/model
    tok = load_tokenizer("smollm2-135m")             # cheap: configs and tokenizer files, no weights
    out = model(tokens, positions=pos, cache=cache)   # cache: any workers.caches.protocol protocol

The forms (ADDRESS_HELP): `runs:/<id>/model` or a checkpoint directory (CalibLM, byte tokenizer);
`hf:<dir>` or `runs:/<id>/hf_model` (any supported transformers causal LM with its own tokenizer);
a shipped name (`workers.model.hf.shipped`). What a directory holds is read from its config.json:
transformers configs carry a `model_type`, CalibLM configs never do.

HF models run through `workers.model.hf.bridge.HFCausalLM` (our caches and observers plug into
transformers' own Cache and AttentionInterface; no model code is copied).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.data.tokenizer import VOCAB_SIZE, ByteTokenizer, HFTokenizer, Tokenizer
from workers.model.hf import ATTN_IMPL, HFModelError, check_model_type
from workers.model.hf.shipped import SHIPPED, is_shipped, shipped_dir

ADDRESS_HELP = (
    "runs:/<run_id>/model or a checkpoint directory (CalibLM), hf:<dir> or runs:/<run_id>/hf_model "
    f"(Hugging Face checkpoint), or a shipped model ({', '.join(SHIPPED)})"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# a checkpoint has its own tokenizer when transformers finds one of these beside config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def is_hf_address(address: str | Path) -> bool:
    return str(address).startswith("hf:")


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None -> fp32 on CPU, bf16 on GPU; "fp32" | "bf16" | "fp16" or a torch.dtype -> torch.dtype."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> str:
    """The name ("fp32", "bf16", "fp16") of the dtype `resolve_dtype` picks: what artifacts record."""
    resolved = resolve_dtype(dtype, device)
    return next(k for k, v in DTYPES.items() if v == resolved)


def local_dir(address: str | Path) -> Path:
    """The local directory an address names: an MLflow artifact is downloaded, a shipped model converted once."""
    from workers.model.checkpoint import locate

    a = str(address)
    if is_shipped(a):
        return shipped_dir(a)
    return Path(a[3:]).expanduser() if is_hf_address(a) else locate(a)


def config_file(address: str | Path) -> Path:
    """config.json of any address, fetching nothing else (an MLflow artifact's weights stay remote)."""
    from workers.model.checkpoint import CheckpointError, locate

    a = str(address)
    path = (
        locate(a.rstrip("/") + "/config.json") if a.startswith(("runs:/", "models:/")) else local_dir(a) / "config.json"
    )
    if not path.is_file():
        raise (HFModelError if is_hf_address(a) else CheckpointError)(
            f"model={a!r}: missing config.json in {path.parent}"
        )
    return path


def read_config(address: str | Path) -> dict:
    return _json(config_file(address))


def _json(path: Path) -> dict:
    """A config.json's contents; a file that is not JSON is named, with where it breaks."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFModelError(f"{path}: not a JSON config ({e})") from None


def check_weights(address: str | Path) -> None:
    """Open the header of every safetensors file the model at `address` loads, before any work.

    A truncated or corrupt file is refused here naming it; without this check it passed the
    config-only checks and failed in every actor after Ray and an MLflow run had started (where
    actor replacement repeated the load forever). Only headers are read (safetensors checks that
    they cover the file); MLflow-hosted weights (runs:/, models:/) are not fetched for this: the
    actors download them, and what MLflow stored was whole when it was logged."""
    from safetensors import SafetensorError, safe_open

    from workers.model.checkpoint import WEIGHTS_FILE, CheckpointError

    a = str(address)
    if a.startswith(("runs:/", "models:/")):
        return
    hf = is_hf_address(a) or is_shipped(a) or is_hf_config(read_config(a))
    error = HFModelError if hf else CheckpointError
    path = local_dir(a)
    index = path / f"{WEIGHTS_FILE}.index.json"
    if index.is_file():  # sharded: the shards the index names
        files = sorted({path / f for f in _json(index).get("weight_map", {}).values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        if hf and any(path.glob("pytorch_model*.bin")):
            return  # transformers loads the pickle format itself; nothing cheap to check
        raise error(f"model={a!r}: no weights in {path} (expected {WEIGHTS_FILE})")
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise error(f"model={a!r}: {f} is not a readable safetensors file ({e})") from None


def is_hf_config(config: dict) -> bool:
    return "model_type" in config


def _vocab_size(config: dict) -> int:
    return int(config.get("vocab_size") or config.get("text_config", {})["vocab_size"])


def load_tokenizer(address: str | Path) -> Tokenizer:
    """The tokenizer the model at `address` was trained with; refuses a model it cannot tokenize for.

    CalibLM checkpoints -> ByteTokenizer. HF checkpoints -> their own tokenizer files (HFTokenizer);
    one without tokenizer files falls back to the byte tokenizer only if its vocabulary is the 256
    bytes (the project's exports from before tokenizer files were written); any other vocabulary is
    an HFModelError naming the address and the size, raised before any model is loaded.
    """
    a = str(address)
    config = read_config(a)
    vocab = _vocab_size(config)
    path = local_dir(a) if is_hf_config(config) else None
    if path is not None and any((path / f).is_file() for f in TOKENIZER_FILES):
        tok = HFTokenizer(path, name=a)
        if tok.vocab_size > vocab:
            raise HFModelError(f"model={a!r}: tokenizer has {tok.vocab_size} ids, the model's vocabulary {vocab}")
        return tok
    if vocab != VOCAB_SIZE:
        raise HFModelError(
            f"model={a!r}: no tokenizer files and a vocabulary of {vocab} tokens; only a {VOCAB_SIZE}-token "
            "vocabulary defaults to the byte tokenizer"
        )
    return ByteTokenizer()


def load_hf(
    address: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> nn.Module:
    """`hf:<dir>`, `runs:/<id>/hf_model`, a shipped name or an HF directory -> HFCausalLM in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.model.hf.bridge import HFCausalLM

    a = str(address)
    path = local_dir(a)
    if not (path / "config.json").is_file():
        raise HFModelError(f"model={a!r}: missing config.json in {path}")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    check_model_type(cfg, a)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), attn_implementation=ATTN_IMPL, local_files_only=True
    )
    return HFCausalLM(hf.to(device))


def load_any(
    address: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> nn.Module:
    """Any address (ADDRESS_HELP) -> HFCausalLM or CalibLM in eval mode.

    dtype None: HF models fp32 on CPU, bf16 on GPU; CalibLMs stay in the fp32 they were trained in
    unless a dtype is given."""
    if is_hf_address(address) or is_shipped(str(address)) or is_hf_config(read_config(address)):
        return load_hf(address, device, dtype)
    from workers.model.checkpoint import load

    model = load(address, device)
    return model if dtype is None else model.to(resolve_dtype(dtype, device))


@dataclass(frozen=True)
class ModelShape:
    """What pipelines validate against before loading weights, read from the model's config only."""

    n_layers: int
    head_dim: int
    n_kv_heads: int
    max_seq_len: int
    vocab_size: int
    model_type: str  # "calib" for CalibLM checkpoints
    has_indexer: bool = False  # a CalibLM with a DSA indexer


def describe(address: str | Path) -> ModelShape:
    """Any address -> ModelShape from its config.json (no weights are loaded; an HF model outside the
    supported families is refused here, naming its type)."""
    path = config_file(address)
    if is_hf_config(_json(path)):
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(path.parent, local_files_only=True)
        check_model_type(c, str(address))
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return ModelShape(c.num_hidden_layers, hd, kv, c.max_position_embeddings, c.vocab_size, c.model_type)
    from workers.model.checkpoint import load_config

    c = load_config(address)
    return ModelShape(c.n_layers, c.head_dim, c.n_kv_heads, c.max_seq_len, c.vocab_size, "calib", c.indexer is not None)


def model_shape(address: str) -> tuple[int, int, int]:
    """(n_layers, head_dim, n_kv_heads) of `describe`."""
    d = describe(address)
    return d.n_layers, d.head_dim, d.n_kv_heads
