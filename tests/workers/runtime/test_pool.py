"""The one actor pool: a killed actor is replaced and the results do not change (real Ray)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from tests.workers.runtime.pool_actors import Scale, Shard
from workers.runtime.pool import ATTEMPTS, ActorPool

WEIGHTS = np.linspace(0.5, 2.0, 12)


def _scale_pool() -> ActorPool:
    return ActorPool.of(Scale, (WEIGHTS,), 2, num_cpus=0.25)


def _run(actor, i):
    return actor.run.remote(i)


def test_map_replaces_a_killed_actor_and_returns_the_same_results(ray_local):
    pool = _scale_pool()
    clean = list(pool.map(_run, range(12)))
    assert clean == [float(w * i) for i, w in enumerate(WEIGHTS)] and pool.replacements == 0

    victim, killed = pool.actors[0], []
    for r in pool.map(_run, range(12)):
        killed.append(r)
        if len(killed) == 1:  # every actor holds an item while items remain: the kill lands mid-map
            ray.kill(victim, no_restart=True)
    assert killed == clean
    assert pool.replacements == 1 and pool.actors[0] != victim
    pool.close()
    pool.close()  # idempotent: IndexCache's report frees the actors before the driver's finally does


def test_map_gives_up_on_work_that_kills_every_actor(ray_local):
    pool = _scale_pool()
    with pytest.raises(ActorDiedError):
        list(pool.map(lambda actor, x: actor.die.remote(x), [0]))
    assert pool.replacements == ATTEMPTS - 1
    pool.close()


def _kill(actor) -> None:
    """Kill an actor and wait until it is dead: ray.kill is asynchronous, and a call made right after
    it could still be answered (then no replacement happens and the test would count one too few)."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=10)
        except (RayActorError, GetTimeoutError):
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor kept answering for 60 s")


def _shard_steps(kill: dict[int, str]) -> tuple[list[list[float]], int]:
    """Per step: every shard's total, then commit offset + 1; `kill` {step: "total" | "shift"} kills actor 1 first."""
    committed = {"offset": 0.0}
    shards = [[1.0, 2.0], [3.0, 4.0, 5.0]]
    shard = ray.remote(Shard).options(num_cpus=0.25)
    pool = ActorPool(
        lambda s: shard.remote(shards[s]),
        2,
        on_replace=lambda s, actor: ray.get(actor.set.remote(committed["offset"])),
    )
    totals = []
    for step in range(3):
        if kill.get(step) == "total":
            _kill(pool.actors[1])
        totals.append(pool.each(lambda actor, s: actor.total.remote()))
        committed["offset"] += 1.0
        if kill.get(step) == "shift":
            _kill(pool.actors[1])
        # the replacement is set to the committed offset already: shifting it again would double count
        pool.each(lambda actor, s: actor.shift.remote(1.0), repeat=False)
    assert pool.each(lambda actor, s: actor.total.remote(), 1) == [totals[-1][0] + 2.0]  # first n actors only
    n = pool.replacements
    pool.close()
    return totals, n


def test_each_replaces_a_killed_stateful_actor_and_returns_the_same_results(ray_local):
    clean, n_clean = _shard_steps({})
    assert clean == [[3.0, 12.0], [5.0, 15.0], [7.0, 18.0]] and n_clean == 0
    assert _shard_steps({0: "shift", 2: "total"}) == (clean, 2)


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="n_actors must be >= 1, got 0"):
        ActorPool(lambda s: None, 0)
