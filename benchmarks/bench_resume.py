"""How long a resumed build takes after a SIGKILL, against a clean build of the same config.

    python benchmarks/bench_resume.py [--config configs/demo.yaml] [--kill-at 0.5] [--repeat 2] [--scale 8]

1. A clean `hepdask build-dataset` (the CLI, in a subprocess: start-up, LocalCluster and all).
2. The same command, killed with SIGKILL (the whole process group: client and workers) at
   `--kill-at` of the clean build's wall time.
3. The same command again: it resumes from the staging area. Its wall time is compared with
   the clean build's (target: at most 60 %), and its chunks with the clean build's (identical).

``--scale N`` builds a dataset N times the config's (its generated samples get N times the
files, generated into the work dir first, not timed). A resume at a fraction f of a clean
build of wall time T costs about (1 - f) T + F, where F is what every run pays whatever its
size (interpreter, imports, LocalCluster start and shut-down), so the ratio depends on T.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chunk_hashes(path: Path) -> dict[str, str]:
    hashes = {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != "zarr.json" and not f.name.endswith(".partial")
    }
    assert hashes, f"no chunk files under {path}"
    return hashes


def command(config: Path, output: Path, *extra: str, overrides: tuple[str, ...] = ()) -> list[str]:
    sets = [arg for override in overrides for arg in ("--set", override)]
    return [sys.executable, "-m", "hepdask.cli", "build-dataset", str(config), "--no-progress",
            "--output", str(output), *sets, *extra]


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def staged(output: Path) -> int:
    from hepdask import store

    staging = store.staging_path(output)
    return sum(1 for p in staging.glob(f"p*{store.PART_SUFFIX}") if store.load_staged(staging, p.stem) is not None)


def killed_run(cmd: list[str], after: float, output: Path) -> tuple[float, int]:
    process = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL)
    time.sleep(after)
    if process.poll() is not None:
        msg = f"the build finished before the kill at {after:.1f} s; lower --kill-at"
        raise SystemExit(msg)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return after, staged(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the clean build's wall time")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "_work" / "resume"))
    parser.add_argument("--scale", type=int, default=1, help="build a dataset this many times the config's")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config = Path(args.config)
    clean_out, resumed_out = work / "clean.zarr", work / "resumed.zarr"
    overrides: tuple[str, ...] = ()
    if args.scale > 1:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_build import scaled_overrides

        from hepdask.config import load

        overrides = tuple(scaled_overrides(load(config), work / f"data-x{args.scale}", args.scale))

    def build(output: Path, *extra: str) -> list[str]:
        return command(config, output, *extra, overrides=overrides)

    # Generate the inputs (if the config generates them) and warm numba's cache: not timed.
    run(build(work / "warm.zarr", "--overwrite"))
    shutil.rmtree(work / "warm.zarr", ignore_errors=True)

    rows = []
    for attempt in range(args.repeat):
        clean = run(build(clean_out, "--overwrite"))
        for path in (resumed_out, resumed_out.with_name(resumed_out.name + ".hepdask-staging")):
            shutil.rmtree(path, ignore_errors=True)
        killed_after, staged_at_kill = killed_run(build(resumed_out), args.kill_at * clean, resumed_out)
        resumed = run(build(resumed_out))
        identical = chunk_hashes(clean_out) == chunk_hashes(resumed_out)
        rows.append((attempt + 1, clean, killed_after, staged_at_kill, resumed, resumed / clean, identical))

    print(f"config {config} x{args.scale}, kill at {args.kill_at:.0%} of the clean build's wall time, {os.cpu_count()} cores")
    print("| run | clean build s | killed after s | partitions staged at the kill | resumed build s | resumed / clean | chunks identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for run_id, clean, killed_after, staged_at_kill, resumed, ratio, identical in rows:
        print(f"| {run_id} | {clean:.1f} | {killed_after:.1f} | {staged_at_kill} | {resumed:.1f} | {ratio:.2f} | {identical} |")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
