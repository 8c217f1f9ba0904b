"""Turn the config's ``cluster:`` section into a Dask Client.

``kind: local`` (the default) starts a LocalCluster with one single-threaded worker process
per core, scheduler and dashboard on 127.0.0.1; ``kind: slurm`` a dask-jobqueue SLURMCluster;
``kind: address`` connects to a running scheduler. A small local build (one partition, a few
small files, or ``processes: false``) runs its tasks inside this process instead: starting
worker processes (or the dashboard) costs more than such a build. Without a dashboard (the
default there) or a performance report to feed, it runs them one after another in the
calling thread (:class:`InlineClient`), without a scheduler and without importing
distributed; with one, on one worker thread of an in-process LocalCluster. Dask and
distributed are imported only where a real Client is made. The schedulers hepdask starts queue tasks
themselves (``worker-saturation: 1.0``), so a worker that dies takes only its running task's
retry count with it. Worker processes get ``NUMBA_NUM_THREADS`` equal to their thread count,
so the binning kernels do not oversubscribe the cores that Dask already fills.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

from . import heap, malloc
from .config import Cluster
from .errors import ClusterError

log = logging.getLogger(__name__)

#: For every scheduler hepdask starts (local or SLURM): a worker holds only the task it
#: runs, so when a worker dies only that task is suspected, and a file that kills workers
#: cannot get innocent files marked bad.
SCHEDULER_SETTINGS = {"distributed.scheduler.worker-saturation": 1.0}


#: What a real Dask Client needs imported (an inline build never imports it).
DASK_STACK = ("distributed",)


#: The worker plugins' names here before they moved to ``hepdask.workers``.
_MOVED_TO_WORKERS = frozenset({"TunedMalloc", "FrozenImports", "QuietUserErrors"})


def __getattr__(name: str):
    if name in _MOVED_TO_WORKERS:
        from . import workers

        return getattr(workers, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def connect(spec: Cluster, *, say: Callable[[str], None] = log.info,
            log_directory: str | Path | None = None, in_process: bool = False) -> Iterator:
    """Yield a connected ``distributed.Client`` for *spec*; close what was started.

    *in_process* (``kind: local`` only) runs the tasks in this process: in the calling
    thread (an :class:`InlineClient`) unless a dashboard, a performance report or TLS asks
    for a Dask scheduler, else on one single-threaded worker of an in-process LocalCluster.

    For SLURM, the worker job is checked with ``sbatch --test-only`` first, then the cluster
    scales adaptively and the build waits (saying why) for ``minimum_jobs`` jobs' workers.
    """
    if in_process and spec.kind == "local" and inline_enough(spec):
        yield InlineClient()
        return
    if spec.tune_gc and heap.imports_frozen() and not all(m in sys.modules for m in DASK_STACK):
        # A process that froze the build stack's imports (the console script) freezes
        # Dask's client side with them; a user's own heap is left alone.
        heap.import_frozen(DASK_STACK)
    import dask
    from distributed import Client

    if spec.kind == "slurm":
        with _slurm_client(spec, say, log_directory) as client:
            yield client
        return
    security = _security(spec)
    if spec.kind == "address":
        _refuse_a_refused_address(spec.address)
        try:
            client = Client(spec.address, timeout=CONNECT_TIMEOUT, security=security)
        except (OSError, TimeoutError) as err:
            msg = f"cannot reach the Dask scheduler at cluster.address={spec.address!r}: {err}"
            raise ClusterError(msg) from None
        try:
            yield client
        finally:
            client.close()
        return

    if in_process:
        # Without a dashboard nobody sees the worker's statistical profile, and its sampling
        # thread takes the GIL from the task every 10 ms (0.14 s of a 0.9 s one-file build).
        quiet = {} if spec.dashboard(in_process=True) else {"distributed.worker.profile.enabled": False}
        local = _local_cluster(spec, security, {**SCHEDULER_SETTINGS, **quiet}, {}, n_workers=1,
                               threads_per_worker=1, processes=False)
    else:
        environ = {"NUMBA_NUM_THREADS": str(spec.threads_per_worker)}
        settings = {
            "distributed.nanny.pre-spawn-environ": {
                **dask.config.get("distributed.nanny.pre-spawn-environ", {}), **environ,
            },
            **SCHEDULER_SETTINGS,
        }
        # distributed's Nanny applies pre-spawn-environ with os.environ.update in *this*
        # process (distributed 2026.8, nanny.py); left there, NUMBA_NUM_THREADS=1 makes the
        # client's next numba compilation fail once numba's threads run, and OMP_NUM_THREADS=1
        # and the like make a notebook's later work single-threaded. So every value the Nanny
        # sets comes back.
        names = [*settings["distributed.nanny.pre-spawn-environ"], *NANNY_ENVIRON]
        previous = {name: os.environ.get(name) for name in names}
        local = _local_cluster(spec, security, settings, previous, n_workers=spec.workers or default_workers(),
                               threads_per_worker=spec.threads_per_worker, processes=True)
    with local as cluster, Client(cluster, security=security) as client:
        yield client


#: What distributed's Nanny puts into the starting process's environment besides
#: pre-spawn-environ (distributed 2026.8, nanny.py).
NANNY_ENVIRON = ("PYTHONHASHSEED", "__DASK_PARENT_PID")


def inline_enough(spec: Cluster) -> bool:
    """Whether an in-process build of *spec* can run inline: nothing asks for a scheduler
    (a dashboard, a performance report, TLS between scheduler and worker)."""
    return spec.dashboard(in_process=True) is None and not spec.performance_report and spec.tls is None


class InlineFuture:
    """A task of an :class:`InlineClient`: run in the calling thread the first time anyone
    waits for it; its ``status`` is then ``finished`` or ``error`` (or ``cancelled``)."""

    def __init__(self, key: str, function: Callable, args: tuple, kwargs: dict) -> None:
        self.key = key
        self.status = "pending"
        self._call: tuple | None = (function, args, kwargs)
        self._value = None

    def run(self) -> InlineFuture:
        """Run the task unless it ran (or was cancelled); Ctrl-C or an exit while it runs
        propagates and leaves it cancelled."""
        if self.status != "pending":
            return self
        function, args, kwargs = self._call
        try:
            value = function(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a task's error is its future's, as on a Dask worker
            self._value, self.status = err, "error"
        except BaseException:
            self.status = "cancelled"
            raise
        else:
            self._value, self.status = value, "finished"
        finally:
            self._call = None
        return self

    def result(self):
        if self.run().status == "error":
            raise self._value
        if self.status == "cancelled":
            msg = f"task {self.key!r} was cancelled"
            raise ClusterError(msg)
        return self._value

    def exception(self) -> BaseException | None:
        return self._value if self.run().status == "error" else None

    def cancel(self) -> None:
        if self.status == "pending":
            self.status, self._call = "cancelled", None


class InlineCompleted:
    """``distributed.as_completed`` for inline futures: each runs when its turn comes, in
    submission order; ``add`` appends one. Cancelled futures are passed over."""

    def __init__(self, futures: Iterable[InlineFuture], with_results: bool) -> None:
        self._todo = deque(futures)
        self.with_results = with_results

    def add(self, future: InlineFuture) -> None:
        self._todo.append(future)

    def __iter__(self) -> InlineCompleted:
        return self

    def __next__(self):
        while self._todo:
            future = self._todo.popleft().run()
            if future.status == "cancelled":
                continue
            if not self.with_results:
                return future
            err = future.exception()
            return future, ((type(err), err, err.__traceback__) if err is not None else future.result())
        raise StopIteration


#: ``distributed.Client.submit``'s own keyword arguments (not the task's).
_SUBMIT_OPTIONS = frozenset({"workers", "resources", "retries", "priority", "fifo_timeout", "allow_other_workers",
                             "actor", "actors", "pure"})


class InlineClient:
    """The part of ``distributed.Client`` a build uses, for a small build in this process:
    tasks run one after another in the calling thread when they are waited for
    (:func:`as_completed`), as they would on the in-process LocalCluster's one worker
    thread, but without its scheduler, worker and event loop, and without importing Dask:
    a one-file KM3NeT build's whole process took 0.86-1.02 s, of which importing
    distributed took ~0.13 s and the cluster's start, tasks and close ~0.05 s."""

    dashboard_link = None

    def submit(self, function: Callable, *args, key: str, **kwargs) -> InlineFuture:
        """``function(*args, **kwargs)`` as task *key*; Dask's scheduling options (retries,
        priority, ...) mean nothing here and are not passed on."""
        task_kwargs = {k: v for k, v in kwargs.items() if k not in _SUBMIT_OPTIONS}
        return InlineFuture(key, function, args, task_kwargs)

    def nthreads(self) -> dict[str, int]:
        return {"inline": 1}

    def cancel(self, futures: Iterable[InlineFuture]) -> None:
        for future in futures:
            future.cancel()

    def gather(self, futures: Iterable[InlineFuture]) -> list:
        return [future.result() for future in futures]

    def as_current(self):
        return nullcontext(self)


