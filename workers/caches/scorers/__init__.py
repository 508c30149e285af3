"""Eviction scorers: how an evicting cache ranks the tokens it holds, one small class a file.

    from workers.caches import scorers
    scorers.get("window")                     # the registered class, WindowScorer
    scorers.get("window").uses_attention      # True: scored by the attention a key receives
    scorers.names(attention=True)             # ("sum", "window"): what PrefixKV can calibrate

A scorer module holds one class, decorated with ``@register``, with a ``name`` (the
``ScoreConfig.mode`` that selects it), a docstring naming its paper, and one method: an
`AttentionScorer` (workers.caches.scorers.base) implements ``received`` (the attention each key
receives from this forward's queries), a `PositionScorer` implements ``static`` (a score fixed
when the token enters). The registry imports every module of this package before it answers a
name it does not know, so a new file here is all a new scorer takes.

Plug-ins outside the tree: a directory appended to ``__path__``, or listed in $CALIBRAY_SCORERS
(``os.pathsep``-separated), is searched the same way. Ray actors are separate processes:
start them with ``runtime_env=scorers.runtime_env()`` so they search the same directories.
"""

from __future__ import annotations

import os

from workers.caches.registry import Registry

PLUGIN_ENV = "CALIBRAY_SCORERS"
_HOME = os.path.dirname(os.path.abspath(__file__))

__path__.extend(d for d in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if d and d not in __path__)


def _check(cls: type) -> None:
    # Duck-typed: importing base.py here would close an import cycle (base -> scoring -> scorers).
    method = "received" if getattr(cls, "uses_attention", None) else "static"
    if not isinstance(getattr(cls, "uses_attention", None), bool) or not callable(getattr(cls, method, None)):
        raise ValueError(
            f"scorer {cls.__qualname__} must subclass AttentionScorer or PositionScorer (workers.caches.scorers.base)"
        )


SCORERS = Registry(__name__, "scorer", check=_check)
register = SCORERS.register
get = SCORERS.get


def names(attention: bool | None = None) -> tuple[str, ...]:
    """Registered scorer names, sorted; `attention` True/False keeps only attention- or position-based ones."""
    return tuple(n for n in SCORERS.names() if attention is None or SCORERS.get(n).uses_attention == attention)


def runtime_env() -> dict | None:
    """A Ray runtime_env giving an actor this process's plug-in directories (None when there are none)."""
    extra = [d for d in __path__ if os.path.abspath(d) != _HOME]
    return {"env_vars": {PLUGIN_ENV: os.pathsep.join(extra)}} if extra else None
