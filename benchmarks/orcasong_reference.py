#!/usr/bin/env python3
"""Reference runner of KM3NeT OrcaSong's documented image workflow.

Run this with the python of a SEPARATE virtualenv that has OrcaSong
installed (it does not import hepdask), e.g.::

    python3 -m venv /work/venvs/orcasong
    /work/venvs/orcasong/bin/pip install orcasong km3net-testdata
    /work/venvs/orcasong/bin/python benchmarks/orcasong_reference.py \\
        --root FILE.root [FILE2.root ...] --detx FILE.detx --edges EDGES.json \\
        --out OUT.npz [--du N] [--center X Y Z] [--workdir DIR] [--repeat K] \\
        [--convert cli|inprocess] [--postprocess]

Several ROOT files are processed one after the other in one process, as
``FileBinner.run_multi`` does (one converted h5 and one image h5 each).

The workflow is the one of OrcaSong's docs (docs/getting_started.rst):

1. ROOT -> h5 with km3pipe's ``h5extractf FILE.root`` (``-o`` sets the
   output); ``--convert inprocess`` calls the same function
   (``km3pipe.utils.h5extractf.h5extractf``) without the interpreter and
   import start-up of the command line tool.
2. ``orcasong.core.FileBinner(bin_edges_list, det_file=DETX,
   center_time=True, add_bin_stats=False)`` with the default
   ``correct_timeslew=True`` -> ``.run(h5, out_h5)``.
3. With ``--postprocess``, the rest of the documented workflow that turns
   binned files into one training file: ``orcasong concatenate F1 F2 ...
   --outfile C.h5`` when there is more than one file, then ``orcasong
   h5shuffle2 C.h5 --output_file S.h5`` (its default seed, 42). With
   ``--convert inprocess`` both run as their functions
   (``orcasong.tools.concatenate.concatenate``,
   ``orcasong.tools.shuffle2.h5shuffle2``) in this process.

OrcaSong's pipeline is HDF5Pump -> [MCTimeCorrector, only if mc_hits and
mc_tracks exist; touches mc hits/tracks only] -> DetApplier (calibration:
time += t0, time -= slew(tot), positions/du/floor from the detx) ->
TimePreproc (time -= min calibrated time of the hits with triggered != 0)
-> ImageMaker (np.histogramdd(...).astype(uint8)) -> McInfoMaker -> Keep
-> HDF5Sink.

Two small additions, both through OrcaSong's own hooks:

* an ``extractor`` (OrcaSong's label hook, stored as the ``y`` table)
  that records the input ``EventInfo.group_id`` (h5extractf sets it to the
  ROOT entry index) and ``event_id``, so every image maps back to its
  ROOT entry; HDF5Sink renumbers its own group_id, so that one can't be
  used.
* with ``--du N``: a one-line km3pipe Module put at the head of
  ``get_cmpts_main`` (i.e. AFTER DetApplier and TimePreproc, BEFORE
  ImageMaker) that keeps only hits with ``du == N``. The time centring
  therefore still uses the first triggered hit of the whole event (all
  DUs), as without the filter.

``--center X Y Z`` (``none`` for an axis left alone) is FileBinner's
``center_hits_to``.

The .npz written holds ``images`` (the ``x`` dataset as OrcaSong stores it,
uint8, shape (n_events, *bins)), ``file_index`` (which --root file),
``entry`` (ROOT entry of each image),
``event_id``, ``dropped_entries`` (ROOT entries without an image),
``edges``/``timings``/``versions``/``config`` as JSON strings.

Only stdlib, numpy, h5py and OrcaSong (with its km3pipe) are imported.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import h5py
import numpy as np

KEY_PACKAGES = (
    "orcasong", "km3pipe", "km3io", "km3net-testdata", "thepipe", "numpy",
    "h5py", "tables", "awkward", "uproot", "numba",
)


def versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_edges(path):
    with open(path) as f:
        spec = json.load(f)
    edges = []
    for name, values in spec:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1 or len(arr) < 2 or np.any(np.diff(arr) <= 0):
            raise ValueError(f"bad edges for {name!r}: need increasing 1-D list")
        edges.append([str(name), arr])
    return edges


def convert(root, h5, mode):
    """ROOT -> h5 with km3pipe's h5extractf (OrcaSong docs, step 1)."""
    if os.path.exists(h5):
        os.remove(h5)
    if mode == "cli":
        exe = os.path.join(os.path.dirname(sys.executable), "h5extractf")
        cmd = [exe, "-o", h5, root] if os.path.exists(exe) else [
            sys.executable, "-m", "km3pipe.utils.h5extractf", "-o", h5, root]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.stderr.write(res.stdout + res.stderr)
            raise RuntimeError(f"h5extractf failed ({res.returncode})")
    else:
        from km3pipe.utils.h5extractf import h5extractf

        h5extractf(root, h5)


