"""Ray actor pools."""

from __future__ import annotations


class WorkerPool:
    """n Ray actors of `actor_cls(*init_args)`, each loaded once; `map(items)` splits items round-robin.

    Large init args (data sets) go through the object store once. `close()` frees the CPUs
    (the driver closes the pool while Tune's trial actors run).
    """

    def __init__(self, actor_cls, init_args: tuple, n_actors: int, num_cpus: float):
        import ray

        remote = ray.remote(num_cpus=num_cpus)(actor_cls)
        refs = tuple(ray.put(a) if not isinstance(a, str | int | float) else a for a in init_args)
        self.actors = [remote.remote(*refs) for _ in range(max(1, n_actors))]

    def map(self, items: list) -> list:
        """Results of `run` in the order of `items`."""
        import ray

        n = len(self.actors)
        parts = ray.get([a.run.remote(items[i::n]) for i, a in enumerate(self.actors) if items[i::n]])
        out = [None] * len(items)
        for i, part in enumerate(parts):
            for j, r in enumerate(part):
                out[i + j * n] = r
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
