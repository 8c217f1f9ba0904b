"""hepdask against KM3NeT's OrcaSong on the real km3net-testdata files: are the images the
same, event by event, and how many events/s does each whole workflow make from the ROOT file?

OrcaSong runs in a separate virtualenv (it pulls km3pipe), through
``benchmarks/orcasong_reference.py``; make one with

    python3 -m venv VENV && VENV/bin/pip install orcasong km3net-testdata

and run

    python benchmarks/bench_orcasong.py --orcasong-python VENV/bin/python
        [--copies 100] [--repeat 3] [--orcasong-repeat 1] [--workers N] [--work-dir benchmarks/_work/orcasong]

(1) Images. ``configs/km3net-mu-vs-nu.yaml`` makes two images per event: z-t of one string
    (``image``) and x-y-z-t of the detector (``image_xyzt``). For every file of both samples,
    hepdask builds a store from that file alone (the config, with shuffle off and one split);
    OrcaSong converts it with ``h5extractf`` and bins it with ``FileBinner``, once per image
    (the same detector file, ``center_time``, time-slewing correction, edges
    ``numpy.linspace(lo, hi, bins + 1)`` of the image's axes; for z-t a DU filter after the
    time centring). Images are matched by ROOT entry and compared exactly.
    The x-y-z-t config centres each detector at x = y = 0. OrcaSong's ``center_hits_to``
    fails on detx v4/v5 files (km3pipe's ``Detector.dom_table`` cannot unpack their DOM
    records), so for such a detector both tools run uncentred with the x and y ranges moved
    by the detector centre; for the v2 detector both centre.
(2) Speed, in the same run: events/s = ROOT entries / wall seconds of the whole workflow.
    hepdask: the ``hepdask build-dataset`` command (a fresh process: imports, cluster start,
    build, finalised store), unshuffled and shuffled; and, like for like with OrcaSong's
    in-process figure, ``hepdask.build_dataset`` timed inside a fresh process after its
    imports (``INPROCESS``). OrcaSong: ``h5extractf`` +
    ``FileBinner`` per file, then ``orcasong concatenate`` (several files) and ``orcasong
    h5shuffle2``, timed inside its process (interpreter and imports not counted), with the
    tools run as OrcaSong's docs say (command line tools, ``cli``) and in-process (their
    functions, ``inprocess``). Reported twice from the same OrcaSong runs: binned files
    (conversion + binning) against hepdask unshuffled, and the whole workflow to one
    shuffled training file against hepdask shuffled. Once on the single neutrino file, once
    on ``--copies`` copies of it (symlinks) as one dataset. Best of ``--repeat`` /
    ``--orcasong-repeat`` runs. With one OrcaSong run, its whole process (interpreter,
    imports, run, saving) is timed too, the like-for-like figure to hepdask's whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "configs" / "km3net-mu-vs-nu.yaml"


def resolved_samples(config_path: Path) -> list[dict]:
    """The config's samples with their files and detector resolved to real paths."""
    from hepdask.config import load

    config = load(config_path)
    return [{"name": s.name, "label": s.label, "files": list(s.files), "geometry": s.geometry or config.geometry.file}
            for s in config.samples]


def file_config(sample: dict, files: list[str], out: Path, workers: int | None, *, centre: bool) -> tuple[dict, dict]:
    """The config for *files* of *sample* alone, and OrcaSong's bin_edges_list per image array.

    Without *centre* (a detx v4/v5 detector) the x and y ranges move to the detector's frame.
    """
    from hepdask import geometry

    raw = yaml.safe_load(CONFIG.read_text())
    raw["samples"] = [{"name": sample["name"], "label": sample["label"], "files": files,
                       "geometry": sample["geometry"]}]
    raw["output"].update(path=str(out), split={"train": 1.0}, shuffle=False, overwrite=True)
    if workers is not None:
        raw.setdefault("cluster", {})["workers"] = workers
    images = {"image": raw["image"], **{f"image_{k}": v for k, v in (raw.get("images") or {}).items()}}
    if raw["geometry"].get("centre") and not centre:
        middle = geometry.read_detx(sample["geometry"]).centre()
        target = raw["geometry"]["centre"]
        for image in images.values():
            for axis in image["axes"]:
                for i, name in enumerate(("pos_x", "pos_y", "pos_z")):
                    if axis["field"] == name and target[i] is not None:
                        lo, hi = axis["range"]
                        axis["range"] = [float(lo + middle[i] - target[i]), float(hi + middle[i] - target[i])]
        raw["geometry"]["centre"] = None
    edges = {array: [[a["field"], np.linspace(a["range"][0], a["range"][1], a["bins"] + 1).tolist()]
                     for a in image["axes"]] for array, image in images.items()}
    return raw, edges


def image_section(raw: dict, array: str) -> dict:
    return raw["image"] if array == "image" else raw["images"][array[len("image_"):]]


