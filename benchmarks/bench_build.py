"""Throughput and worker memory of a full ``hepdask`` build against its two halves done alone.

One run, on the same input files (the demo's generated ROOT files) and the same LocalCluster
(``hepdask.cluster.connect``, the cluster a build starts itself; start-up is never timed):

(1) raw uproot reading: ``client.map`` tasks open files (memory-mapped, as the build reads
    them with ``read.memory_map``, and with the build's ZLIB inflater, ``sources.inflating``)
    and iterate exactly the branches the config names (``hits`` + ``event``) with the
    config's ``read.step_size``, as ``sources.read`` does, but without selection, binning or
    staging; events/s and MB/s of uncompressed branch bytes. Measured with one file a task and, where the build groups
    files into stage tasks (``read.partitions_per_task``), with the build's grouping too; the
    ratio is printed against both.
(2) Zarr writing alone: the images of the built store are loaded into the workers' memory
    (not timed), then written into a fresh Zarr v3 store made by ``store.prepare`` with the
    same per-split shapes, ``chunk_events`` and compressor, one task per run of whole chunks
    (grouped as the build groups them); events/s and MB/s of uncompressed image bytes.
(3) the full build, ``hepdask.build_dataset(config, client=client)`` with shuffle off (and
    once more with shuffle on); events/s = events read / wall time of ``build_dataset``.
    The ratio build / min((1), (2)) is printed; the target is >= 0.5 with shuffle off.
(4) worker memory during the builds: a thread inside every worker samples its RSS (and the
    anonymous part, RSS minus file-backed/shared pages, and the open file descriptors) every
    ``--interval`` seconds, attributing each sample to the phase of the task it is executing
    (``stage-*`` = read + bin + stage, ``write-*`` = Zarr writes). The build is repeated on a
    dataset ``--scale`` times larger (more files, generated into the work dir) to check that
    the peak is bounded by the partition/step size, not by the dataset size.

Every measurement gets a fresh LocalCluster (so one build's freed-but-retained memory does
not show up in the next one's peak), warmed up before timing: every worker processes one
partition (numba compilation, imports), then a tiny 2-file build runs on the cluster. That
build registers hepdask's malloc tuning on the workers (``cluster.tune_malloc``), so the read
and write baselines run with the same allocator settings as the builds.

    python benchmarks/bench_build.py [--config configs/demo.yaml] [--workers 2]
        [--shuffle/--no-shuffle] [--scale 2 [4 ...]] [--repeat 1] [--work-dir benchmarks/_work]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MiB = 2**20
MB = 1e6


# --------------------------------------------------------------------------------------------
# configs and inputs


def load_config(path: Path, work_dir: Path, output: str, *, workers: int, shuffle: bool,
                extra: list[str] = ()):  # fmt: skip
    """The benchmark's config: *path* with the output in *work_dir*, overwritten."""
    import hepdask

    overrides = [
        f"output.path={work_dir / output}",
        "output.overwrite=true",
        f"output.shuffle.enabled={str(shuffle).lower()}",
        f"cluster.workers={workers}",
        "cluster.dashboard_address=127.0.0.1:0",
        *extra,
    ]
    return hepdask.load_config(path, overrides)


def scaled_overrides(config, data_dir: Path, scale: int) -> list[str]:
    """Overrides that make every generated sample *scale* times as many files in *data_dir*."""
    overrides = []
    for i, sample in enumerate(config.samples):
        gen = sample.generate
        if gen is None:
            msg = f"sample {sample.name!r} has no generate: section; --scale needs generated samples"
            raise SystemExit(msg)
        prefix = "signal" if gen.signal else "background"
        overrides += [
            f"samples.{i}.files={data_dir / prefix}_*.root",
            f"samples.{i}.generate.directory={data_dir}",
            f"samples.{i}.generate.n_files={gen.n_files * scale}",
        ]
    return overrides