def _orcasong_command(mode, args, function):
    """Run an ``orcasong`` sub-command as its command line tool or as *function*."""
    if mode == "cli":
        exe = os.path.join(os.path.dirname(sys.executable), "orcasong")
        res = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.stderr.write(res.stdout + res.stderr)
            raise RuntimeError(f"orcasong {args[0]} failed ({res.returncode})")
    else:
        function()


def postprocess(binned, workdir, stem, mode):
    """concatenate (more than one file) + h5shuffle2: the training file of the workflow.
    Returns (concatenate seconds, shuffle seconds, path of the shuffled file)."""
    t0 = time.perf_counter()
    if len(binned) > 1:
        combined = os.path.join(workdir, f"{stem}.concatenated.h5")
        if os.path.exists(combined):
            os.remove(combined)

        def concatenate():
            from orcasong.tools.concatenate import concatenate as run

            run(list(binned), outfile=combined)

        _orcasong_command(mode, ["concatenate", *binned, "--outfile", combined], concatenate)
    else:
        combined = binned[0]
    t1 = time.perf_counter()
    shuffled = os.path.join(workdir, f"{stem}.shuffled.h5")
    if os.path.exists(shuffled):
        os.remove(shuffled)

    def shuffle():
        from orcasong.tools.shuffle2 import h5shuffle2

        h5shuffle2(combined, output_file=shuffled)

    _orcasong_command(mode, ["h5shuffle2", combined, "--output_file", shuffled], shuffle)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, shuffled


def _entry_extractor(blob):
    """OrcaSong extractor: which input event this image came from."""
    info = blob["EventInfo"]
    return {
        "root_entry": int(info.group_id[0]),
        "event_id": int(info.event_id[0]),
    }


def make_binner(edges, detx, du, center=None):
    import km3pipe as kp
    import orcasong.core

    class DUFilter(kp.Module):
        """Keep only hits of one detection unit (after calibration)."""

        def configure(self):
            self.du = int(self.require("du"))

        def process(self, blob):
            hits = blob["Hits"]
            blob["Hits"] = hits[hits.du == self.du]
            return blob

    class DUFileBinner(orcasong.core.FileBinner):
        def __init__(self, *args, du=None, **kwargs):
            self.du = du
            super().__init__(*args, **kwargs)

        def get_cmpts_main(self):
            cmpts = list(super().get_cmpts_main())
            if self.du is not None:
                # after DetApplier + TimePreproc (get_cmpts_pre), before ImageMaker
                cmpts.insert(0, (DUFilter, {"du": self.du}))
            return cmpts

    binner = DUFileBinner(
        edges,
        du=du,
        det_file=detx,
        center_time=True,
        add_bin_stats=False,
        extractor=_entry_extractor,
        center_hits_to=center,
    )
    binner.n_statusbar = None
    binner.n_memory_observer = None
    return binner


def read_output(out_h5, conv_h5):
    with h5py.File(out_h5, "r") as f:
        images = f["x"][()]
        y = f["y"][()]
    entry = np.asarray(y["root_entry"]).astype(np.int64)
    event_id = np.asarray(y["event_id"]).astype(np.int64)
    with h5py.File(conv_h5, "r") as f:
        info = f["event_info"][()]
        n_root = len(f["group_info"])
    # cross-check: the input event_info row of that group_id has that event_id
    gid = np.asarray(info["group_id"]).astype(np.int64)
    if not np.array_equal(gid, np.arange(len(gid))):
        raise RuntimeError("h5extractf group_id is not the ROOT entry index")
    if not np.array_equal(np.asarray(info["event_id"])[entry], event_id):
        raise RuntimeError("entry/event_id mismatch between output and input")
    dropped = np.setdiff1d(np.arange(n_root), entry)
    return images, entry, event_id, dropped, n_root


