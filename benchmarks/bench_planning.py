"""Client-side planning time and scheduler overhead of ``hepdask`` for many small files.

(0) N tiny LDMX-like ROOT files (``examples.write_file``, ``--events-per-file`` events each)
    are written into ``<work-dir>/files`` with a multiprocessing Pool of 2 (files that exist
    are reused; not part of the figures). For every smaller N measured, ``<work-dir>/files_N``
    holds hard links to the first N files, so that each N globs a directory of exactly N files.
(1) planning on the client, for N = 100, 1,000 and ``--files``:
    ``sources.plan([("s", 1, [glob])])`` (glob expansion + Partition objects), and the whole
    pre-build part of ``build_dataset``: ``config.load`` of a YAML config over those files
    followed by ``build_dataset(config, dry_run=True)`` (plan + probe of one file + plan
    report). Best and median of ``--repeat`` runs. Target: < 30 s for 10,000 files.
(2) the scheduler on a LocalCluster (2 worker processes, 1 thread each):
    (a) ``client.map(identity, range(N))`` + ``gather`` of N no-op tasks: time / N is the
        per-task overhead of the scheduler + client round trip;
    (b) a real ``build_dataset(config, client=client, progress=False)`` over the N files
        (output in the work dir, overwrite on): wall time, time per partition, and the tasks
        it submitted, counted by a scheduler plugin by key prefix (``stage-*``, ``write-*``),
        with the span of each phase on the scheduler and the summed compute time of its tasks
        on the workers (from the task's ``startstops``).

    python benchmarks/bench_planning.py [--files 10000] [--events-per-file 5]
        [--work-dir benchmarks/_work/planning] [--repeat 3] [--no-build]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# (0) input files


def _file_name(i: int) -> str:
    return f"signal_{i:05d}.root"


def _write_one(args: tuple[str, int, int]) -> None:
    from hepdask import examples

    path, n_events, seed = args
    examples.write_file(path, examples.SIGNAL, n_events, seed, first_event=0)


def make_files(directory: Path, n_files: int, events_per_file: int) -> tuple[int, float]:
    """Write the missing files of ``signal_00000 .. signal_{n-1}``; (written, seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = set(os.listdir(directory))
    todo = [(str(directory / _file_name(i)), events_per_file, 1000 + i)
            for i in range(n_files) if _file_name(i) not in existing]
    start = time.perf_counter()
    if todo:
        with Pool(2) as pool:
            for done, _ in enumerate(pool.imap_unordered(_write_one, todo, chunksize=50), 1):
                if done % 2000 == 0:
                    print(f"  generated {done}/{len(todo)} files", flush=True)
    return len(todo), time.perf_counter() - start


def subset_dir(work_dir: Path, source: Path, n: int, total: int) -> Path:
    """A directory of exactly n files (hard links to the first n of *source*)."""
    if n == total:
        return source
    directory = work_dir / f"files_{n}"
    directory.mkdir(parents=True, exist_ok=True)
    existing = set(os.listdir(directory))
    for i in range(n):
        name = _file_name(i)
        if name not in existing:
            os.link(source / name, directory / name)
    return directory


def config_dict(files_glob: str, output: Path) -> dict:
    """A demo-like config (tests/data_generation.py ``demo_config``) over one sample."""
    return {
        "name": "planning",
        "samples": [{"name": "s", "label": 1, "files": files_glob}],
        "tree": "ecalHits",
        "hits": {"x": "x", "y": "y", "z": "z", "E": "E"},
        "event": {"eventNumber": "eventNumber"},
        "selection": {"hits": "E > 0.5"},
        "image": {
            "axes": [
                {"field": "z", "bins": 17, "range": [235, 605], "units": "mm"},
                {"field": "x", "bins": 16, "range": [-80, 80], "units": "mm"},
            ],
            "weight": "E",
            "dtype": "float32",
        },
        "output": {"path": str(output), "overwrite": True},
        "cluster": {"workers": 2},
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------------------------
# (1) planning


def timed(fn, repeat: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def measure_planning(config_path: Path, files_glob: str, repeat: int) -> dict:
    from hepdask import build, config, sources

    best_plan, med_plan, partitions = timed(lambda: sources.plan([("s", 1, [files_glob])]), repeat)
    best_load, med_load, cfg = timed(lambda: config.load(config_path), repeat)
    best_probe, med_probe, _ = timed(lambda: build.probe(cfg, partitions), repeat)

    def pre_build():
        c = config.load(config_path)
        return build.build_dataset(c, dry_run=True, progress=False)

    best_all, med_all, report = timed(pre_build, repeat)
    assert report.n_partitions == len(partitions), (report.n_partitions, len(partitions))
    return {"n": len(partitions), "plan": (best_plan, med_plan), "load": (best_load, med_load),
            "probe": (best_probe, med_probe), "pre_build": (best_all, med_all)}


# --------------------------------------------------------------------------------------------
# (2) scheduler


def identity(x):
    return x


def _new_counter():
    from distributed.diagnostics.plugin import SchedulerPlugin

    class TaskCounter(SchedulerPlugin):
        """Counts tasks by key prefix and records each phase's span and compute time."""

        name = "bench-planning-counter"

        def __init__(self) -> None:
            self.reset()

        def reset(self) -> None:
            self.done: dict[str, int] = defaultdict(int)
            self.erred: dict[str, int] = defaultdict(int)
            self.first: dict[str, float] = {}
            self.last: dict[str, float] = {}
            self.compute: dict[str, float] = defaultdict(float)

        def transition(self, key, start, finish, *args, **kwargs):
            prefix = key.split("-")[0] if isinstance(key, str) else str(key[0]).split("-")[0]
            now = time.perf_counter()
            if finish == "processing":
                self.first.setdefault(prefix, now)
            elif finish == "memory" and start == "processing":
                self.done[prefix] += 1
                self.last[prefix] = now
                for ss in kwargs.get("startstops", ()) or ():
                    if ss.get("action") == "compute":
                        self.compute[prefix] += ss["stop"] - ss["start"]
            elif finish == "erred":
                self.erred[prefix] += 1

    return TaskCounter()


def measure_noop(client, n: int) -> dict:
    start = time.perf_counter()
    futures = client.map(identity, range(n), pure=False)
    submitted = time.perf_counter() - start
    results = client.gather(futures)
    total = time.perf_counter() - start
    assert results == list(range(n))
    del futures
    return {"n": n, "submit": submitted, "total": total}


def measure_build(client, counter, config_path: Path) -> dict:
    from hepdask import build, config

    cfg = config.load(config_path)
    counter.reset()
    start = time.perf_counter()
    report = build.build_dataset(cfg, client=client, progress=False)
    wall = time.perf_counter() - start
    phases = {}
    for prefix in ("stage", "write"):
        span = counter.last.get(prefix, 0.0) - counter.first.get(prefix, 0.0) if prefix in counter.first else 0.0
        phases[prefix] = {"tasks": counter.done.get(prefix, 0), "span": span,
                          "compute": counter.compute.get(prefix, 0.0)}
    other = {k: v for k, v in counter.done.items() if k not in ("stage", "write")}
    return {"n": report.n_partitions, "wall": wall, "events": report.events_read,
            "written": report.events_written, "phases": phases, "other": other,
            "erred": dict(counter.erred)}


# --------------------------------------------------------------------------------------------
# main


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "planning")
    parser.add_argument("--events-per-file", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each planning measurement")
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="file counts to measure (default: 100 1000 and --files)")
    parser.add_argument("--build-sizes", type=int, nargs="*", default=None,
                        help="file counts of the real builds (default: the same as --sizes)")
    parser.add_argument("--no-build", action="store_true", help="skip the real builds")
    args = parser.parse_args(argv)

    total = args.files
    sizes = sorted({n for n in (args.sizes or [100, 1000, total]) if n <= total})
    build_sizes = [] if args.no_build else sorted({n for n in (args.build_sizes or sizes) if n <= total})
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    print(f"# bench_planning  {datetime.date.today()}  python {platform.python_version()}  "
          f"{os.cpu_count()} cores  files={total}  events/file={args.events_per_file}")
    print(f"  command: {' '.join([Path(sys.executable).name, *sys.argv])}")

    # (0) files
    source = work / "files"
    written, seconds = make_files(source, total, args.events_per_file)
    print(f"(0) generated {written} files in {seconds:.1f} s"
          + (f" ({seconds / written * 1e3:.1f} ms/file wall on a Pool of 2)" if written else " (all reused)"))
    dirs = {n: subset_dir(work, source, n, total) for n in sizes}
    globs = {n: str(d / "signal_*.root") for n, d in dirs.items()}
    configs = {n: write_config(work / f"config_{n}.yaml", config_dict(globs[n], work / f"out_{n}.zarr"))
               for n in sizes}

    # (1) planning
    print(f"\n(1) client-side planning (best / median of {args.repeat}, ms)")
    planning = {}
    for n in sizes:
        planning[n] = measure_planning(configs[n], globs[n], args.repeat)
        p = planning[n]
        print(f"  N={n:>6}: plan {fmt_ms(p['plan'][0])} / {fmt_ms(p['plan'][1])}   "
              f"load {fmt_ms(p['load'][0])}   probe {fmt_ms(p['probe'][0])}   "
              f"load+dry-run build {fmt_ms(p['pre_build'][0])} / {fmt_ms(p['pre_build'][1])}", flush=True)

    # (2) scheduler
    from distributed import Client, LocalCluster

    noop, builds = {}, {}
    print("\n(2) LocalCluster: 2 worker processes x 1 thread")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        counter = _new_counter()
        cluster.scheduler.add_plugin(counter)
        measure_noop(client, 200)  # warm-up
        for n in sizes:
            noop[n] = measure_noop(client, n)
            r = noop[n]
            print(f"  no-op N={n:>6}: submit {r['submit']:.2f} s, submit+gather {r['total']:.2f} s, "
                  f"{r['total'] / n * 1e3:.2f} ms/task", flush=True)
        if build_sizes:
            warm_n = min(sizes)
            measure_build(client, counter, configs[warm_n])  # warm-up: imports, numba compilation
            for n in build_sizes:
                builds[n] = measure_build(client, counter, configs[n])
                b = builds[n]
                st, wr = b["phases"]["stage"], b["phases"]["write"]
                print(f"  build N={n:>6}: wall {b['wall']:.1f} s ({b['wall'] / n * 1e3:.1f} ms/partition), "
                      f"stage tasks {st['tasks']} (span {st['span']:.1f} s, compute {st['compute']:.1f} s), "
                      f"write tasks {wr['tasks']} (span {wr['span']:.1f} s, compute {wr['compute']:.1f} s), "
                      f"events {b['events']} read / {b['written']} written"
                      + (f", other tasks {b['other']}" if b["other"] else "")
                      + (f", erred {b['erred']}" if b["erred"] else ""), flush=True)

    # table
    print("\n## Table\n")
    print("| N files | `sources.plan` (ms) | per file (µs) | `config.load` (ms) | `probe` (ms) "
          "| load + `build_dataset(dry_run=True)` (ms) | no-op map+gather (s) | per no-op task (ms) "
          "| build wall (s) | per partition (ms) | stage tasks | write tasks | stage span (s) "
          "| stage compute, both workers (s) | write span (s) |")
    print("|---:" * 15 + "|")
    for n in sizes:
        p, r = planning[n], noop[n]
        row = [f"{n:,}", fmt_ms(p["plan"][0]), f"{p['plan'][0] / n * 1e6:.1f}", fmt_ms(p["load"][0]),
               fmt_ms(p["probe"][0]), fmt_ms(p["pre_build"][0]), f"{r['total']:.2f}",
               f"{r['total'] / n * 1e3:.2f}"]
        if n in builds:
            b = builds[n]
            st, wr = b["phases"]["stage"], b["phases"]["write"]
            row += [f"{b['wall']:.1f}", f"{b['wall'] / n * 1e3:.1f}", str(st["tasks"]), str(wr["tasks"]),
                    f"{st['span']:.1f}", f"{st['compute']:.1f}", f"{wr['span']:.1f}"]
        else:
            row += ["–"] * 7
        print("| " + " | ".join(row) + " |")
    largest = max(sizes)
    verdict = "meets" if planning[largest]["pre_build"][0] < 30 else "MISSES"
    print(f"\nplanning of {largest:,} files (load + dry-run build): {planning[largest]['pre_build'][0]:.2f} s "
          f"-> {verdict} the 30 s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