def as_completed(client, futures, *, with_results: bool = False):
    """*client*'s futures as they complete (with their results: ``(future, result)``, where
    a failed task's result is its ``(type, exception, traceback)``).

    Dask's ``as_completed`` gets *client*'s event loop: left to itself it takes the loop of
    Dask's default client, which need not be *client* and may be closed; it then never wakes
    up (a SLURM build after a local one hung so, distributed 2026.8).
    """
    if isinstance(client, InlineClient):
        return InlineCompleted(futures, with_results)
    from distributed import as_completed as completed

    if with_results:
        return completed(futures, loop=client.loop, with_results=True, raise_errors=False)
    return completed(futures, loop=client.loop)


def killed_worker(err: BaseException) -> bool:
    """Whether *err* is Dask's KilledWorker (a task whose every worker died running it)."""
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(err, distributed.KilledWorker)


def setup_workers(client, spec: Cluster) -> None:
    """What every worker of a build gets (``hepdask.workers``): the tuned malloc and the
    frozen imports where the config asks for them, and quiet logs for hepdask's own errors.
    An inline build's worker is this process: only its malloc is tuned."""
    if isinstance(client, InlineClient):
        if spec.tune_malloc:
            malloc.tune()
        return
    from . import workers

    if spec.tune_malloc:
        client.register_plugin(workers.TunedMalloc())
    if spec.tune_gc:
        client.register_plugin(workers.FrozenImports())
    client.register_plugin(workers.QuietUserErrors())


