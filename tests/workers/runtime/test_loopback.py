"""Everything a local Ray starts listens on loopback only (issue 17 item 5, docs/RELIABILITY.md)."""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

# Listeners beyond loopback that Ray gives no choice about: process-name prefix -> why. With
# workers.runtime.cluster.init_ray every Ray 2.60 core service binds the node IP, 127.0.0.1; the
# exception is Ray Serve's replicas, which start an inter-deployment gRPC server on "[::]:0"
# unconditionally (ray/serve/_private/replica.py: add_port_to_grpc_server(self._server, "[::]:0");
# no option or environment variable names the host). docs/RELIABILITY.md lists the same (and what
# is outside Ray: torch.distributed's store).
ALLOWED_BEYOND_LOOPBACK: dict[str, str] = {
    "ray::ServeReplica:": "Serve 2.60 binds each replica's inter-deployment gRPC server to [::]:0",
}


def _allowed(name: str) -> bool:
    return any(name.startswith(prefix) for prefix in ALLOWED_BEYOND_LOOPBACK)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:  # ::ffff:127.0.0.1 (a dual-stack socket)
        addr = addr.ipv4_mapped
    return addr.is_loopback


def ray_listeners() -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, process name) of every listening TCP socket of this driver and the processes
    it started: the GCS, raylet, dashboard and agents, monitors and every worker (the raylet's
    children)."""
    me = psutil.Process()
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.NoSuchProcess:
                continue
            out.append((c.laddr.ip, c.laddr.port, c.pid, name))
    return out


def test_local_ray_listens_on_loopback_only(ray_local):
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("a cluster the user asked for keeps its own addresses")

    @ray_local.remote(num_cpus=0.1)
    class Probe:  # a worker process of its own: its core worker runs a gRPC server
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    pid = ray_local.get(probe.pid.remote(), timeout=120)
    found = ray_listeners()
    names = {name for _, _, _, name in found}
    # The listing has to see Ray's own servers, else an empty list would pass.
    assert {"gcs_server", "raylet"} <= names and pid in {p for _, _, p, _ in found}, found
    exposed = [x for x in found if not _loopback(x[0]) and not _allowed(x[3])]
    assert not exposed, f"listening beyond loopback (ip, port, pid, process): {exposed}"
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    ray_local.kill(probe)


def test_a_cluster_given_by_ray_address_is_joined_as_it_is(monkeypatch):
    """RAY_ADDRESS: no loopback switch, no local-only options; the cluster's addresses are its own."""
    from ray._private import ray_constants

    from workers.runtime import cluster

    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.delenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: calls.append(kw))
    cluster.init_ray(num_cpus=2)
    assert calls == [{"address": "ray://head:10001", "log_to_driver": True}]
    assert ray_constants.ENABLE_RAY_CLUSTER is True and ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR not in os.environ


def test_loopback_addresses():
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("::ffff:127.0.0.1")
    assert not any(map(_loopback, ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2")))