def du_of(image: dict) -> int | None:
    cut = image.get("hits")
    if not cut:
        return None
    field, op, value = cut.split("#")[0].split()
    if field != "du" or op != "==":
        msg = f"unexpected hit cut {cut!r}: this benchmark mirrors only 'du == N' in OrcaSong"
        raise SystemExit(msg)
    return int(value)


#: hepdask's build timed inside its process, as OrcaSong's in-process runs are: the build
#: stack is imported and the config loaded first (not timed), then ``hepdask.build_dataset``
#: (cluster start, build, finalised store, cluster close) is timed.
INPROCESS = textwrap.dedent("""
    import sys, time
    import hepdask, hepdask.build, hepdask.cluster
    config = hepdask.load_config(sys.argv[1])
    started = time.perf_counter()
    hepdask.build_dataset(config, progress=False)
    print(time.perf_counter() - started)
""")


def hepdask_command() -> list[str]:
    """The ``hepdask`` console script of this interpreter's environment (not a version
    manager's shim in front of it, which costs ~0.1 s a call), or the module."""
    script = Path(sys.executable).with_name("hepdask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hepdask.cli"]


def run_hepdask(raw: dict, config_path: Path, repeat: int) -> dict:
    """Best of *repeat*: the whole ``hepdask build-dataset`` process, and the build timed
    inside a process of its own (``INPROCESS``)."""
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    walls, inside = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run([*hepdask_command(), "build-dataset", str(config_path), "--no-progress"],
                              capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"hepdask build failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        done = subprocess.run([sys.executable, "-c", INPROCESS, str(config_path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"hepdask build in process failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        inside.append(float(done.stdout.split()[-1]))
    return {"walls_s": walls, "best_s": min(walls), "inprocess_s": inside, "best_inprocess_s": min(inside)}


def run_orcasong(python: str, files: list[str], detx: str, edges: list, du: int | None, centre: list | None,
                 out: Path, repeat: int, convert: str, *, postprocess: bool = False) -> dict:
    edges_path = out.with_suffix(".edges.json")
    edges_path.write_text(json.dumps(edges))
    command = [python, str(HERE / "orcasong_reference.py"), "--root", *files, "--detx", detx,
               "--edges", str(edges_path), "--out", str(out), "--repeat", str(repeat), "--convert", convert,
               "--workdir", str(out.parent / (out.stem + "-h5"))]
    if du is not None:
        command += ["--du", str(du)]
    if postprocess:
        command.append("--postprocess")
    if centre is not None:
        command += ["--center", *("none" if c is None else str(c) for c in centre)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    process_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"OrcaSong failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with np.load(out) as npz:
        return {**{key: npz[key] for key in npz.files}, "process_s": process_s}


def compare(store: Path, array: str, files: list[str], reference: dict) -> dict:
    """Match images by (file, ROOT entry); count identical and differing events."""
    import hepdask

    ds = hepdask.open_dataset(store, "train")
    mine = {(str(f), int(e)): i for i, (f, e) in enumerate(zip(ds.source_file.values, ds.entry.values))}
    images = ds[array].values
    theirs = {(files[int(k)], int(e)): i for i, (k, e) in enumerate(zip(reference["file_index"], reference["entry"]))}
    same, differ = 0, []
    for key, j in theirs.items():
        if key not in mine:
            continue
        a = images[mine[key]].astype(np.int64)
        b = reference["images"][j].astype(np.int64)
        if a.shape == b.shape and np.array_equal(a, b):
            same += 1
        else:
            differ.append({"entry": key[1], "max_abs_diff": int(np.abs(a - b).max()) if a.shape == b.shape else None})
    return {
        "events_hepdask": len(mine), "events_orcasong": len(theirs), "identical": same, "different": differ,
        "only_hepdask": sorted(k[1] for k in set(mine) - set(theirs)),
        "only_orcasong": sorted(k[1] for k in set(theirs) - set(mine)),
        "hits_in_images": int(images.sum(dtype=np.int64)),
    }


def images_part(args, work: Path) -> list[dict]:
    from hepdask import geometry

    results = []
    for sample in resolved_samples(CONFIG):
        version = geometry.read_detx(sample["geometry"]).version
        centre = version is not None and version < 4
        for file in sample["files"]:
            tag = f"{sample['name']}-{Path(file).name[:24]}"
            out = work / f"{tag}.zarr"
            raw, edges = file_config(sample, [file], out, args.workers, centre=centre)
            run_hepdask(raw, work / f"{tag}.yaml", 1)
            for array, array_edges in edges.items():
                reference = run_orcasong(args.orcasong_python, [file], sample["geometry"], array_edges,
                                         du_of(image_section(raw, array)), raw["geometry"].get("centre"),
                                         work / f"{tag}-{array}.npz", 1, "cli")
                result = {"array": array, "sample": sample["name"], "file": Path(file).name,
                          "detector": Path(sample["geometry"]).name, "centred": bool(raw["geometry"].get("centre")),
                          **compare(out, array, [file], reference)}
                results.append(result)
                print(f"{array:10s} {sample['name']:9s} {Path(file).name[:48]:48s} identical {result['identical']}/"
                      f"{result['events_orcasong']} (hepdask {result['events_hepdask']}), differing {len(result['different'])}",
                      flush=True)
    return results


def speed_part(args, work: Path) -> list[dict]:
    sample = next(s for s in resolved_samples(CONFIG) if s["name"] == "neutrino")
    source = sample["files"][0]
    copies_dir = work / "copies"
    shutil.rmtree(copies_dir, ignore_errors=True)
    copies_dir.mkdir(parents=True)
    copies = []
    for i in range(args.copies):
        link = copies_dir / f"copy_{i:04d}_{Path(source).name}"
        link.symlink_to(source)
        copies.append(str(link))
    import uproot

    with uproot.open(source) as f:
        entries = int(f["E"].num_entries)
    results = []
    for label, files in (("single file", [source]), (f"{args.copies} copies", copies)):
        out = work / f"speed-{len(files)}.zarr"
        raw, edges = file_config(sample, files, out, args.workers, centre=False)
        raw.pop("images", None)  # the speed run makes the z-t image only, in both tools
        mine = run_hepdask(raw, work / f"speed-{len(files)}.yaml", args.repeat)
        # The training file: shuffled, as OrcaSong's h5shuffle2 makes it.
        shuffled = {**raw, "output": {**raw["output"], "shuffle": {"seed": 42}}}
        mine_shuffled = run_hepdask(shuffled, work / f"speed-{len(files)}-shuffled.yaml", args.repeat)
        n = entries * len(files)
        row = {"input": label, "events": n, "hepdask_s": mine["best_s"], "hepdask_events_per_s": n / mine["best_s"],
               "hepdask_shuffled_s": mine_shuffled["best_s"], "hepdask_inprocess_s": mine["best_inprocess_s"],
               "hepdask_shuffled_inprocess_s": mine_shuffled["best_inprocess_s"]}
        for convert in ("cli", "inprocess"):
            reference = run_orcasong(args.orcasong_python, files, sample["geometry"], edges["image"],
                                     du_of(raw["image"]), None,
                                     work / f"speed-{len(files)}-{convert}.npz", args.orcasong_repeat, convert,
                                     postprocess=True)
            timings = json.loads(str(reference["timings"]))
            # Binned files (h5extractf + FileBinner) against hepdask unshuffled; the whole
            # workflow to one shuffled training file (+ concatenate + h5shuffle2) against
            # hepdask shuffled. Both from the same OrcaSong runs.
            run = min(timings["runs"], key=lambda r: r["total_s"])
            binned = run["convert_s"] + run["bin_s"]
            row[f"orcasong_{convert}_s"] = binned
            row[f"orcasong_{convert}_events_per_s"] = n / binned
            row[f"speedup_vs_{convert}"] = binned / mine["best_s"]
            row[f"orcasong_{convert}_workflow_s"] = run["total_s"]
            row[f"speedup_vs_{convert}_workflow"] = run["total_s"] / mine_shuffled["best_s"]
            if convert == "inprocess":
                # Both timed inside their processes (interpreter and imports not counted).
                row["speedup_inprocess_vs_inprocess"] = binned / mine["best_inprocess_s"]
                row["speedup_inprocess_vs_inprocess_workflow"] = run["total_s"] / mine_shuffled["best_inprocess_s"]
            if args.orcasong_repeat == 1:
                # The whole OrcaSong process (interpreter, imports, one run with its
                # post-processing, saving), as hepdask's figure is its whole process.
                row[f"orcasong_{convert}_process_s"] = reference["process_s"]
                row[f"speedup_vs_{convert}_process"] = reference["process_s"] / mine_shuffled["best_s"]
            row["orcasong_versions"] = json.loads(str(reference["versions"]))
        results.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "orcasong_versions"}), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orcasong-python", required=True, help="python of a virtualenv with orcasong installed")
    parser.add_argument("--copies", type=int, default=100, help="copies of the neutrino file for the speed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed hepdask runs (best is kept)")
    parser.add_argument("--orcasong-repeat", type=int, default=1, help="timed OrcaSong runs (best is kept)")
    parser.add_argument("--workers", type=int, default=None,
                        help="hepdask LocalCluster worker processes (default: the config's; hepdask then builds "
                             "a few small files in its own process and more on one worker process per core)")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "orcasong")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "args": vars(args) | {"work_dir": str(work)}}
    if not args.skip_images:
        report["images"] = images_part(args, work)
    if not args.skip_speed:
        report["speed"] = speed_part(args, work)
    (work / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
