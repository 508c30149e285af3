"""KV caches: every one implements the protocol of workers.caches.protocol, and `CACHES` names them.

| name     | class                      | what it holds                                                  |
| -------- | -------------------------- | -------------------------------------------------------------- |
| full     | protocol.DynamicCache      | every token in full precision (the reference)                  |
| fake     | quantized.FakeQuantCache   | KVTuner's quantized values, stored dequantized (the search)    |
| packed   | quantized.PackedKVCache    | KVTuner's int32 codes + scales, the same numerics (serving)    |
| evicting | evicting.EvictingCache     | PrefixKV's per-layer token budgets, scored by `scoring`        |
| composed | composed.ComposedCache     | eviction, then quantization of what is kept (serving)          |

Each class's constructor takes its own typed settings (a precision map, budgets, a spec); the
registry names the classes for configs and command lines. How an evicting cache ranks tokens is
a scorer, registered the same way in workers.caches.scorers.
"""

from workers.caches.registry import Registry

CACHES = Registry(__name__, "cache")