def ensure_inputs(config) -> None:
    """Generate the files the config's samples ask for where they are missing (not timed)."""
    from hepdask import examples

    for sample in config.samples:
        gen = sample.generate
        if gen is not None:
            examples.generate(gen.directory, signal=gen.signal, n_files=gen.n_files,
                              events_per_file=gen.events_per_file, seed=gen.seed)  # fmt: skip


def partitions(config):
    from hepdask import sources

    return sources.plan([(s.name, s.label, s.files) for s in config.samples])


# --------------------------------------------------------------------------------------------
# worker memory sampling (runs inside the workers through client.run)


def _sampler_start(dask_worker, interval: float) -> None:
    import threading
    import time

    import psutil

    proc = psutil.Process()
    stop = threading.Event()
    peaks: dict[str, dict[str, float]] = {}
    first = proc.memory_info()
    state = {"stop": stop, "peaks": peaks, "baseline_rss": first.rss, "baseline_anon": first.rss - first.shared,
             "samples": 0}  # fmt: skip

    def phase() -> str:
        try:
            keys = [str(ts.key) for ts in list(dask_worker.state.executing)]
        except RuntimeError:  # the set changed while we copied it
            return "other"
        if not keys:
            return "idle"
        return keys[0].split("-", 1)[0]

    def loop() -> None:
        while not stop.is_set():
            mem = proc.memory_info()
            values = {"rss": mem.rss, "anon": mem.rss - mem.shared, "fds": proc.num_fds()}
            now = time.perf_counter()
            for name in (phase(), "all"):
                peak = peaks.setdefault(name, {"rss": 0, "anon": 0, "fds": 0, "first": now})
                for key, value in values.items():
                    peak[key] = max(peak[key], value)
                peak["last"] = now
            state["samples"] += 1
            stop.wait(interval)

    state["thread"] = threading.Thread(target=loop, name="bench-rss", daemon=True)
    state["thread"].start()
    dask_worker._bench_rss = state


def _sampler_stop(dask_worker) -> dict:
    state = dask_worker._bench_rss
    state["stop"].set()
    state["thread"].join()
    return {k: v for k, v in state.items() if k not in ("stop", "thread")}


class WorkerMemory:
    """Context manager: sample every worker's memory while the block runs."""

    def __init__(self, client, interval: float) -> None:
        self.client, self.interval, self.result = client, interval, {}

    def __enter__(self) -> WorkerMemory:
        self.client.run(_sampler_start, interval=self.interval)
        return self

    def __exit__(self, *exc) -> None:
        raw = self.client.run(_sampler_stop)
        self.result = {f"worker {i}": r for i, (_, r) in enumerate(sorted(raw.items()))}


# --------------------------------------------------------------------------------------------
# warm-up


def _warm_worker(partition, job, staging: str) -> int:
    """Process one partition into a private staging dir: compiles numba, imports everything."""
    from hepdask import build

    shutil.rmtree(staging, ignore_errors=True)
    result = build.process_partition(partition, dataclasses.replace(job, staging=staging))
    shutil.rmtree(staging, ignore_errors=True)
    return result["n_events"]


@contextmanager
def warm_cluster(config_path: Path, work_dir: Path, config, args) -> Iterator:
    """A fresh LocalCluster as a build starts it, warmed up: one partition per worker, then a
    tiny 2-file build. Fresh worker processes keep one measurement's retained memory out of
    the next one's peak."""
    from hepdask import cluster

    with cluster.connect(config.cluster) as client:
        client.wait_for_workers(args.workers)
        warm_up(client, config_path, work_dir, config, args)
        yield client


def warm_up(client, config_path: Path, work_dir: Path, config, args) -> None:
    import hepdask
    from hepdask import build

    parts = partitions(config)
    job = build.Job.from_config(config)
    client.run(lambda dask_worker: _warm_worker(parts[0], job, f"{work_dir}/warm-{dask_worker.name}.staging"))
    firsts = {}
    for p in parts:
        firsts.setdefault(p.sample, p.file)
    files = [f"samples.{i}.files=[{firsts[s.name]}]" for i, s in enumerate(config.samples)]
    tiny = load_config(config_path, work_dir, "warmup.zarr", workers=args.workers, shuffle=True, extra=files)
    hepdask.build_dataset(tiny, client=client, progress=False)


