"""Throughput and worker memory of a full ``hepdask`` build against its two halves done alone.

One run, on the same input files (the demo's generated ROOT files) and the same LocalCluster
(``hepdask.cluster.connect``, the cluster a build starts itself; start-up is never timed):

(1) raw uproot reading: one ``client.map`` task per file opens it and iterates exactly the
    branches the config names (``hits`` + ``event``) with the config's ``read.step_size``, as
    ``sources.read`` does, but without selection, binning or staging; events/s and MB/s of
    uncompressed branch bytes.
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

Before every measured build the workers are restarted (so one build's freed-but-retained
memory does not show up in the next one's peak) and warmed up: every worker processes one
partition (numba compilation, imports), then a tiny 2-file build runs on the cluster.

    python benchmarks/bench_build.py [--config configs/demo.yaml] [--workers 2]
        [--shuffle/--no-shuffle] [--scale 2] [--work-dir benchmarks/_work]
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
            for name in (phase(), "all"):
                peak = peaks.setdefault(name, {"rss": 0, "anon": 0, "fds": 0})
                for key, value in values.items():
                    peak[key] = max(peak[key], value)
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


def restart_and_warm(client, config_path: Path, work_dir: Path, config, args) -> None:
    """Fresh worker processes, warmed up: one partition each, then a tiny 2-file build."""
    import hepdask
    from hepdask import build

    client.restart()
    client.wait_for_workers(args.workers)
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


def _read_file(path: str, tree_name: str, branches: list[str], step_size: int) -> tuple[int, int, int]:
    """Read *branches* of one file in steps, as sources.read does; (events, uncompressed, compressed bytes)."""
    import uproot

    events = 0
    with uproot.open(path) as file:
        tree = file[tree_name]
        for arrays in tree.iterate(branches, step_size=step_size, library="ak", how=dict):
            events += len(arrays[branches[0]])
        unzipped = sum(int(tree[b].uncompressed_bytes) for b in branches)
        zipped = sum(int(tree[b].compressed_bytes) for b in branches)
    return events, unzipped, zipped


def bench_read(client, config) -> dict:
    from distributed import wait

    from hepdask import sources

    branches = sources.branches_needed(dict(config.hits), dict(config.event))
    files = [p.file for p in partitions(config)]
    t0 = time.perf_counter()
    futures = client.map(_read_file, files, tree_name=config.tree, branches=branches,
                         step_size=config.read.step_size, pure=False)  # fmt: skip
    wait(futures)
    results = client.gather(futures)
    seconds = time.perf_counter() - t0
    events, unzipped, zipped = (sum(r[i] for r in results) for i in range(3))
    return {"events": events, "bytes": unzipped, "compressed_bytes": zipped, "seconds": seconds,
            "tasks": len(files), "branches": branches}  # fmt: skip


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
    per_chunk = build.chunk_events(config, layout)
    spec = store.ArraySpec(str(image.dtype), tuple(image.shape[1:]))
    sizes = {s: source[s]["image"].shape[0] for s in splits}
    shutil.rmtree(target, ignore_errors=True)
    store.prepare(target, sizes, {"image": spec}, {"image": layout.dims}, [], chunk_events=per_chunk,
                  compressor=(config.output.compressor.name, config.output.compressor.level), attrs={})  # fmt: skip

    # One task per run of whole chunks, grouped exactly as the build groups its write tasks.
    ranges = {s: store.chunk_ranges(n, per_chunk) for s, n in sizes.items()}
    n_workers = len(client.scheduler_info()["workers"])
    group = build._chunks_per_task(sum(map(len, ranges.values())), per_chunk * spec.itemsize, n_workers)
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


def fmt_rate(result: dict) -> str:
    eps = result["events"] / result["seconds"]
    mbs = f"{result['bytes'] / MB / result['seconds']:8.1f}" if "bytes" in result else "       -"
    return f"{result['events']:>9,d}  {result['seconds']:8.2f}  {eps:>10,.0f}  {mbs}"


def print_tables(results: dict, args) -> list[str]:
    lines = []
    say = lines.append
    read, write, builds = results["read"], results["write"], results["builds"]
    say(f"{'measurement':<44} {'events':>9}  {'wall s':>8}  {'events/s':>10}  {'MB/s':>8}")
    say(f"{'(1) uproot read, ' + str(len(read['branches'])) + ' branches, ' + str(read['tasks']) + ' tasks':<44} {fmt_rate(read)}")
    say(f"{'(2) Zarr write, ' + write['compressor'] + ', ' + str(write['tasks']) + ' tasks':<44} {fmt_rate(write)}")
    for name, b in builds.items():
        say(f"{'(3) build ' + name:<44} {fmt_rate(b)}")
    slower = min(read["events"] / read["seconds"], write["events"] / write["seconds"])
    say("")
    for name, b in builds.items():
        if name.startswith("1x"):
            ratio = b["events"] / b["seconds"] / slower
            target = "  (target >= 0.5)" if "shuffle off" in name else ""
            say(f"ratio build {name} / min((1), (2)) = {ratio:.2f}{target}")
    say(f"(1) MB/s: uncompressed bytes of the branches read ({read['compressed_bytes'] / MB:.1f} MB compressed, "
        f"{read['bytes'] / MB:.1f} MB uncompressed); (2) MB/s: uncompressed image bytes "
        f"({write['bytes'] / MB:.1f} MB -> {write['stored_bytes'] / MB:.1f} MB stored, "
        f"{write['chunk_events']} events/chunk, {write['chunks_per_task']} chunks/task)")
    say("")
    step = results["step"]
    say(f"read.step_size = {step['config_step_size']} entries; a partition (one file) holds "
        f"{step['events_per_partition']:.0f} entries, so a step is {step['step_events']:.0f} entries = "
        f"{step['input'] / MiB:.2f} MiB of input branches + {step['images'] / MiB:.2f} MiB of images")
    say("")
    say(f"{'peak worker memory (MiB)':<30} {'worker':<9} {'files':>6} {'baseline':>9} {'peak RSS':>9} "
        f"{'stage RSS':>9} {'write RSS':>9} {'peak anon':>9} {'stage anon':>10} {'write anon':>10} {'max fds':>7}")
    for name, b in builds.items():
        for worker, m in b["memory"].items():
            p = m["peaks"]
            get = lambda phase, key: p.get(phase, {}).get(key, 0) / MiB  # noqa: E731
            say(f"{name:<30} {worker:<9} {b['partitions']:>6} {m['baseline_rss'] / MiB:>9.0f} {get('all', 'rss'):>9.0f} "
                f"{get('stage', 'rss'):>9.0f} {get('write', 'rss'):>9.0f} {get('all', 'anon'):>9.0f} "
                f"{get('stage', 'anon'):>10.0f} {get('write', 'anon'):>10.0f} {int(p.get('all', {}).get('fds', 0)):>7}")
    say("RSS includes file-backed pages (the staged files the write tasks memory-map); anon = RSS - shared.")
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
    parser.add_argument("--scale", type=int, default=2, help="the larger dataset has this many times the files")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work")
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
    big_extra = scaled_overrides(config, work / f"data-x{args.scale}", args.scale)
    big = load_config(config_path, work, f"build-x{args.scale}.zarr", workers=args.workers, shuffle=args.shuffle,
                      extra=big_extra)  # fmt: skip
    t0 = time.perf_counter()
    ensure_inputs(config)
    ensure_inputs(big)
    print(f"inputs ready ({time.perf_counter() - t0:.1f} s, not timed): {len(partitions(config))} files, "
          f"{len(partitions(big))} files for the {args.scale}x dataset")  # fmt: skip

    from hepdask import cluster

    results: dict = {"builds": {}}
    with cluster.connect(config.cluster) as client:
        client.wait_for_workers(args.workers)
        restart_and_warm(client, config_path, work, config, args)
        results["read"] = bench_read(client, config)
        print(f"(1) read   {fmt_rate(results['read'])}")

        restart_and_warm(client, config_path, work, config, args)
        results["builds"][main_name] = bench_build(client, config, args.interval)
        print(f"(3) build  {fmt_rate(results['builds'][main_name])}  [{main_name}]")

        restart_and_warm(client, config_path, work, config, args)
        results["write"] = bench_write(client, config, Path(config.output.path), work / "write-only.zarr")
        print(f"(2) write  {fmt_rate(results['write'])}")

        restart_and_warm(client, config_path, work, config, args)
        results["builds"][other_name] = bench_build(client, other, args.interval)
        print(f"(3) build  {fmt_rate(results['builds'][other_name])}  [{other_name}]")

        big_name = f"{args.scale}x shuffle {'on' if args.shuffle else 'off'}"
        restart_and_warm(client, config_path, work, config, args)
        results["builds"][big_name] = bench_build(client, big, args.interval)
        print(f"(3) build  {fmt_rate(results['builds'][big_name])}  [{big_name}]")

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
