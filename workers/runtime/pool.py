"""One Ray actor pool: n actors of one class; a dead actor is replaced and its work repeated.

Two ways to use it:
- `map(fn, items)`: interchangeable actors; each item runs on whichever actor is idle
  (`ray.util.ActorPool` schedules it) and the results come back in item order;
- `each(fn)`: one call per actor, for actors that hold state of their own (a data shard);
  results in actor order.

An actor Ray reports dead (killed, out of memory, node lost) is replaced in its slot by
`spawn(slot)`, brought up to date by `on_replace(slot, actor)` where the actor holds state,
and the lost call is made again, so a caller sees the results of a run where nothing died.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
from ray.actor import ActorClass, ActorHandle
from ray.exceptions import ActorDiedError
from ray.util import ActorPool as RayActorPool

log = logging.getLogger(__name__)
# Calls of one item (or one actor's share) before its failures are blamed on the work, not the actor.
ATTEMPTS = 3


class ActorPool:
    """`n_actors` actors made by `spawn(slot)`; `actors[slot]` is the live one of each slot."""

    def __init__(
        self,
        spawn: Callable[[int], ActorHandle],
        n_actors: int,
        *,
        on_replace: Callable[[int, ActorHandle], None] | None = None,
    ):
        if n_actors < 1:
            raise ValueError(f"n_actors must be >= 1, got {n_actors!r}")
        self._spawn, self._on_replace = spawn, on_replace
        self.actors = [spawn(slot) for slot in range(n_actors)]
        self.replacements = 0

    @classmethod
    def of(cls, actor_cls: type | ActorClass, args: tuple, n_actors: int, **options) -> ActorPool:
        """Actors of `actor_cls(*args)` (a plain class or a `ray.remote` one) with Ray `options`.

        Large args (data sets, models) go through the object store once, not once per actor.
        """
        remote = actor_cls if isinstance(actor_cls, ActorClass) else ray.remote(actor_cls)
        refs = tuple(a if a is None or isinstance(a, str | int | float) else ray.put(a) for a in args)
        return cls(lambda _: remote.options(**options).remote(*refs), n_actors)

    def __len__(self) -> int:
        return len(self.actors)

    def map(self, fn: Callable[[ActorHandle, Any], ray.ObjectRef], items: Iterable) -> Iterator:
        """Yields the result of `fn(actor, item)` for every item, in item order, as each is ready."""
        items = list(items)
        pool = RayActorPool(self.actors)
        sent: list[tuple[int, ActorHandle]] = []  # (item, actor) per dispatch: ray returns in dispatch order
        tries = [0] * len(items)

        def dispatch(actor: ActorHandle, i: int) -> ray.ObjectRef:
            ref = fn(actor, items[i])
            sent.append((i, actor))
            return ref

        for i in range(len(items)):
            pool.submit(dispatch, i)
        ready: dict[int, Any] = {}
        n_returned = n_yielded = 0
        while pool.has_next():
            i, actor = sent[n_returned]
            n_returned += 1
            try:
                ready[i] = pool.get_next()
            except ActorDiedError:
                tries[i] += 1
                if tries[i] == ATTEMPTS:
                    raise
                pool.push(self._replace(self.actors.index(actor)))
                pool.submit(dispatch, i)
            while n_yielded in ready:
                yield ready.pop(n_yielded)
                n_yielded += 1

    def each(self, fn: Callable[[ActorHandle, int], ray.ObjectRef], n: int | None = None, *, repeat: bool = True):
        """Results of `fn(actor, slot)` on the first `n` actors (default all), in slot order.

        A dead actor's call is made again on its replacement; with `repeat=False` it is not (its
        result is None): for calls whose effect `on_replace` already gave the replacement.
        """
        slots = range(len(self.actors) if n is None else n)
        refs = [fn(self.actors[s], s) for s in slots]
        out = []
        for slot, ref in zip(slots, refs):
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    out.append(ray.get(ref))
                    break
                except ActorDiedError:
                    if attempt == ATTEMPTS:
                        raise
                    self._replace(slot)
                    if not repeat:
                        out.append(None)
                        break
                    ref = fn(self.actors[slot], slot)
        return out

    def _replace(self, slot: int) -> ActorHandle:
        log.warning("actor %d died; replacing it and repeating its work", slot)
        self.replacements += 1
        self.actors[slot] = self._spawn(slot)
        if self._on_replace is not None:
            self._on_replace(slot, self.actors[slot])
        return self.actors[slot]

    def close(self) -> None:
        """Kill the actors (frees their CPUs); safe to call twice."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
