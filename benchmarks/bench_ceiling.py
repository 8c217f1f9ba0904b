"""The fastest a build of a config could be on this cluster: a single pass that does only the
work no build can skip, beside the bare grouped read of ``bench_build.py`` in the same run.

``bench_build.py`` reports the build's events/s as a fraction of the slower of a bare read
and a bare write (target >= 0.5 with shuffle off). This benchmark asks how high that fraction
could go at all, whatever the build's design. On one warmed LocalCluster (the one a build
starts, warmed as ``bench_build.py`` warms it), in turn, ``--repeat`` rounds:

(1) the bare read: ``bench_build.bench_read`` with the build's grouping of files into tasks.
(c) the single pass: tasks of the same grouping; each runs the build's own code for reading,
    calibrating, cutting and binning its partitions (``build.partition_steps``) and writes
    every array that yields (images, entry numbers, labels, event fields) as Zarr chunks with
    the build's compressor as they fill (``store.ChunkFiles``: the bytes zarr writes), into
    chunk slots of its own in one store prepared beforehand (not timed).

(3) with ``--build`` (the default), the full build of ``bench_build.py`` (shuffle off) in
    the same round, for its ratio beside the ceiling.

(c) leaves out everything else a build does: staging, the seeded split assignment (it needs
every partition's count of selected events), the shuffle, source-ordered chunks (each task's
last chunk is padded), provenance beyond the entry numbers, the manifest, the statistics and
the completion marker, and the client's own steps. It is not something a build can do, but
an approximate lower bound on the wall time of any build that reads through uproot, bins
with hepdask's kernels and compresses with the configured codec on these workers:
approximate, since (c) still pays a few small costs a cleverer design might not (each
task's padded last chunk of every array, a copy of each row into a chunk buffer, opening the
arrays once a task). (1) / (c) is then about the highest ratio ``bench_build.py`` could
report against the grouped read.

    python benchmarks/bench_ceiling.py [--config configs/demo.yaml] [--workers 2]
        [--repeat 5] [--no-build] [--work-dir benchmarks/_work]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import bench_build
import numpy as np

HERE = Path(__file__).resolve().parent
#: Chunk slots of each array that one task may fill: far more than a task's events need
#: (an array's shape costs nothing until its chunks are written).
SLOTS_PER_TASK = 2**20


def _first_events(config, job, n: int) -> dict[str, np.ndarray]:
    """Every array the build's steps yield, for the first *n* selected events in plan order
    (read here, untimed): their dtypes and shapes, and the rows ``output.compressor: auto``
    tries, as a build takes them (``build._codec_samples``)."""
    from hepdask import build

    steps: list[dict[str, np.ndarray]] = []
    for partition in bench_build.partitions(config):
        steps += build.partition_steps(partition, job, build.Tally.of(job))
        if sum(len(step["entry"]) for step in steps) >= n:
            break
    if not steps:
        msg = f"{config.tree}: no read step in any file of the plan"
        raise RuntimeError(msg)
    return {name: np.concatenate([step[name] for step in steps])[:n] for name in steps[0]}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The arrays of (c)'s store, decided once: per array its ``store.ArraySpec``, events per
    chunk, and compressor (``auto`` decided on the build's trial rows)."""

    specs: dict
    per_chunk: dict[str, int]
    codecs: dict[str, str]
    compressor: tuple[str, int]


def layout(config, job) -> Layout:
    from hepdask import build, store

    chunk_events = build.chunk_events(config)
    first = _first_events(config, job, chunk_events)
    specs = {name: store.ArraySpec(str(a.dtype), a.shape[1:]) for name, a in first.items()}
    images = [img.array for img in job.images]
    per_chunk = store.array_chunk_events(specs, images, chunk_events)
    name, level = config.output.compressor.name, config.output.compressor.level
    samples = {image: (specs[image].dtype, first[image][: store.auto_trial_rows(specs[image], per_chunk[image])])
               for image in images}  # fmt: skip
    return Layout(specs, per_chunk, store.resolve_compressors(name, level, samples), (name, level))


def prepare(path: Path, arrays: Layout, n_tasks: int) -> None:
    """An empty store of one group, ``all``, with room for *n_tasks* tasks' chunks."""
    from hepdask import store

    capacity = n_tasks * SLOTS_PER_TASK * max(arrays.per_chunk.values())
    dims = {n: tuple(f"{n}_{i}" for i in range(len(s.shape))) for n, s in arrays.specs.items()}
    store.prepare(path, {"all": capacity}, arrays.specs, dims, [], chunk_events=arrays.per_chunk,
                  compressor=arrays.compressor, attrs={}, resolved=arrays.codecs)  # fmt: skip