def _start_local(spec: Cluster, security, *, n_workers: int, threads_per_worker: int, processes: bool):
    from distributed import LocalCluster

    # A worker in this process talks to the scheduler over inproc:// (no host, no port)
    # unless TLS is asked for.
    network = {"host": "127.0.0.1"} if processes or security is not None else {}
    try:
        with _sigint_deferred(processes) as interrupted, warnings.catch_warnings():
            # Another cluster on the dashboard's port: Dask takes a free port and warns in
            # three lines; the link printed next names the port it took.
            warnings.filterwarnings("ignore", message=PORT_IN_USE, category=UserWarning)
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                processes=processes,
                dashboard_address=spec.dashboard(in_process=not processes),
                memory_limit=spec.memory_limit,
                **({"preload": [WORKER_PRELOAD]} if processes else {}),
                **network,
                **({"security": security, "protocol": "tls://"} if security is not None else {}),
            )
    except (OSError, TimeoutError, ValueError, RuntimeError) as err:
        where = "worker processes" if processes else "worker in this process"
        msg = f"cannot start a LocalCluster of {n_workers} {where}: {err}"
        if processes and "Nanny failed to start" in str(err) and _users_script():
            msg += (" (a script that builds on worker processes starts the build under "
                    "'if __name__ == \"__main__\":', because each worker process imports the script again)")
        raise ClusterError(msg) from None
    if interrupted.is_set():
        cluster.close()
        raise KeyboardInterrupt
    return cluster


