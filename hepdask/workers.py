"""What hepdask sets up on every Dask worker of a build: Dask worker plugins.

A build registers them on its Client (``hepdask.cluster.setup_workers``), so workers that
join or restart later get them too. They live apart from ``hepdask.cluster`` because they
subclass Dask's ``WorkerPlugin``: importing them imports distributed, which a build that runs
inline in this process (``hepdask.cluster.InlineClient``) never needs.

``TunedMalloc`` and ``QuietUserErrors`` are ``idempotent``: a later build on the same
cluster finds them registered and does not send them to every worker again (a scheduler
round trip and a setup per worker, ~7 ms each). ``FrozenImports`` is sent by every build:
it carries the building client's process, which it must leave alone.
"""

from __future__ import annotations

import logging
import os
import re
import socket

from distributed.diagnostics.plugin import WorkerPlugin

from . import heap, malloc
from .errors import FULL_DISK_ERRNOS, error_classes


class TunedMalloc(WorkerPlugin):
    """Applies ``hepdask.malloc.tune`` on every worker, including workers that join or
    restart later (config ``cluster.tune_malloc``)."""

    name = "hepdask-tuned-malloc"
    idempotent = True

    def setup(self, worker) -> None:
        malloc.tune()


class FrozenImports(WorkerPlugin):
    """Imports the build stack on every worker process with the garbage collector paused and
    freezes it, and freezes once more when the process's first task has finished
    (``hepdask.heap``; config ``cluster.tune_gc``). A worker thread inside the client's own
    process is left alone: its heap is the user's."""

    name = "hepdask-frozen-imports"

    def __init__(self) -> None:
        self.client_process = (socket.gethostname(), os.getpid())
        self.active = False

    def setup(self, worker) -> None:
        self.active = (socket.gethostname(), os.getpid()) != self.client_process
        if self.active and not heap.frozen(heap.BUILD_STACK):
            heap.import_frozen(heap.BUILD_STACK)

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        if self.active and finish == "memory":
            heap.settle()


class QuietUserErrors(WorkerPlugin):
    """Keeps a worker from logging "Compute Failed" with a traceback for a task that raised a
    hepdask error (a bad file, a det_id mismatch): the build reports those in one line on the
    client, and seven lines of worker log per failed task before it buried that line. Any
    other exception, a bug, is still logged in full. Also quiet, when a build stops (Ctrl-C,
    or another task's error): the warning for each task cancelled, and the error with a
    40-line traceback for a heartbeat that the closing worker cut off itself (its connection
    pool closing: dask/distributed#7192)."""

    name = "hepdask-quiet-user-errors"
    idempotent = True

    def setup(self, worker) -> None:
        for name in ("distributed.worker", "distributed.worker.state_machine"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _UserErrorFilter) for f in logger.filters):
                logger.addFilter(_UserErrorFilter())


def dask_setup(worker) -> None:
    """Dask's preload hook. The LocalCluster a build starts names this module as its workers'
    preload (``cluster._start_local``), so that a Ctrl-C right after the start, before the
    build's plugins have reached the workers, finds them quiet already."""
    QuietUserErrors().setup(worker)


class _UserErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True
        if record.msg.startswith("Async instruction for") and "ended with CancelledError" in record.getMessage():
            return False
        if record.msg.startswith("Failed to communicate with scheduler during heartbeat"):
            return not _closing_pool(record.exc_info)
        if not record.msg.startswith("Compute Failed"):
            return True
        # distributed's worker logs (key, state, task, exception_text, traceback_text).
        args = record.args if isinstance(record.args, tuple) else ()
        exception = args[3] if len(args) > 3 and isinstance(args[3], str) else ""
        return exception.split("(", 1)[0] not in error_classes() and not _FULL_DISK.match(exception)


def _closing_pool(exc_info) -> bool:
    """Whether a logged exception is the worker's own connection pool closing."""
    err = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None
    return type(err).__name__ == "CommClosedError" and str(err).startswith(CLOSING_POOL)


#: What distributed's connection pool raises once its worker has begun to close.
CLOSING_POOL = "ConnectionPool closing"


#: A write refused by a full or read-only file system (``errors.FULL_DISK_ERRNOS``), as
#: distributed logs it (``repr`` of the exception): the client names where, in one line.
_FULL_DISK = re.compile(rf"^\w*Error\(({'|'.join(map(str, sorted(FULL_DISK_ERRNOS)))}),")
