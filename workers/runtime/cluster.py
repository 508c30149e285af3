"""Joining Ray the same way everywhere: a cluster when RAY_ADDRESS is set, else in-process."""

from __future__ import annotations

import os

import ray


def init_ray(num_cpus: int | None = None) -> None:
    """Start or join Ray. Never joins a stray ``ray start`` cluster unless RAY_ADDRESS says so."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"address": address, "log_to_driver": True}
    if address == "local":
        kwargs.update(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    ray.init(**kwargs)
