"""KVTuner evaluation cost with the shared full-precision prefill against prefilling through every map.

    python -m benchmarks.kvtuner_shared_prefill --model smollm2-135m --corpus stdlib --maps 9

Both arms evaluate the same single-layer probes (the sensitivity profile's jobs) on the same calibration
windows in one process, one thread; the shared arm first pays one prefill per data set. Prints the wall
time of each arm, their ratio, and checks the log-probabilities are identical.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tuning.kvtuner.space import PAIRS
from workers.caches.precision import KVQuantConfig
from workers.data.corpus import load_corpus
from workers.kvtuner.evaluate import build_data, cache_factory, logprobs, prefills
from workers.model.hf.address import load_any, load_tokenizer
from workers.runtime import cli


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kvtuner_shared_prefill")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--continuation", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="calibration windows")
    p.add_argument("--maps", type=int, default=9, help="single-layer probes evaluated by each arm")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_any(a.model), load_tokenizer(a.model)
    data = build_data("text", load_corpus(a.corpus), "calib", a.n, 1, a.length, a.continuation, tokenizer=tok)
    cli.work_started()  # model and data loaded: errors from here on are the benchmark's
    n_layers = model.cfg.n_layers
    probes = [(i % n_layers, PAIRS[i % len(PAIRS)]) for i in range(a.maps)]
    make = lambda layer, pair: cache_factory(
        KVQuantConfig.uniform(pair, n_layers, group=32, residual=32), n_layers, "fake", layer
    )
    t0 = time.perf_counter()
    alone = [logprobs(model, data, make(layer, pair), a.n) for layer, pair in probes]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = prefills(model, data, a.n)
    shared = [logprobs(model, data, make(layer, pair), a.n, pre) for layer, pair in probes]
    t_shared = time.perf_counter() - t0
    out = {
        "model": a.model,
        "windows": a.n,
        "context": a.length - a.continuation,
        "scored": a.continuation,
        "maps": a.maps,
        "prefill_each_map_s": round(t_alone, 2),
        "shared_prefill_s": round(t_shared, 2),
        "speedup": round(t_alone / t_shared, 2),
        "identical": all(torch.equal(x, y) for x, y in zip(alone, shared)),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    cli.run(main)