def _users_script() -> bool:
    """Whether this process runs a user's script: ``__main__`` is a file that is not the
    ``hepdask`` command, or this is a worker process that a script without a main guard
    spawned and that ran the script again."""
    import multiprocessing

    main = sys.modules.get("__main__")
    if multiprocessing.parent_process() is not None:
        return True
    command = sys.modules.get("hepdask.cli")
    if getattr(getattr(main, "__spec__", None), "name", None) == "hepdask.cli":
        return False
    # pip's console script does `from hepdask.cli import entry`; other wrappers may call main.
    ours = command is not None and any(getattr(main, name, None) is getattr(command, name) for name in ("entry", "main"))
    return bool(getattr(main, "__file__", None)) and not ours


@contextmanager
def _sigint_deferred(spawning: bool) -> Iterator[threading.Event]:
    """Start worker processes that never see SIGINT, and hold a Ctrl-C back until they run.

    Ctrl-C in a terminal reaches the whole process group, and each worker printed its own
    tracebacks (about 35 lines) before the build's one line; the client stops the build and
    closes the workers. SIGINT is blocked in this thread while the cluster starts: the
    threads made meanwhile (the cluster's event loop, the ones that spawn the workers) and
    the worker processes inherit the blocked signal. A Ctrl-C in that window sets the event
    this yields (the caller closes the new cluster and raises KeyboardInterrupt) instead of
    stopping the start half-way or being lost."""
    interrupted = threading.Event()
    if (not spawning or not hasattr(signal, "pthread_sigmask")
            or threading.current_thread() is not threading.main_thread()):
        yield interrupted
        return

    def record(signum, frame) -> None:
        interrupted.set()

    from multiprocessing import resource_tracker

    # Starting multiprocessing's resource tracker (once a process, on the first queue the
    # cluster makes) unblocks SIGINT in the thread that starts it: started here first.
    resource_tracker.ensure_running()
    previous = signal.signal(signal.SIGINT, record)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield interrupted
    finally:
        # Unblocked first, so that a SIGINT pending on this thread still reaches *record*.
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _local_cluster(spec: Cluster, security, settings: dict, restore: dict[str, str | None], **kwargs) -> Iterator:
    """A LocalCluster started under the Dask *settings*, closed at the end; the environment
    variables *restore* names get their values back after the start and after the close."""
    import dask

    with dask.config.set(settings), _restored_environ(restore):
        cluster = _start_local(spec, security, **kwargs)
    try:
        yield cluster
    except KeyboardInterrupt:
        _abandon_running_tasks(cluster)
        raise
    finally:
        with _restored_environ(restore):
            cluster.close()


def _abandon_running_tasks(cluster) -> None:
    """Ctrl-C: a task running on a worker thread of this process cannot be stopped, and
    closing its worker would wait up to 30 s for it. Staged partitions are published by an
    atomic rename, so the worker is closed without waiting; the thread ends with the process."""
    from distributed import Worker

    for worker in list(getattr(cluster, "workers", {}).values()):
        if isinstance(worker, Worker):
            try:
                cluster.sync(worker.close, executor_wait=False, timeout=ABANDON_TIMEOUT_SECONDS)
            except (OSError, TimeoutError, RuntimeError):
                log.debug("closing the in-process worker after Ctrl-C failed", exc_info=True)


@contextmanager
def _restored_environ(values: dict[str, str | None]):
    """Run the block, then put *values* back into os.environ (None: the name was unset)."""
    try:
        yield
    finally:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _slurm_client(spec: Cluster, say: Callable[[str], None], log_directory: str | Path | None) -> Iterator:
    made = log_directory is not None and not Path(log_directory).exists()
    try:
        with _slurm_cluster_client(spec, say, log_directory) as client:
            yield client
    except BaseException:
        # A build that failed before any job wrote a log (SLURM refused the jobs, none
        # started) leaves no empty log directory; a job writing its first log meanwhile keeps it.
        if made and Path(log_directory).is_dir() and not any(Path(log_directory).iterdir()):
            with suppress(OSError):
                Path(log_directory).rmdir()
        raise


