"""What the KM3NeT calibration join adds to a build: kernel throughput, and its time beside
reading the same files.

    python benchmarks/bench_calibration.py [--config configs/km3net-mu-vs-nu.yaml]
        [--hits 10000000] [--repeat 5]

(1) Kernels, on the real hit order of the config's files (the (dom_id, channel_id) stream of
    every file, tiled to ``--hits`` hits): ``geometry.join`` (hash lookup of the channel and
    gather of the detector's 11 value columns), ``geometry.calibrated_time`` (t + t0 - slewing)
    and ``geometry.first_triggered_time``; Mhits/s, best of ``--repeat``, one thread.
(2) In a build's terms: for every file of the config, ``sources.read`` of the configured
    branches alone, then the join + calibrated time + time reference on what was read;
    the calibration's time as a fraction of the read time.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE.parent / "configs" / "km3net-mu-vs-nu.yaml")
    parser.add_argument("--hits", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    from hepdask import build, geometry, sources
    from hepdask.config import load

    config = load(args.config)
    job = build.Job.from_config(config)
    spec = config.geometry
    keys = spec.key_map()
    partitions = sources.plan([(s.name, s.label, s.files) for s in config.samples])

    print(f"python {platform.python_version()}, {platform.machine()}; config {args.config.name}")
    streams = []
    read_s = calib_s = 0.0
    n_hits = 0
    for partition in partitions:
        detector = job.detector(partition.sample)
        started = time.perf_counter()
        steps = list(sources.read(partition, job.tree, job.hits, job.events, job.step_size))
        read_s += time.perf_counter() - started
        for step in steps:
            hits = step.hits
            geometry.join(detector, [hits[keys[k]] for k in detector.keys])  # compile / warm up

            def calibrate(hits=hits, step=step, detector=detector):
                joined, _ = geometry.join(detector, [hits[keys[k]] for k in detector.keys])
                time_ = geometry.calibrated_time(hits[spec.time], joined["t0"], hits[spec.tot])
                geometry.first_triggered_time(step.offsets, time_, hits[config.time.triggered])

            calib_s += best_of(args.repeat, calibrate)
            n_hits += hits[spec.time].size
            streams.append((detector, hits, step.offsets))
    print(f"(2) {len(partitions)} files, {n_hits:,} hits: read {read_s * 1e3:.1f} ms, calibration "
          f"{calib_s * 1e3:.2f} ms = {calib_s / read_s:.1%} of the read")

    detector, hits, _ = max(streams, key=lambda s: s[1][spec.time].size)
    reps = max(1, args.hits // hits[spec.time].size)
    key_values = [np.tile(np.asarray(hits[keys[k]]), reps) for k in detector.keys]
    t = np.tile(hits[spec.time], reps)
    tot = np.tile(hits[spec.tot], reps)
    trig = np.tile(hits[config.time.triggered], reps)
    n = t.size
    offsets = np.arange(0, n + 1, 128, dtype=np.int64)
    offsets[-1] = n
    joined, _ = geometry.join(detector, key_values)
    join_s = best_of(args.repeat, lambda: geometry.join(detector, key_values))
    time_s = best_of(args.repeat, lambda: geometry.calibrated_time(t, joined["t0"], tot))
    calibrated = geometry.calibrated_time(t, joined["t0"], tot)
    first_s = best_of(args.repeat, lambda: geometry.first_triggered_time(offsets, calibrated, trig))
    print(f"(1) {n:,} hits in real order ({Path(detector.path).name}, {detector.n_rows:,} channels, "
          f"{len(detector.fields)} columns): join {n / join_s / 1e6:.1f} Mhits/s, calibrated time "
          f"{n / time_s / 1e6:.1f} Mhits/s, first triggered time {n / first_s / 1e6:.1f} Mhits/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
