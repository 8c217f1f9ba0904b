"""Turn the config's ``cluster:`` section into a Dask Client.

``kind: local`` (the default) starts a LocalCluster with one single-threaded worker process
per core, scheduler and dashboard on 127.0.0.1; ``kind: address`` connects to a running
scheduler. The local scheduler queues tasks itself (``worker-saturation: 1.0``), so a
worker that dies takes only its running task's retry count with it. Worker processes get ``NUMBA_NUM_THREADS`` equal to their thread count so the
binning kernels do not oversubscribe the cores that Dask already fills.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask

from .config import Cluster
from .errors import ClusterError

log = logging.getLogger(__name__)

WORKER_SATURATION = 1.0


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def connect(spec: Cluster) -> Iterator:
    """Yield a connected ``distributed.Client`` for *spec*; close what was started."""
    from distributed import Client, LocalCluster

    security = _security(spec)
    if spec.kind == "address":
        try:
            client = Client(spec.address, timeout="30s", security=security)
        except (OSError, TimeoutError) as err:
            msg = f"cannot reach the Dask scheduler at cluster.address={spec.address!r}: {err}"
            raise ClusterError(msg) from None
        try:
            yield client
        finally:
            client.close()
        return

    logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().level))
    workers = spec.workers or default_workers()
    environ = {"NUMBA_NUM_THREADS": str(spec.threads_per_worker)}
    settings = {
        "distributed.nanny.pre-spawn-environ": {
            **dask.config.get("distributed.nanny.pre-spawn-environ", {}), **environ,
        },
        # A worker holds only the task it runs: when a worker dies, only that task is
        # suspected, so a file that kills workers cannot get innocent files marked bad.
        "distributed.scheduler.worker-saturation": WORKER_SATURATION,
    }
    with dask.config.set(settings):
        try:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=spec.threads_per_worker,
                processes=True,
                host="127.0.0.1",
                dashboard_address=spec.dashboard_address,
                memory_limit=spec.memory_limit,
                **({"security": security, "protocol": "tls://"} if security is not None else {}),
            )
        except (OSError, TimeoutError, ValueError) as err:
            msg = f"cannot start a LocalCluster of {workers} workers: {err}"
            raise ClusterError(msg) from None
    try:
        with Client(cluster, security=security) as client:
            yield client
    finally:
        cluster.close()


def _security(spec: Cluster):
    """Dask's ``Security`` for ``cluster.tls``: a temporary self-signed one, or the given files."""
    if spec.tls is None:
        return None
    from distributed.security import Security

    if spec.tls.temporary:
        if spec.kind != "local":
            msg = "cluster.tls.temporary only works for a LocalCluster; give ca_file, cert and key"
            raise ClusterError(msg)
        return Security.temporary()
    missing = [k for k in ("ca_file", "cert", "key") if getattr(spec.tls, k) is None]
    if missing:
        msg = f"cluster.tls needs {', '.join(missing)} (or temporary: true for a LocalCluster)"
        raise ClusterError(msg)
    return Security(
        tls_ca_file=spec.tls.ca_file, tls_client_cert=spec.tls.cert, tls_client_key=spec.tls.key,
        tls_scheduler_cert=spec.tls.cert, tls_scheduler_key=spec.tls.key,
        tls_worker_cert=spec.tls.cert, tls_worker_key=spec.tls.key, require_encryption=True,
    )


def dashboard_link(client) -> str | None:
    try:
        return client.dashboard_link
    except (AttributeError, KeyError):
        return None
