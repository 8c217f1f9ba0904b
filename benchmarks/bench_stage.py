"""What staging one partition costs, in one process, and where it goes.

A build's stage task reads a partition (``sources.read``: open the file and its tree, check
and identify the branches, read them), calibrates, cuts, bins and stages it
(``store.PartitionWriter``). This runs ``build.process_partitions`` on the first
``--partitions`` partitions of a config's plan in this process (no Dask), after two untimed
warm-up partitions (imports, numba's first use, the first branch identification), and
prints the wall and CPU time per partition with the time spent in each step. A worker
process pays about the same per partition; the build benchmarks add scheduling and the
write phase on top.

    python benchmarks/bench_stage.py CONFIG [--partitions 60] [--rounds 3]

Staging goes to a temporary directory next to the config's output path (removed at the
end), as a build stages next to its store. Numba's parallel kernels get ``--numba-threads``
threads (1 by default, what a single-threaded build worker gets, ``cluster.py``): with more
threads than the work needs, idle OpenMP threads spin and the CPU figure counts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

#: (module, function) pairs timed inside a partition's staging.
STEPS = [
    ("sources", "open_tree"),
    ("sources", "check_branches"),
    ("build", "_calibrate"),
    ("build", "_bin"),
    ("store", "PartitionWriter.append"),
    ("store", "PartitionWriter.close"),
]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def instrument(modules: dict, spent: Counter) -> None:
    """Wrap each step so that its wall time adds up in *spent*."""
    for module_name, qualname in STEPS:
        owner = modules[module_name]
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        function = getattr(owner, name)

        def timed(*args, _function=function, _label=f"{module_name}.{qualname}", **kwargs):
            started = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - started

        setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--partitions", type=int, default=60, help="partitions timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--numba-threads", type=int, default=1,
                        help="NUMBA_NUM_THREADS, as a worker with this many threads gets it")
    args = parser.parse_args(argv)
    # Before numba is imported, which reads it once.
    os.environ["NUMBA_NUM_THREADS"] = str(args.numba_threads)

    from hepdask import build, config, sources, store

    cfg = config.load(args.config)
    partitions = sources.plan([(s.name, s.label, s.files) for s in cfg.samples])
    warm, timed_parts = partitions[:2], partitions[2 : 2 + args.partitions]
    spent: Counter = Counter()
    instrument({"sources": sources, "build": build, "store": store}, spent)
    output = Path(cfg.output.path)
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"{args.config}: {len(timed_parts)} partitions a round, {args.rounds} rounds")
    for round_ in range(args.rounds):
        staging = tempfile.mkdtemp(prefix=".bench-stage-", dir=output.parent)
        try:
            job = dataclasses.replace(build.Job.from_config(cfg), staging=staging)
            build.process_partitions(warm, job)
            spent.clear()
            wall, cpu = time.perf_counter(), cpu_seconds()
            build.process_partitions(timed_parts, job)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        n = len(timed_parts)
        steps = ", ".join(f"{label.split('.', 1)[1]} {seconds / n * 1e3:.2f}" for label, seconds in spent.items())
        print(f"round {round_ + 1}: {wall / n * 1e3:.1f} ms wall, {cpu / n * 1e3:.1f} ms CPU a partition; "
              f"ms a partition: {steps}")


if __name__ == "__main__":
    main()
