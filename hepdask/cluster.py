"""Turn the config's ``cluster:`` section into a Dask Client.

``kind: local`` (the default) starts a LocalCluster with one single-threaded worker process
per core, scheduler and dashboard on 127.0.0.1; ``kind: address`` connects to a running
scheduler. Worker processes get ``NUMBA_NUM_THREADS`` equal to their thread count so the
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


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def connect(spec: Cluster) -> Iterator:
    """Yield a connected ``distributed.Client`` for *spec*; close what was started."""
    from distributed import Client, LocalCluster

    if spec.kind == "address":
        try:
            client = Client(spec.address, timeout="30s")
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
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {
        **dask.config.get("distributed.nanny.pre-spawn-environ", {}), **environ,
    }}):
        try:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=spec.threads_per_worker,
                processes=True,
                host="127.0.0.1",
                dashboard_address=spec.dashboard_address,
                memory_limit=spec.memory_limit,
            )
        except (OSError, TimeoutError, ValueError) as err:
            msg = f"cannot start a LocalCluster of {workers} workers: {err}"
            raise ClusterError(msg) from None
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def dashboard_link(client) -> str | None:
    try:
        return client.dashboard_link
    except (AttributeError, KeyError):
        return None
