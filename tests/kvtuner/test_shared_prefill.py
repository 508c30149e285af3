"""With prefill="full" every map's cache starts from the full-precision prefill, so KVWorker computes it
once per data set: every number equals the one from prefilling through each map's own cache, bit for bit."""

from __future__ import annotations

import torch

from workers.caches.precision import KVQuantConfig
from workers.kvtuner.actors import KVWorker
from workers.kvtuner.evaluate import EvalData, cache_factory, logprobs, task_metric


def test_shared_prefill_equals_prefilling_each_map(tiny_llama_dir):
    path = tiny_llama_dir("shared_prefill", hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (6, 48), generator=g)
    data = EvalData("text", tokens[:, :40], tokens[:, 40:], "t")
    quant = {"mode": "kivi", "group": 8, "residual": 8, "prefill": "full"}
    worker = KVWorker(f"hf:{path}", {"calib": data}, quant, batch_size=4)
    mixed = ["K8V4", "KV2", "K4V2"]
    cfg = KVQuantConfig(tuple(mixed), **quant)
    shared = logprobs(worker.model, data, cache_factory(cfg, 3), 4, worker.prefilled("calib"))
    alone = logprobs(worker.model, data, cache_factory(cfg, 3), 4)
    assert torch.equal(shared, alone)
    probe = cache_factory(KVQuantConfig.uniform("KV2", 3, **quant), 3, "fake", only_layer=1)
    assert torch.equal(
        logprobs(worker.model, data, probe, 4, worker.prefilled("calib")), logprobs(worker.model, data, probe, 4)
    )
    m = worker.run({"op": "task", "map": ",".join(mixed), "data": "calib"})
    assert m["per_example"] == task_metric(worker.model, data, cfg, 3, 4).per_example
    assert not torch.equal(shared, worker.ref("calib"))  # the map is on the path
    old = KVWorker(f"hf:{path}", {"calib": data}, {**quant, "prefill": "quantized"}, batch_size=4)
    assert old.prefilled("calib") is None  # the quantized regime prefills through each map's cache