@contextmanager
def _slurm_cluster_client(spec: Cluster, say: Callable[[str], None], log_directory: str | Path | None) -> Iterator:
    from distributed import Client

    cluster = slurm_cluster(spec, log_directory)
    try:
        check_submission(cluster.job_script())
        processes = cluster._dummy_job.worker_processes
        cluster.adapt(minimum_jobs=spec.minimum_jobs, maximum_jobs=spec.jobs)
        client = Client(cluster)
        try:
            say(f"SLURM: up to {spec.jobs} jobs of {processes} worker(s); dashboard {cluster.dashboard_link}")
            wait_for_workers(client, cluster, max(1, spec.minimum_jobs) * processes, spec.worker_timeout, say,
                             log_directory)  # fmt: skip
            yield client
        finally:
            client.close()
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


#: How long the client waits for a scheduler at ``cluster.address`` that does not answer.
CONNECT_TIMEOUT = "30s"
#: How long a ``cluster.address`` where nothing listens is tried (a scheduler started by the
#: same script may take a second or two to listen) before the build says so.
REFUSED_SECONDS = 5.0


def _refuse_a_refused_address(address: str) -> None:
    """Fail within REFUSED_SECONDS where nothing listens at a ``tcp://`` *address* (the host
    refuses): Dask's client retries for CONNECT_TIMEOUT first. A host that does not answer,
    and a ``tls://`` scheduler (a bare connection would be a failed handshake in its log), are
    left to Dask."""
    import socket

    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    protocol, location = parse_address(address)
    if protocol != "tcp":
        return
    host, port = parse_host_port(location)
    deadline = time.monotonic() + REFUSED_SECONDS
    while True:
        try:
            socket.create_connection((host, port), timeout=REFUSED_SECONDS).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                msg = (f"cannot reach the Dask scheduler at cluster.address={address!r}: nothing listens there "
                       f"(connection refused for {REFUSED_SECONDS:g} s); is the scheduler running, and is that "
                       f"its port?")
                raise ClusterError(msg) from None
            time.sleep(0.25)
        except OSError:
            return


def dashboard_link(client, spec: Cluster | None = None) -> str | None:
    """The dashboard's address. A scheduler in this process (``inproc://``) names the
    machine's network address in Dask's link, while its dashboard listens where *spec*'s
    ``dashboard_address`` says (127.0.0.1 by default): that host is put in the link. Give
    *spec* only for a cluster that ``connect`` started from it."""
    try:
        link = client.dashboard_link
    except (AttributeError, KeyError):
        return None
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    server = getattr(scheduler, "http_server", None)
    listen = spec.dashboard(in_process=True) if spec is not None else None
    if link and listen and server is not None and str(scheduler.address).startswith("inproc://"):
        host = listen.rpartition(":")[0]
        if host not in _ANY_HOST:  # listening everywhere: the machine's address is right
            return f"http://{host}:{server.port}/status"
    return link


#: Listen addresses that mean every interface.
_ANY_HOST = frozenset({"", "0.0.0.0", "::", "[::]"})


# --------------------------------------------------------------------------------------------
# SLURM through dask-jobqueue

#: Seconds between two looks at the queue while waiting for workers.
POLL_SECONDS = 2.0
#: Lines of a failed job's output shown to the user.
TAIL_LINES = 15


