"""Hugging Face causal LMs behind CalibLM's forward/cache API: addresses (`address`), the
transformers bridge (`bridge`) and the export of dense CalibLMs (`export`).

What every module of the package shares lives here, so none of them imports another's
heavy dependencies (transformers loads only when a bridge is built).
"""

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
ATTN_IMPL = "calibray"


class HFModelError(ValueError):
    """An `hf:` address that does not hold a supported model."""