# --------------------------------------------------------------------------------------------
# (1) raw uproot reading


def _read_file(path: str, tree_name: str, branches: list[str], step_size: int,
               memory_map: bool) -> tuple[int, int, int, str]:
    """Read *branches* of one file in steps, through the source the build uses (memory-mapped
    with ``read.memory_map``) and its ZLIB inflater; (events, uncompressed, compressed bytes,
    the inflating library)."""
    import uproot

    from hepdask.sources import inflating, open_options

    events = 0
    with inflating() as library, uproot.open(path, **open_options(memory_map=memory_map)) as file:
        tree = file[tree_name]
        for arrays in tree.iterate(branches, step_size=step_size, library="ak", how=dict):
            events += len(arrays[branches[0]])
        unzipped = sum(int(tree[b].uncompressed_bytes) for b in branches)
        zipped = sum(int(tree[b].compressed_bytes) for b in branches)
    return events, unzipped, zipped, library


def _read_files(paths: list[str], tree_name: str, branches: list[str], step_size: int,
                memory_map: bool) -> list[tuple[int, int, int, str]]:
    return [_read_file(path, tree_name, branches, step_size, memory_map) for path in paths]


def bench_read(client, config, per_task: int) -> dict:
    """(1): *per_task* files a task (1, or as many as the build stages a task)."""
    from distributed import wait

    from hepdask import sources

    branches = sources.branches_needed(dict(config.hits), dict(config.event))
    files = [p.file for p in partitions(config)]
    groups = [files[i : i + per_task] for i in range(0, len(files), per_task)]
    t0 = time.perf_counter()
    futures = client.map(_read_files, groups, tree_name=config.tree, branches=branches,
                         step_size=config.read.step_size, memory_map=config.read.memory_map,
                         pure=False)  # fmt: skip
    wait(futures)
    results = [r for rs in client.gather(futures) for r in rs]
    seconds = time.perf_counter() - t0
    events, unzipped, zipped = (sum(r[i] for r in results) for i in range(3))
    return {"events": events, "bytes": unzipped, "compressed_bytes": zipped, "seconds": seconds,
            "tasks": len(groups), "files": len(files), "branches": branches,
            "inflate": "/".join(sorted({r[3] for r in results}))}  # fmt: skip


def build_grouping(config, workers: int) -> int:
    """Files a stage task of the build reads (``read.partitions_per_task``, resolved)."""
    from hepdask import build

    return build.partitions_per_task(config.read.partitions_per_task, len(partitions(config)), workers)


# --------------------------------------------------------------------------------------------
# (2) Zarr writing alone


def _load_images(path: str, split: str, start: int, stop: int) -> np.ndarray:
    import zarr

    return zarr.open_group(path, mode="r", zarr_format=3)[split]["image"][start:stop]


def _write_images(images: np.ndarray, path: str, split: str, start: int) -> int:
    import zarr

    array = zarr.open_group(path, mode="r+", zarr_format=3)[split]["image"]
    array[start : start + images.shape[0]] = images
    return images.nbytes