def load_profile(path: str | None) -> dict:
    """A dask-jobqueue profile (``jobqueue: slurm: {...}``) as SLURMCluster keyword arguments.

    Keys are dask-jobqueue's configuration keys (``job-extra-directives``); a null value
    leaves dask-jobqueue's own default (or the user's ~/.config/dask/jobqueue.yaml) in force.
    """
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        msg = f"cluster.profile {path!r} cannot be read: {err}"
        raise ClusterError(msg) from None
    except yaml.YAMLError as err:
        msg = f"cluster.profile {path!r} is not valid YAML: {err}"
        raise ClusterError(msg) from None
    section = (data or {}).get("jobqueue", {}).get("slurm") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        msg = f"cluster.profile {path!r} has no 'jobqueue: slurm:' section (dask-jobqueue's format)"
        raise ClusterError(msg)
    renamed = {"name": "job_name"}
    return {renamed.get(k, k.replace("-", "_")): v for k, v in section.items() if v is not None}


def slurm_cluster(spec: Cluster, log_directory: str | Path | None = None):
    """A SLURMCluster from the profile; nothing is submitted until it is scaled."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:
        msg = "cluster.kind slurm needs dask-jobqueue: pip install 'hepdask[slurm]'"
        raise ClusterError(msg) from err
    import dask

    kwargs = load_profile(spec.profile)
    if log_directory is not None and "log_directory" not in kwargs:
        Path(log_directory).mkdir(parents=True, exist_ok=True)
        kwargs["log_directory"] = str(log_directory)
    if spec.tls is not None:
        kwargs.update(security=_security(spec), protocol="tls://")
    try:
        with dask.config.set(SCHEDULER_SETTINGS):
            return SLURMCluster(**kwargs)
    except (TypeError, ValueError) as err:
        said = " ".join(str(err).split())  # dask-jobqueue's message spans lines, with a code example
        if spec.profile is None:
            msg = (f"cluster.profile is not set (--profile), and Dask's jobqueue.slurm config does not complete "
                   f"the job: {said} (jobqueue/slurm.yaml is an example profile)")
        else:
            msg = f"cluster.profile {spec.profile!r}: {said}"
        raise ClusterError(msg) from None


def job_script(spec: Cluster, log_directory: str | Path | None = None) -> str:
    """The job script a SLURM build would submit, its workers' logs in *log_directory* as
    the build puts them (nothing is submitted, and no log directory is left behind)."""
    # dask-jobqueue creates the log directory (and its parents) as it makes the cluster.
    made = None
    if log_directory is not None:
        missing = [p for p in (Path(log_directory), *Path(log_directory).parents) if not p.exists()]
        made = missing[-1] if missing else None
    cluster = None
    try:
        cluster = slurm_cluster(spec, log_directory)
        return cluster.job_script()
    finally:
        if cluster is not None:
            cluster.close()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def check_submission(script: str) -> None:
    """``sbatch --test-only``: a job SLURM would refuse is refused now, with SLURM's words."""
    try:
        result = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
    except FileNotFoundError:
        msg = "cluster.kind slurm: no 'sbatch' on this machine's PATH"
        raise ClusterError(msg) from None
    except subprocess.TimeoutExpired:
        msg = "sbatch --test-only did not answer within 60 s: is slurmctld up?"
        raise ClusterError(msg) from None
    if result.returncode != 0:
        said = " ".join(line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip())
        msg = f"SLURM refuses the worker job: {said}"
        raise ClusterError(msg)


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job_id: (state, reason)}`` from squeue for the jobs still known to it."""
    if not job_ids:
        return {}
    result = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                            capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    states = {}
    for line in result.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def job_log_tail(log_directory: str | Path | None, job_id: str) -> str:
    if log_directory is None:
        return ""
    lines: list[str] = []
    for path in sorted(Path(log_directory).glob(f"*-{job_id}.*")):
        text = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        lines += [f"  {path.name}: {line}" for line in text]
    return "\n".join(lines)


def _job_ids(cluster) -> list[str]:
    """The SLURM job ids of a dask-jobqueue cluster's workers (none for other clusters)."""
    workers = getattr(cluster, "workers", None) or {}
    return [str(job.job_id) for job in list(workers.values()) if getattr(job, "job_id", None)]


def _summary(states: dict[str, tuple[str, str]]) -> str:
    return ", ".join(f"job {i} {s[0]}" + (f" ({s[1]})" if s[1] not in ("None", "") else "")
                     for i, s in sorted(states.items()))  # fmt: skip