def _center(values):
    if values is None:
        return None
    return tuple(None if v.lower() == "none" else float(v) for v in values)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, nargs="+", help="offline (aanet) ROOT file(s)")
    p.add_argument("--detx", required=True, help="detector .detx file")
    p.add_argument("--edges", required=True,
                   help='JSON: [["pos_z", [edges...]], ["time", [edges...]], ...]')
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--du", type=int, default=None,
                   help="keep only hits of this DU (after calibration/centring)")
    p.add_argument("--center", nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="FileBinner center_hits_to; 'none' leaves an axis alone")
    p.add_argument("--workdir", default=None,
                   help="where the h5 files go (default: next to --out)")
    p.add_argument("--repeat", type=int, default=1, help="repeat K times")
    p.add_argument("--convert", choices=("cli", "inprocess"), default="cli",
                   help="run h5extractf (and the post-processing tools) as their "
                        "command line tools (default) or call their functions in "
                        "this process")
    p.add_argument("--postprocess", action="store_true",
                   help="also concatenate the binned files and shuffle the result "
                        "(h5shuffle2), timed as part of the workflow")
    a = p.parse_args(argv)

    roots = [os.path.abspath(r) for r in a.root]
    detx = os.path.abspath(a.detx)
    center = _center(a.center)
    edges = load_edges(a.edges)
    workdir = os.path.abspath(a.workdir or os.path.dirname(os.path.abspath(a.out)))
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(a.out))[0]
    pairs = [(os.path.join(workdir, f"{stem}.{i}.aanet.h5"), os.path.join(workdir, f"{stem}.{i}.dl.h5"))
             for i in range(len(roots))]

    runs = []
    for _ in range(max(1, a.repeat)):
        convert_s = bin_s = 0.0
        for root, (conv_h5, out_h5) in zip(roots, pairs):
            t0 = time.perf_counter()
            convert(root, conv_h5, a.convert)
            t1 = time.perf_counter()
            if os.path.exists(out_h5):
                os.remove(out_h5)
            make_binner(edges, detx, a.du, center).run(conv_h5, out_h5)
            t2 = time.perf_counter()
            convert_s += t1 - t0
            bin_s += t2 - t1
        run = {"convert_s": convert_s, "bin_s": bin_s}
        if a.postprocess:
            concat_s, shuffle_s, shuffled = postprocess([out for _, out in pairs], workdir, stem, a.convert)
            run.update(concatenate_s=concat_s, shuffle_s=shuffle_s)
        run["total_s"] = sum(run.values())
        runs.append(run)

    images, entries, event_ids, file_index, dropped, n_root = [], [], [], [], [], 0
    for i, (conv_h5, out_h5) in enumerate(pairs):
        img, entry, event_id, drop, n = read_output(out_h5, conv_h5)
        images.append(img)
        entries.append(entry)
        event_ids.append(event_id)
        file_index.append(np.full(len(entry), i, np.int64))
        dropped += [[i, int(d)] for d in drop]
        n_root += n
    images = np.concatenate(images)
    n = len(images)
    if a.postprocess:
        with h5py.File(shuffled, "r") as f:
            if len(f["x"]) != n:
                raise RuntimeError(f"{shuffled}: {len(f['x'])} images after shuffling, {n} binned")
    best = {key: min(r[key] for r in runs) for key in runs[0]}
    timings = {
        "convert_mode": a.convert,
        "postprocess": a.postprocess,
        "n_files": len(roots),
        "n_root_entries": int(n_root),
        "n_images": int(n),
        "repeat": len(runs),
        "runs": runs,
        "best": best,
        "events_per_s_best": {
            key.replace("_s", ""): (n_root / v if v > 0 else None)
            for key, v in best.items()
        },
    }
    config = {
        "root": roots, "detx": detx, "du": a.du, "center_hits_to": center,
        "edges_file": os.path.abspath(a.edges),
        "center_time": True, "correct_timeslew": True, "add_bin_stats": False,
        "converter": "h5extractf",
    }
    edges_json = json.dumps([[name, arr.tolist()] for name, arr in edges])
    vers = versions()
    np.savez(
        a.out,
        images=images,
        file_index=np.concatenate(file_index),
        entry=np.concatenate(entries),
        event_id=np.concatenate(event_ids),
        dropped_entries=np.array(dropped, np.int64).reshape(-1, 2),
        edges=np.array(edges_json),
        timings=np.array(json.dumps(timings)),
        versions=np.array(json.dumps(vers)),
        config=np.array(json.dumps(config)),
    )

    names = os.path.basename(roots[0]) + (f" (+{len(roots) - 1} more)" if len(roots) > 1 else "")
    print(f"[orcasong_reference] {names} detx={os.path.basename(detx)} du={a.du} center={center}")
    print(f"  images {images.shape} {images.dtype}, sum={int(images.sum(dtype=np.int64))}, "
          f"entries {n}/{n_root} (dropped {len(dropped)})")
    for i, r in enumerate(runs):
        post = (f"concatenate {r['concatenate_s']:.3f}s  shuffle {r['shuffle_s']:.3f}s  "
                if a.postprocess else "")
        print(f"  run {i}: convert {r['convert_s']:.3f}s  bin {r['bin_s']:.3f}s  {post}"
              f"total {r['total_s']:.3f}s")
    eps = timings["events_per_s_best"]
    print(f"  best: convert {best['convert_s']:.3f}s ({eps['convert']:.1f} ev/s)  "
          f"bin {best['bin_s']:.3f}s ({eps['bin']:.1f} ev/s)  "
          f"total {best['total_s']:.3f}s ({eps['total']:.1f} ev/s)")
    print(f"  versions: {json.dumps(vers)}")
    print(f"  wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