def bench_write(client, config, built: Path, target: Path) -> dict:
    """Write the images of *built* into a fresh store with the build's layout and codec."""
    import zarr
    from distributed import wait

    from hepdask import build, store

    source = zarr.open_group(str(built), mode="r", zarr_format=3)
    splits = list(source.attrs.get(store.PREFIX + "splits", sorted(source.group_keys())))
    image = source[splits[0]]["image"]
    layout = build.image_layout(config)
    per_chunk = build.chunk_events(config)
    spec = store.ArraySpec(str(image.dtype), tuple(image.shape[1:]))
    sizes = {s: source[s]["image"].shape[0] for s in splits}
    shutil.rmtree(target, ignore_errors=True)
    # The codec the build chose (``auto`` decides a one-byte image by a trial of its data).
    store.prepare(target, sizes, {"image": spec}, {"image": layout.dims}, [], chunk_events=per_chunk,
                  compressor=store.compressor_setting(image), attrs={})  # fmt: skip

    # One task per run of whole chunks, grouped as the build groups its write tasks, but
    # without rounding to the chunks of the small per-event arrays, which are not written here.
    ranges = {s: store.chunk_ranges(n, per_chunk) for s, n in sizes.items()}
    n_workers = len(client.nthreads())
    group = build._chunks_per_task(sum(map(len, ranges.values())), per_chunk * spec.itemsize, n_workers, unit=1)
    runs = [(s, r[i][0], r[min(i + group, len(r)) - 1][1]) for s, r in ranges.items() for i in range(0, len(r), group)]

    blocks = client.map(_load_images, [str(built)] * len(runs), *zip(*runs), pure=False)
    wait(blocks)  # the images now sit in the workers' memory; loading them is not timed
    t0 = time.perf_counter()
    writes = client.map(_write_images, blocks, [str(target)] * len(runs), [s for s, _, _ in runs],
                        [a for _, a, _ in runs], pure=False)  # fmt: skip
    wait(writes)
    written = sum(client.gather(writes))
    seconds = time.perf_counter() - t0
    del blocks
    stored = sum(
        f.stat().st_size for s in splits for f in (target / s / "image").rglob("*") if f.is_file()
    )  # fmt: skip
    return {"events": sum(sizes.values()), "bytes": written, "stored_bytes": stored, "seconds": seconds,
            "tasks": len(runs), "chunk_events": per_chunk, "chunks_per_task": group,
            "compressor": f"{config.output.compressor.name}-{config.output.compressor.level}"}  # fmt: skip


# --------------------------------------------------------------------------------------------
# (3) + (4) the full build, with worker memory


def bench_build(client, config, interval: float) -> dict:
    import hepdask

    with WorkerMemory(client, interval) as memory:
        t0 = time.perf_counter()
        report = hepdask.build_dataset(config, client=client, progress=False)
        seconds = time.perf_counter() - t0
    return {"events": report.events_read, "written": report.events_written, "seconds": seconds,
            "partitions": report.n_partitions, "memory": memory.result}  # fmt: skip


# --------------------------------------------------------------------------------------------
# the table


def step_bytes(config, read: dict, events_per_partition: float) -> dict:
    """Uncompressed sizes of one read step: input branches and the images made from it."""
    from hepdask import build

    layout = build.image_layout(config)
    step_events = min(config.read.step_size, events_per_partition)
    image = layout.size * np.dtype(config.image.resolved_dtype).itemsize
    return {"step_events": step_events, "input": step_events * read["bytes"] / read["events"],
            "images": step_events * image}  # fmt: skip


def merge_memory(memories: list[dict]) -> dict:
    """Per worker, the largest of each peak over several runs (phase spans from the first)."""
    merged = json.loads(json.dumps(memories[0]))
    for memory in memories[1:]:
        for worker, m in memory.items():
            target = merged.setdefault(worker, m)
            target["baseline_rss"] = max(target["baseline_rss"], m["baseline_rss"])
            target["baseline_anon"] = max(target["baseline_anon"], m["baseline_anon"])
            for phase, peak in m["peaks"].items():
                into = target["peaks"].setdefault(phase, dict(peak))
                for key in ("rss", "anon", "fds"):
                    into[key] = max(into[key], peak[key])
    return merged


def phase_seconds(build: dict) -> dict[str, float]:
    """Wall time of the stage (read + bin + stage) and write phases, from the RSS samples."""
    out = {}
    for phase in ("stage", "write"):
        spans = [m["peaks"][phase] for m in build["memory"].values() if phase in m["peaks"]]
        if spans:
            out[phase] = max(s["last"] for s in spans) - min(s["first"] for s in spans)
    return out