def wait_for_workers(client, cluster, n_workers: int, timeout: float, say: Callable[[str], None],
                     log_directory: str | Path | None = None) -> None:
    """Wait until *n_workers* workers have joined, saying why none are there yet.

    Every change in the submitted jobs' SLURM states is reported (PENDING with its reason,
    RUNNING); a job that left the queue without its worker joining is reported with the tail
    of its output; if every job ended that way, or *timeout* passes, ClusterError says so.
    """
    deadline = time.monotonic() + timeout
    last, reported = "", set()
    while len(client.nthreads()) < n_workers:
        ids = _job_ids(cluster)
        states = job_states(ids)
        summary = _summary(states)
        if summary and summary != last:
            joined = len(client.nthreads())
            say(f"waiting for workers ({joined}/{n_workers} joined): {summary}")
            last = summary
        ended = [i for i in ids if i not in states and i not in reported]
        for job_id in ended:
            reported.add(job_id)
            say(f"job {job_id} ended before its worker joined\n{job_log_tail(log_directory, job_id)}".rstrip())
        if ids and len(reported) == len(ids) and not client.nthreads():
            msg = f"every SLURM job ({', '.join(ids)}) ended without its worker joining; see the output above"
            raise ClusterError(msg)
        if time.monotonic() > deadline:
            msg = f"no {n_workers} workers after {timeout:.0f} s (cluster.worker_timeout); jobs: {summary or 'none'}"
            raise ClusterError(msg)
        time.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------------------------
# a build that loses every worker

#: Seconds a Ctrl-C'd build gives its in-process worker to close (it does not wait for the
#: running task).
ABANDON_TIMEOUT_SECONDS = 2.0

#: The module every worker process of a LocalCluster hepdask starts imports first (its
#: ``dask_setup``).
WORKER_PRELOAD = "hepdask.workers"

#: Dask's warning when the dashboard's port is taken (it then takes another).
PORT_IN_USE = r"Port \d+ is already in use"

#: Seconds without a single worker before a running build says so.
NO_WORKER_GRACE_SECONDS = 30.0


class WorkerWatch:
    """While a build waits on *futures*: say when the cluster has had no worker for
    ``NO_WORKER_GRACE_SECONDS`` (with the SLURM jobs' states where there are jobs) and when
    workers are back; after *timeout* seconds without any, cancel *futures*, so the build
    stops instead of waiting for ever, and ``check`` raises a ClusterError saying why.
    """

    def __init__(self, client, futures, say: Callable[[str], None], timeout: float) -> None:
        self.client, self.futures, self.say, self.timeout = client, futures, say, timeout
        self.error: ClusterError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hepdask-worker-watch", daemon=True)

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        since, said = None, False
        while not self._stop.wait(POLL_SECONDS):
            try:
                n_workers = len(self.client.nthreads())
            except (OSError, RuntimeError, TimeoutError):  # the client is closing: nothing to watch
                return
            now = time.monotonic()
            if n_workers:
                if said:
                    self.say(f"{n_workers} worker(s) joined again; the build goes on")
                since, said = None, False
                continue
            since = now if since is None else since
            say_now = not said and now - since >= NO_WORKER_GRACE_SECONDS
            give_up = now - since >= self.timeout
            if not (say_now or give_up):
                continue
            # squeue runs only when there is something to say, not at every look.
            jobs = _summary(job_states(_job_ids(getattr(self.client, "cluster", None))))
            if say_now:
                said = True
                self.say(f"no Dask worker for {now - since:.0f} s; the build waits for workers for up to "
                         f"{self.timeout:.0f} s (cluster.worker_timeout)" + (f"; {jobs}" if jobs else ""))
            if give_up:
                self.error = ClusterError(
                    f"no Dask worker for {self.timeout:.0f} s (cluster.worker_timeout) during the build; "
                    f"jobs: {jobs or 'none'}; the finished work is kept: run the same command again to resume"
                )
                self.client.cancel(self.futures)
                return
