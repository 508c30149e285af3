"""Joining Ray the same way everywhere: a cluster when RAY_ADDRESS is set, else in-process on loopback.

Loopback (issue 17 item 5, docs/RELIABILITY.md): a local Ray binds every service it starts
(GCS, raylet, workers' and the driver's gRPC servers, dashboard head and agent, runtime-env
agent, log and autoscaler monitors) to the node IP. ``ray.init(_node_ip_address="127.0.0.1")``
does not give 127.0.0.1: Ray 2.60 passes it through ``services.resolve_ip_for_localhost``, which
swaps a loopback address for the machine's routable one, and the C++ servers then listen on
``::``. The one switch that keeps 127.0.0.1 is ``ray_constants.ENABLE_RAY_CLUSTER`` (environment
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``; on Linux it only decides whether
``services.get_node_ip_address`` answers 127.0.0.1): off, the node IP is loopback and the GCS,
raylet and every worker check it and bind 127.0.0.1 only, the agents too.
"""

from __future__ import annotations

import os

import ray
from ray._private import ray_constants

# Read by ray_constants when ray is imported: set for the processes Ray starts from this one.
LOOPBACK_ENV = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}


def init_ray(num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Start or join Ray. Never joins a stray ``ray start`` cluster unless RAY_ADDRESS says so.

    Started here (no RAY_ADDRESS), every Ray service listens on 127.0.0.1 only. A cluster the
    user asked for (RAY_ADDRESS) is joined as it is: its node IPs are its own.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"address": address, "log_to_driver": log_to_driver}
    if address == "local":
        os.environ.update(LOOPBACK_ENV)
        # ray is already imported (the constant was read then): the module attribute is what
        # services.get_node_ip_address consults at call time.
        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.update(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    ray.init(**kwargs)