def fmt_rate(result: dict) -> str:
    eps = result["events"] / result["seconds"]
    mbs = f"{result['bytes'] / MB / result['seconds']:8.1f}" if "bytes" in result else "       -"
    runs = result.get("all_seconds", [])
    runs = f"  (runs: {', '.join(f'{t:.2f}' for t in runs)} s)" if len(runs) > 1 else ""
    return f"{result['events']:>9,d}  {result['seconds']:8.2f}  {eps:>10,.0f}  {mbs}{runs}"


def print_tables(results: dict, args) -> list[str]:
    lines = []
    say = lines.append
    read, write, builds = results["read"], results["write"], results["builds"]
    reads = [r for r in (read, results.get("read_grouped")) if r is not None]
    say(f"{'measurement':<44} {'events':>9}  {'wall s':>8}  {'events/s':>10}  {'MB/s':>8}")
    for r in reads:
        say(f"{'(1) uproot read, ' + str(len(r['branches'])) + ' branches, ' + str(r['tasks']) + ' tasks':<44} {fmt_rate(r)}")
    say(f"{'(2) Zarr write, ' + write['compressor'] + ', ' + str(write['tasks']) + ' tasks':<44} {fmt_rate(write)}")
    for name, b in builds.items():
        phases = "  ".join(f"{k} {v:.1f} s" for k, v in phase_seconds(b).items())
        say(f"{'(3) build ' + name:<44} {fmt_rate(b)}   ({phases})")
    say("")
    # Against each read: one file a task, and the files grouped as the build's stage tasks
    # group them (the stricter where grouping makes reading faster).
    for r in reads:
        slower = min(r["events"] / r["seconds"], write["events"] / write["seconds"])
        for name, b in builds.items():
            if name.startswith("1x"):
                ratio = b["events"] / b["seconds"] / slower
                target = "  (target >= 0.5)" if "shuffle off" in name else ""
                say(f"ratio build {name} / min((1) {r['tasks']} tasks, (2)) = {ratio:.2f}{target}")
    say(f"(1) MB/s: uncompressed bytes of the branches read ({read['compressed_bytes'] / MB:.1f} MB compressed, "
        f"{read['bytes'] / MB:.1f} MB uncompressed); (2) MB/s: uncompressed image bytes "
        f"({write['bytes'] / MB:.1f} MB -> {write['stored_bytes'] / MB:.1f} MB stored, "
        f"{write['chunk_events']} events/chunk, {write['chunks_per_task']} chunks/task); "
        f"ZLIB baskets inflated by {read.get('inflate', '?')} in (1), as in the build")
    say("")
    step = results["step"]
    say(f"read.step_size = {step['config_step_size']} entries; a partition (one file) holds "
        f"{step['events_per_partition']:.0f} entries, so a step is {step['step_events']:.0f} entries = "
        f"{step['input'] / MiB:.2f} MiB of input branches + {step['images'] / MiB:.2f} MiB of images")
    say("")
    say("peak worker memory, MiB: RSS as Dask's nanny measures it (includes file-backed pages, i.e. "
        "the input ROOT files that stage tasks memory-map), and anon = RSS - shared; base = before the build")
    head = ("build", "worker", "files", "base RSS", "peak RSS", "stage RSS", "write RSS",
            "base anon", "stage anon", "write anon", "max fds")  # fmt: skip
    widths = (16, 9, 6, 9, 9, 9, 9, 9, 10, 10, 7)
    say(" ".join(f"{h:<{w}}" if i < 2 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    for name, b in builds.items():
        for worker, m in b["memory"].items():
            peaks = m["peaks"]

            def get(phase, key, peaks=peaks):
                return peaks.get(phase, {}).get(key, 0) / MiB

            row = (name.replace(" shuffle ", " shuf "), worker, b["partitions"], m["baseline_rss"] / MiB,
                   get("all", "rss"), get("stage", "rss"), get("write", "rss"), m["baseline_anon"] / MiB,
                   get("stage", "anon"), get("write", "anon"), get("all", "fds") * MiB)  # fmt: skip
            say(" ".join(f"{v:<{w}}" if i < 2 else f"{v:>{w}.0f}" for i, (v, w) in enumerate(zip(row, widths))))
    for line in lines:
        print(line)
    return lines


# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=HERE.parent / "configs" / "demo.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=False,
                        help="global shuffle in the main and the scaled build (default off); "
                             "a 1x build with the other setting always runs too")  # fmt: skip
    parser.add_argument("--scale", type=int, nargs="*", default=[2],
                        help="build larger datasets with this many times the files (e.g. --scale 2 4; none: --scale)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each 1x measurement this many times (fresh cluster each) and keep the fastest; "
                             "other processes on the machine make single runs noisy")  # fmt: skip
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between RSS samples")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config_path = args.config.resolve()
    main_name = f"1x shuffle {'on' if args.shuffle else 'off'}"
    other_name = f"1x shuffle {'off' if args.shuffle else 'on'}"

    config = load_config(config_path, work, "build.zarr", workers=args.workers, shuffle=args.shuffle)
    other = load_config(config_path, work, "build-other.zarr", workers=args.workers, shuffle=not args.shuffle)
    bigs = {
        scale: load_config(config_path, work, f"build-x{scale}.zarr", workers=args.workers, shuffle=args.shuffle,
                           extra=scaled_overrides(config, work / f"data-x{scale}", scale))
        for scale in args.scale
    }  # fmt: skip
    t0 = time.perf_counter()
    for c in (config, *bigs.values()):
        ensure_inputs(c)
    print(f"inputs ready ({time.perf_counter() - t0:.1f} s, not timed): {len(partitions(config))} files; "
          + ", ".join(f"{len(partitions(c))} files for {s}x" for s, c in bigs.items()))  # fmt: skip

    results: dict = {"builds": {}}

    def measure(label: str, run, repeat: int = args.repeat) -> dict:
        """The fastest of *repeat* runs, each on a fresh warm cluster; memory peaks: the max."""
        runs = []
        for _ in range(repeat):
            with warm_cluster(config_path, work, config, args) as client:
                load = os.getloadavg()[0]
                runs.append({**run(client), "load_before": load})
            print(f"{label:<30} {fmt_rate(runs[-1])}   (1-min load before: {load:.1f})")
        best = min(runs, key=lambda r: r["seconds"])
        best["all_seconds"] = [round(r["seconds"], 3) for r in runs]
        if "memory" in best:
            best["memory"] = merge_memory([best["memory"], *(r["memory"] for r in runs if r is not best)])
        return best

    results["read"] = measure("(1) read, one file a task", lambda client: bench_read(client, config, 1))
    grouping = build_grouping(config, args.workers)
    if grouping > 1:
        results["read_grouped"] = measure(f"(1) read, {grouping} files a task",
                                          lambda client: bench_read(client, config, grouping))
    results["builds"][main_name] = measure(f"(3) build {main_name}", lambda client: bench_build(client, config, args.interval))
    results["write"] = measure("(2) write", lambda client: bench_write(client, config, Path(config.output.path), work / "write-only.zarr"))
    results["builds"][other_name] = measure(f"(3) build {other_name}", lambda client: bench_build(client, other, args.interval))
    for scale, big in bigs.items():
        big_name = f"{scale}x shuffle {'on' if args.shuffle else 'off'}"
        results["builds"][big_name] = measure(f"(3) build {big_name}", lambda client, big=big: bench_build(client, big, args.interval), 1)

    per_partition = results["read"]["events"] / results["read"]["tasks"]
    results["step"] = {"config_step_size": config.read.step_size, "events_per_partition": per_partition,
                       **step_bytes(config, results["read"], per_partition)}  # fmt: skip
    print()
    print(f"python {' '.join(sys.argv)}   ({platform.node()}, {os.cpu_count()} cpus, {args.workers} workers)")
    results["table"] = print_tables(results, args)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
