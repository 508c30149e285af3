"""A searched F/S pattern as a glm_moe_dsa config.json that plain transformers loads.

    doc = glm_config(json.load(open("<ckpt>/config.json")), "FSSF")   # the config with the pattern
    out = link_checkpoint("<ckpt>", "FSSF", "<out>")                   # config + links to weights, tokenizer
    model = AutoModelForCausalLM.from_pretrained(out)                  # S layers build no indexer

GlmMoeDsaConfig takes its per-layer `indexer_types` from `index_topk_pattern` (a string over F/S)
when `indexer_types` is absent; the schedule keys (`indexer_types`, `index_topk_freq`,
`index_skip_topk_offset`) are dropped so that the pattern is the one source. The checkpoint's weights
are unchanged: the indexer weights of S layers load as unexpected keys and are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tuning.indexcache.patterns import validate_pattern

PATTERN_KEY = "index_topk_pattern"
SCHEDULE_KEYS = ("indexer_types", "index_topk_freq", "index_skip_topk_offset")
CONFIG_FILE = "config.json"


def glm_config(config: dict, pattern: str) -> dict:
    """config.json contents of a glm_moe_dsa checkpoint -> the same with `pattern` as its F/S layers."""
    if config.get("model_type") != "glm_moe_dsa":
        raise ValueError(f"model_type={config.get('model_type')!r}: only glm_moe_dsa configs carry an F/S pattern")
    validate_pattern(pattern, int(config["num_hidden_layers"]))
    out = {k: v for k, v in config.items() if k not in SCHEDULE_KEYS}
    out[PATTERN_KEY] = pattern
    return out


def link_checkpoint(source: str | Path, pattern: str, out: str | Path) -> Path:
    """A directory `out` loadable by `from_pretrained`: the pattern's config.json, and symbolic links to
    every other file of the checkpoint `source` (weights, tokenizer), so nothing large is copied."""
    source, out = Path(source), Path(out)
    doc = glm_config(json.loads((source / CONFIG_FILE).read_text(encoding="utf-8")), pattern)
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name != CONFIG_FILE and f.is_file() and not (out / f.name).exists():
            os.symlink(f.resolve(), out / f.name)
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return out
