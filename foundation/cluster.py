"""dask.distributed for extraction and sweeps: local clusters closed to other processes, and a quick,
one-line failure for a scheduler that cannot be reached.

A cluster amflow starts talks TLS with a key pair made for it in memory (``Security.temporary()``): a
process without those credentials can neither connect nor run code on its workers. Its HTTP server
binds an ephemeral localhost port with no routes unless ``dashboard`` asks for the dashboard
(``127.0.0.1:8787``). An existing scheduler (``--scheduler``) is reached with dask's own security
configuration (``distributed.comm.tls.*``, e.g. ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``), see README.
"""

from __future__ import annotations

import socket
from typing import Any

DASHBOARD_ADDRESS = "127.0.0.1:8787"
CONNECT_SECONDS = 5.0


def local_cluster(workers: int, *, dashboard: bool = False, **kwargs: Any):
    """A ``LocalCluster`` of ``workers`` one-thread processes on TLS with temporary credentials."""
    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    if workers < 1:
        raise ValueError(f"--workers: expected >= 1 worker process, got {workers}")
    routes: dict[str, Any] = {}
    if not dashboard:
        routes = {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}
    with dask.config.set(routes):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            protocol="tls://",
            security=Security.temporary(),
            dashboard_address=DASHBOARD_ADDRESS if dashboard else None,
            scheduler_kwargs=None if dashboard else {"dashboard_address": "127.0.0.1:0"},
            **kwargs,
        )


def check_reachable(address: str, timeout: float = CONNECT_SECONDS) -> None:
    """Refuses (ValueError, one line) a scheduler address nothing listens on, within ``timeout`` seconds."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--scheduler {address}: expected tcp://HOST:PORT or tls://HOST:PORT ({e})") from e
    if scheme not in ("tcp", "tls"):
        raise ValueError(f"--scheduler {address}: protocol {scheme!r}; expected tcp:// or tls://")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ValueError(f"--scheduler {address}: cannot connect ({why}); is the scheduler running?") from e


def connect(address: str, timeout: float = CONNECT_SECONDS):
    """A ``Client`` of the scheduler at ``address`` (security from dask's configuration) or a ValueError."""
    from distributed import Client

    check_reachable(address, timeout)
    try:
        return Client(address, timeout=max(timeout, 10.0))
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        raise ValueError(
            f"--scheduler {address}: connection failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "for a tls:// scheduler set dask's distributed.comm.tls.* configuration (see README)"
        ) from e


def client_for(workers: int, scheduler: str | None, *, dashboard: bool = False, **cluster_kwargs: Any):
    """(client, cluster or None): the scheduler at ``scheduler``, or a new secured local cluster."""
    from distributed import Client

    if scheduler:
        return connect(scheduler), None
    cluster = local_cluster(workers, dashboard=dashboard, **cluster_kwargs)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise
