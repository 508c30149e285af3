"""An IndexCache pattern as a glm_moe_dsa checkpoint directory that plain transformers loads.

    python -m pipelines.indexcache_export --model hf:<glm_moe_dsa dir> --run <run_id> --retention 0.25 --out <dir>
    python -m pipelines.indexcache_export --model hf:<glm_moe_dsa dir> --pattern FSSFSS --out <dir>

`--run` takes the searched pattern at `--retention` from that run's indexcache.json
(`python -m pipelines.indexcache`); `--pattern` gives one by hand. The directory holds the
checkpoint's config.json with the pattern as `index_topk_pattern` and symbolic links to its other
files (weights, tokenizer), so `AutoModelForCausalLM.from_pretrained(<dir>)` builds no indexer on
the S layers. The pattern is checked against the model's layer count (layer 0 F) before anything is
written; bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.indexcache import artifact
from workers.indexcache.hf_export import glm_config, link_checkpoint
from workers.model.hf.address import local_dir, read_config
from workers.runtime import cli


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hf:<dir> of the glm_moe_dsa checkpoint the pattern is for")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pattern", help="an F/S string, one character per layer, layer 0 F")
    src.add_argument("--run", metavar="RUN_ID", help="an IndexCache run (or its indexcache.json) to take it from")
    p.add_argument("--retention", type=float, default=None, help="which searched pattern of --run (needed if several)")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    a = p.parse_args(argv)
    config = read_config(a.model)
    n_layers = int(config.get("num_hidden_layers", 0))
    pattern = a.pattern if a.run is None else artifact.load(a.run).select(a.retention, n_layers)
    glm_config(config, pattern)  # refuses another model type and a pattern that does not fit, naming it
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} exists and is not empty")
    link_checkpoint(local_dir(a.model), pattern, out)
    print(f"{out}: glm_moe_dsa with index_topk_pattern {pattern}")
    return out


if __name__ == "__main__":
    cli.run(main)