class _Chunker:
    """One array's rows, gathered into a chunk-sized buffer and written a whole chunk at a time
    into consecutive chunk slots from *first*."""

    def __init__(self, files, first: int, like: np.ndarray) -> None:
        self.files, self.next = files, first
        self.buffer = np.empty((files.chunks[0], *like.shape[1:]), like.dtype)
        self.filled = self.written = 0

    def add(self, values: np.ndarray) -> None:
        at = 0
        while at < len(values):
            take = min(len(values) - at, len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = values[at : at + take]
            self.filled, at = self.filled + take, at + take
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.filled:
            self.files.write(self.next, self.buffer[: self.filled])
            self.next, self.written, self.filled = self.next + 1, self.written + self.filled, 0


def single_pass(partitions, job, path: str, task: int) -> int:
    """Read, cut and bin *partitions* (``build.partition_steps``) and write every array's chunks
    as they fill, into chunk slots ``task * SLOTS_PER_TASK`` onwards. Returns events written."""
    import zarr

    from hepdask import build, store

    group = zarr.open_group(path, mode="r+", zarr_format=3)["all"]
    chunkers: dict[str, _Chunker] = {}
    tally = build.Tally.of(job)
    for partition in partitions:
        for arrays in build.partition_steps(partition, job, tally):
            for name, values in arrays.items():
                if name not in chunkers:
                    files = store.ChunkFiles.of(group[name])
                    if files is None:
                        msg = f"{path}/all/{name}: not a layout store.ChunkFiles writes"
                        raise RuntimeError(msg)
                    chunkers[name] = _Chunker(files, task * SLOTS_PER_TASK, values)
                chunkers[name].add(values)
    for chunker in chunkers.values():
        chunker.flush()
    return chunkers["entry"].written if chunkers else 0


def bench_single_pass(client, config, job, arrays: Layout, path: Path, per_task: int) -> dict:
    from distributed import wait

    parts = bench_build.partitions(config)
    groups = [parts[i : i + per_task] for i in range(0, len(parts), per_task)]
    shutil.rmtree(path, ignore_errors=True)
    prepare(path, arrays, len(groups))
    t0 = time.perf_counter()
    futures = [client.submit(single_pass, g, job, str(path), i, pure=False) for i, g in enumerate(groups)]
    wait(futures)
    events = sum(client.gather(futures))
    return {"events": events, "seconds": time.perf_counter() - t0, "tasks": len(groups)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=HERE.parent / "configs" / "demo.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of (1), (c) and (3) in turn")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work")
    parser.add_argument("--build", action=argparse.BooleanOptionalAction, default=True,
                        help="(3) also time the full build (shuffle off) in every round, as bench_build.py does")  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from hepdask import build

    args = parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = bench_build.load_config(args.config, work, "ceiling-build.zarr", workers=args.workers, shuffle=False)
    bench_build.ensure_inputs(config)
    per_task = bench_build.build_grouping(config, args.workers)
    job = dataclasses.replace(build.Job.from_config(config), staging=str(work / "ceiling.staging"))
    arrays = layout(config, job)
    rounds = []
    with bench_build.warm_cluster(args.config, work, config, args) as client:
        for i in range(args.repeat):
            read = bench_build.bench_read(client, config, per_task)
            ceiling = bench_single_pass(client, config, job, arrays, work / "ceiling.zarr", per_task)
            full = bench_build.bench_build(client, config, interval=1.0)["seconds"] if args.build else None
            rounds.append({"read": read["seconds"], "single_pass": ceiling["seconds"], "build": full,
                           "events_read": read["events"], "events_written": ceiling["events"],
                           "tasks": ceiling["tasks"]})  # fmt: skip
            print(f"round {i + 1}: (1) read {read['seconds']:.3f} s, (c) single pass {ceiling['seconds']:.3f} s "
                  f"({ceiling['events']:,} of {read['events']:,} events kept)"
                  + (f", (3) build {full:.3f} s" if full is not None else "")
                  + f"; (1)/(c) {read['seconds'] / ceiling['seconds']:.2f}")  # fmt: skip
    shutil.rmtree(work / "ceiling.zarr", ignore_errors=True)
    ratios = [r["read"] / r["single_pass"] for r in rounds]
    best = min(r["single_pass"] for r in rounds)
    command = "python benchmarks/bench_ceiling.py " + " ".join(sys.argv[1:])
    print(f"\n{command.strip()}   ({args.workers} workers, {rounds[0]['tasks']} tasks of {per_task} partitions)")
    print(f"(1) bare grouped read: {min(r['read'] for r in rounds):.3f}-{max(r['read'] for r in rounds):.3f} s")
    print(f"(c) single pass:       {best:.3f}-{max(r['single_pass'] for r in rounds):.3f} s")
    print(f"ratio (1)/(c), the most bench_build.py's ratio against the grouped read could be: "
          f"{min(ratios):.2f}-{max(ratios):.2f} (median {float(np.median(ratios)):.2f})")
    if args.build:
        builds = [r["build"] for r in rounds]
        print(f"(3) full build:        {min(builds):.3f}-{max(builds):.3f} s; (1)/(3) "
              f"{min(r['read'] / r['build'] for r in rounds):.2f}-{max(r['read'] / r['build'] for r in rounds):.2f}, "
              f"(c)/(3) {min(r['single_pass'] / r['build'] for r in rounds):.2f}-"
              f"{max(r['single_pass'] / r['build'] for r in rounds):.2f}")
    return {"rounds": rounds, "ratios": ratios}


if __name__ == "__main__":
    main()
