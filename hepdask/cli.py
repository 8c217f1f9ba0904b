"""The ``hepdask`` command: parses arguments, maps flags onto config keys and calls the API.

Every error hepdask raises on purpose is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ConfigError, HepdaskError, StoreError, did_you_mean
from .heap import BUILD_STACK, import_frozen

EXIT_USER_ERROR = 2
EXIT_VERIFY_FAILED = 1
#: What a shell reports for a process stopped by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
#: ``show --events`` at most: a row of the figure an event (1,000 made a PNG of 337,920 pixels' height).
MAX_EVENTS_SHOWN = 64
#: The build summary lists at most this many bad files (all are in the store manifest).
BAD_FILES_SHOWN = 10


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hepdask", epilog="Errors print one line and exit with status 2. See README.md for the config keys.",
        description="Turn many ROOT files into a chunked Zarr store of event images, and train on it.")
    parser.add_argument("--version", action="version", version=f"hepdask {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build-dataset", help="build a Zarr image store from a YAML config")
    build.add_argument("config", help="YAML config file")
    build.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set output.chunk_events=1024 (repeatable)")
    build.add_argument("--dry-run", action="store_true", help="print the resolved plan, write nothing")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output (output.overwrite)")
    build.add_argument("--workers", type=int, help="local worker processes (cluster.workers)")
    build.add_argument("--cluster", metavar="local|slurm|ADDRESS",
                       help="where to run: a LocalCluster, SLURM jobs, or a scheduler address (cluster.kind)")
    build.add_argument("--address", help="connect to this Dask scheduler (cluster.kind=address)")
    build.add_argument("--jobs", type=int, help="most SLURM jobs (cluster.jobs)")
    build.add_argument("--minimum-jobs", type=int, help="fewest SLURM jobs (cluster.minimum_jobs)")
    build.add_argument("--profile", help="dask-jobqueue SLURM profile YAML (cluster.profile)")
    build.add_argument("--print-job-script", action="store_true",
                       help="print the SLURM job script that would be submitted; submit nothing")
    build.add_argument("--performance-report", action="store_true",
                       help="save Dask's performance report next to the store (cluster.performance_report)")
    build.add_argument("--output", help="output store path (output.path), relative to the current directory")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument("--json", action="store_true", help="print the report as JSON")

    info = sub.add_parser("info", help="summarise a store: splits, shapes, classes, provenance")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="print as JSON")

    train = sub.add_parser("train", help="train a model on a store (MirroredStrategy) and evaluate it")
    train.add_argument("config", help="YAML training config")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set fit.epochs=10 (repeatable)")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run (overwrite)")
    devices = train.add_mutually_exclusive_group()
    devices.add_argument("--MirroredStrategy", dest="mirrored", nargs="*", metavar="DEVICE",
                         help="mirror over these devices (all visible GPUs if none are named)")
    devices.add_argument("--OneDeviceStrategy", dest="one_device", metavar="DEVICE", help="train on one device")
    train.add_argument("--epochs", type=int, help="fit.epochs")

    show = sub.add_parser("show", help="plot event images of a store (projected onto two dims) as a PNG")
    show.add_argument("store")
    show.add_argument("--split", default="train", help="the split to plot (default: train)")
    show.add_argument("--image", default="image", help="image array: image or image_<name>")
    show.add_argument("--events", type=_events_shown, default=6,
                      help=f"how many events (spread over the labels), 1 to {MAX_EVENTS_SHOWN}")
    show.add_argument("--dims", help="two image dims to show, e.g. pos_z,time (default: the first two)")
    show.add_argument("--output", help="PNG path (default: next to the store)")

    verify = sub.add_parser("verify", help="check a store: complete, every chunk there and decodable, no leftovers")
    verify.add_argument("store")
    verify.add_argument("--quick", action="store_true",
                        help="check that every chunk is there without decoding it (reads no chunk data)")

    example = sub.add_parser("make-example-data", help="write LDMX-like calorimeter example files")
    example.add_argument("directory")
    kind = example.add_mutually_exclusive_group(required=True)
    kind.add_argument("--signal", dest="signal", action="store_true", help="narrow, deep showers (signal_*.root)")
    kind.add_argument("--background", dest="signal", action="store_false",
                      help="wider showers (background_*.root)")
    example.add_argument("--files", type=int, default=10, help="number of files (existing ones are kept)")
    example.add_argument("--events", type=int, default=500, help="events per file")
    example.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    return parser


def _flagged(label: str, *texts: str) -> list[str]:
    """The overrides one flag sets, each carrying the flag as typed (``Override``: errors name it)."""
    from .config import Override

    return [Override(text, label) for text in texts]


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then those of each build flag."""
    overrides: list[str] = list(args.overrides)

    def flag(label: str, *texts: str) -> None:
        overrides.extend(_flagged(label, *texts))

    if args.overwrite:
        flag("--overwrite", "output.overwrite=true")
    if args.workers is not None:
        flag(f"--workers {args.workers}", f"cluster.workers={args.workers}")
    if args.cluster in ("local", "slurm"):
        flag(f"--cluster {args.cluster}", f"cluster.kind={args.cluster}")
    elif args.cluster:
        flag(f"--cluster {args.cluster}", "cluster.kind=address", f"cluster.address={json.dumps(args.cluster)}")
    if args.address:
        flag(f"--address {args.address}", "cluster.kind=address", f"cluster.address={json.dumps(args.address)}")
    if args.jobs is not None:
        flag(f"--jobs {args.jobs}", f"cluster.jobs={args.jobs}")
    if args.minimum_jobs is not None:
        flag(f"--minimum-jobs {args.minimum_jobs}", f"cluster.minimum_jobs={args.minimum_jobs}")
    if args.profile:
        flag(f"--profile {args.profile}", f"cluster.profile={json.dumps(str(Path(args.profile).resolve()))}")
    if args.performance_report:
        flag("--performance-report", "cluster.performance_report=true")
    if args.output:  # a path typed on the command line is relative to where it was typed
        flag(f"--output {args.output}", f"output.path={json.dumps(str(Path(args.output).expanduser().resolve()))}")
    return overrides


def _console(console_class, *, stderr: bool = False):
    """A rich console whose sentences are not broken at 80 columns when the output is a log
    file or a pipe (tables still fit the width)."""
    return console_class(stderr=stderr, soft_wrap=True)


def _build(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import store
    from .build import build_dataset
    from .config import load

    # Progress and messages go to stderr, so that stdout holds only the result (the summary,
    # the plan, or with --json a JSON document that a pipe can parse).
    messages = _console(Console, stderr=True)
    console = _console(Console)
    config = load(args.config, _flag_overrides(args))
    if args.print_job_script:
        from .build import slurm_log_directory
        from .cluster import job_script

        if config.cluster.kind != "slurm":
            msg = f"--print-job-script is for SLURM builds; cluster.kind is {config.cluster.kind!r} (add --cluster slurm)"
            raise ConfigError(msg)
        print(job_script(config.cluster, slurm_log_directory(config)))
        return 0
    started = time.time()
    try:
        report = build_dataset(config, dry_run=args.dry_run, progress=not args.no_progress and not args.json,
                               console=messages)
        if args.json:
            print(json.dumps(report.plan | report.to_dict() if args.dry_run else report.to_dict(), indent=2))
        elif args.dry_run:
            print_plan(config, report, console)
        else:
            print_build(report, console)
    except KeyboardInterrupt:
        # After the store's last write (closing the cluster, printing the summary) there is
        # nothing to resume: say so, not "run the same command to resume".
        if not args.dry_run and _finished_since(config.output.path, started):
            print(f"hepdask: interrupted after the build had finished: {config.output.path} is complete",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        if not args.dry_run and not store.staging_path(config.output.path).exists():
            # Stopped before the build began writing (while the cluster started).
            print(f"hepdask: interrupted before the build began: {config.output.path} is as it was", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    return 0


def _finished_since(path: str, started: float) -> bool:
    """Whether the store at *path* is complete and was finished after *started* (a time)."""
    from datetime import datetime

    from . import store

    try:  # open_root refuses a store that is missing or incomplete
        created = store.open_root(path).attrs.get(store.PREFIX + "created")
        return datetime.fromisoformat(created).timestamp() >= int(started)
    except (StoreError, TypeError, ValueError):
        return False


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .store import store_info

    with _reading(args.store):
        info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print_info(info, _console(Console))
    return 0


#: TensorFlow's start-up notices, written by its C++ before it reads TF_CPP_MIN_LOG_LEVEL,
#: matched by their text (its fatal "compiled to use AVX" comes from the same source file).
TF_NOTICES = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on",
              "This TensorFlow binary is optimized to use available CPU instructions",
              "To enable the following instructions:",
              # tf.distribute's multi-device iterator, once per iterator a training makes
              "Input of GeneratorDatasetOp::Dataset will not be optimized")

#: TensorFlow's warnings that echo, with a Python traceback on the lines after, the error a
#: failing step raises anyway (a damaged chunk: 150 lines); the filter drops them with their
#: continuation lines. The error itself reaches the user (one line for a hepdask error).
TF_ECHOES = ("Local rendezvous is aborting with status", "op_kernel.cc")

#: How long the stderr filter may take to pass on the last lines once the import is done.
FILTER_DRAIN_SECONDS = 5.0

#: A filter between TensorFlow and the real stderr: every line but the notices passes, as
#: it comes. It is a process of its own, so that what TensorFlow writes before an abort
#: still gets through.
_STDERR_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # it ends when the pipe does
cut = sys.argv.index("--")
notices = [n.encode() for n in sys.argv[1:cut]]
echoes = [n.encode() for n in sys.argv[cut + 1:]]
severe = re.compile(rb"^[EF][0-9]{4} ")  # an error or a fatal line always passes
logged = re.compile(rb"^[IWEF][0-9]{4} ")
# what follows an echo: its Python traceback, TensorFlow's node lines
traceback = re.compile(rb"^(\\s|$|Traceback |[\\w.]+(Error|Exception)\\b|The above exception|During handling)")
echoing = False
for line in sys.stdin.buffer:
    if logged.match(line):
        echoing = not severe.match(line) and any(e in line for e in echoes)
    elif echoing and not traceback.match(line):
        echoing = False
    if not echoing and (severe.match(line) or not any(n in line for n in notices)):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


@contextmanager
def tensorflow_notices_filtered() -> Iterator[None]:
    """Import TensorFlow, and run the block, with TensorFlow's notices (``TF_NOTICES``)
    filtered out of the process's standard error; everything else written there passes. A
    missing TensorFlow is left for ``hepdask.tfdata`` to explain."""
    import subprocess

    if sys.stderr is None:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to filter
        yield
        return
    read, write = os.pipe()
    try:
        filtering = subprocess.Popen([sys.executable, "-c", _STDERR_FILTER, *TF_NOTICES, "--", *TF_ECHOES], stdin=read,
                                     stdout=saved, stderr=saved)
    except OSError:
        os.close(read)
        os.close(write)
        os.close(saved)
        yield
        return
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    try:
        with suppress(ImportError):
            import tensorflow  # noqa: F401
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer is gone: the filter sees its end
        os.close(saved)
        # A process TensorFlow started may hold the pipe: the filter then ends with it.
        with suppress(subprocess.TimeoutExpired):
            filtering.wait(timeout=FILTER_DRAIN_SECONDS)


def _train(args: argparse.Namespace) -> int:
    from .config import load_train
    from .train import epochs_trained, fit

    overrides: list[str] = list(args.overrides)
    if args.overwrite:
        overrides += _flagged("--overwrite", "overwrite=true")
    if args.epochs is not None:
        overrides += _flagged(f"--epochs {args.epochs}", f"fit.epochs={args.epochs}")
    if args.mirrored is not None:
        overrides += _flagged(" ".join(["--MirroredStrategy", *args.mirrored]), "strategy.kind=mirrored",
                              f"strategy.devices={json.dumps(args.mirrored or None)}")
    if args.one_device:
        overrides += _flagged(f"--OneDeviceStrategy {args.one_device}", "strategy.kind=one_device",
                              f"strategy.devices={json.dumps([args.one_device])}")
    config = load_train(args.config, overrides)
    quiet = nullcontext()
    if not args.verbose:  # TensorFlow's INFO lines (CPU features, malloc patch) and notices
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        quiet = tensorflow_notices_filtered()
    with quiet:
        # Keras' progress bar within each epoch on a terminal; one line an epoch in a log file.
        result = fit(config, verbose=1 if sys.stdout.isatty() else 2)
    m = result.metrics
    print(f"trained {config.model.name} on {result.replicas} replica(s); outputs in {result.output}")
    print(f"evaluated {m['model']} (epoch {m['epoch']} of {epochs_trained(result.history)}, "
          f"by {m['monitor']}; fit.evaluate={config.fit.evaluate})")
    if "auc" in m:
        print(f"test: AUC {m['auc']:.3f}, accuracy {m['accuracy_at_best_threshold']:.3f} at threshold "
              f"{m['best_threshold']:.3f} chosen on {m['threshold_split']} (signal acceptance {m['signal_acceptance']:.3f}, "
              f"background rejection {m['background_rejection']:.3f})")
    else:
        print(f"test: accuracy {m['accuracy']:.3f}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from . import plots, store
    from .config import image_dim_prefix
    from .store import open_dataset

    with _reading(args.store):
        ds = open_dataset(args.store, args.split)
    if not ds.sizes.get("event"):
        msg = f"{args.store}: split {args.split!r} has no events to show"
        raise StoreError(msg)
    images = [name for name in ds.data_vars if name == "image" or name.startswith("image_")]
    if args.image not in images:
        msg = f"{args.store}: no image array {args.image!r} in split {args.split!r}{did_you_mean(args.image, images)} (images: {images})"
        raise StoreError(msg)
    array = ds[args.image]
    dims = list(array.dims[1:])
    prefix = image_dim_prefix(args.image)
    wanted = args.dims.split(",") if args.dims else dims[:2]
    chosen = [d if d in dims or prefix + d not in dims else prefix + d for d in (w.strip() for w in wanted)]
    for name in chosen:
        if name not in dims:
            msg = f"{args.store}: {args.image} has no dim {name!r}{did_you_mean(name, dims)} (dims: {dims})"
            raise StoreError(msg)
    if len(chosen) != 2 or chosen[0] == chosen[1]:
        msg = f"--dims takes two different dims of {args.image} ({dims}), got {wanted}"
        raise ConfigError(msg)
    with _reading(args.store):
        group = store.open_split(args.store, args.split)
        for name in ("label", "sample", "entry", args.image):
            store.require_chunks(args.store, group[name])
        picks = _spread_over_labels(ds.label.values, args.events)
        rows = plots.store_rows(ds, args.image, chosen, picks)
        titles = [f"{ds.sample.values[i]} entry {int(ds.entry.values[i])}\nlabel {int(ds.label.values[i])}"
                  for i in picks]
    output = Path(args.output) if args.output else Path(f"{str(args.store).rstrip('/')}.{args.split}.{args.image}.png")
    output = plots.event_images(rows, titles, output)
    views = sorted({name for row in rows for name in row.view})
    shown = f"{chosen[0]} vs {chosen[1]}" + (f", a row per {' and '.join(views)}" if views else "")
    print(f"{len(picks)} events of {args.store} ({args.split}, {args.image}: {shown}) -> {output}")
    return 0


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Errors met while reading a store's arrays (a truncated or overwritten chunk, broken
    metadata) as one line that points to ``hepdask verify``."""
    try:
        yield
    except HepdaskError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        msg = f"store {path!r} cannot be read ({type(err).__name__}: {err}); 'hepdask verify {path}' says what is damaged"
        raise StoreError(msg) from None


def _spread_over_labels(labels, n: int) -> list[int]:
    """Up to *n* event indices, taken in turn from each label's first events."""
    by_label = [list(np.flatnonzero(labels == value)) for value in np.unique(labels)]
    picks: list[int] = []
    while len(picks) < min(n, len(labels)):
        for indices in by_label:
            if indices and len(picks) < n:
                picks.append(int(indices.pop(0)))
    return sorted(picks)


def _verify(args: argparse.Namespace) -> int:
    from .store import staging_note, verify

    problems = verify(args.store, decode=not args.quick)
    for problem in problems:
        print(f"{args.store}: {problem}")
    if problems:
        return EXIT_VERIFY_FAILED
    note = staging_note(args.store)
    print(f"{args.store}: ok" + (f"; note: {note}" if note else ""))
    return 0


def _example(args: argparse.Namespace) -> int:
    from . import examples

    paths = examples.generate(args.directory, signal=args.signal, n_files=args.files,
                              events_per_file=args.events, seed=args.seed)
    print(f"{len(paths)} files in {args.directory}")
    return 0


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        # Folded, not cut with an ellipsis: two bad files' paths cut to one prefix read alike.
        table.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row))
    return table


def print_plan(config, report, console) -> None:
    console.print(f"[bold]{config.name}[/]: dry run, nothing written")
    rows = [(name, s["label"], s["files"], s["files_to_generate"], s["estimated_events"])
            for name, s in report.samples.items()]
    console.print(_table("samples", ["sample", "label", "files", "to generate", "events (est.)"], rows))
    plan = report.plan
    cut = (f"files cut into ranges of at most {config.read.entries_per_partition:,} entries"
           if config.read.entries_per_partition else "one per file")
    console.print(f"partitions: {report.n_partitions:,} ({cut}, read {config.read.step_size:,} entries at a time)")
    from .store import planned_compressor

    def codec(dtype: str) -> str:
        return planned_compressor(config.output.compressor.name, dtype)

    console.print(f"image: shape {tuple(report.image_shape)} {report.image_dtype}, {report.chunk_events:,} events "
                  f"per chunk, {codec(report.image_dtype)}")
    for name, image in report.images.items():
        console.print(f"{name}: shape {tuple(image['shape'])} {image['dtype']}, {codec(image['dtype'])}")
    console.print(f"estimated output: {plan['estimated_events']:,} events, "
                  f"{plan['estimated_uncompressed_bytes'] / 2**20:,.1f} MiB uncompressed ({plan['note']})")
    console.print(f"output: {config.output.path}")
    console.print(f"output plan: {plan['output_plan']}")


def print_build(report, console) -> None:
    bad = bool(report.bad_files)
    rows = [(name, s["files"], *([s["bad_files"]] if bad else []), s["read"], s["selected"])
            for name, s in report.samples.items()]
    columns = ["sample", "files", *(["bad files (skipped)"] if bad else []), "events read", "selected"]
    console.print(_table("samples", columns, rows))
    if bad:
        rows = [(b["sample"], b["path"], f"{b['exception']}: {b['message']}") for b in report.bad_files[:BAD_FILES_SHOWN]]
        more = len(report.bad_files) - len(rows)
        title = f"bad files skipped (read.on_bad_file: skip){f'; {more} more in the store manifest' if more > 0 else ''}"
        console.print(_table(title, ["sample", "file", "error"], rows))
    names = list(report.samples)
    rows = [(split, s["events"], *(s[n] for n in names)) for split, s in report.splits.items()]
    console.print(_table("splits", ["split", "events", *names], rows))
    _print_hits(console, "image", report.hits)
    for name, image in report.images.items():
        _print_hits(console, name, image["hits"], shape=image["shape"])
    if report.hit_counts:
        described = {
            "unknown_channel": "hits on channels not in the detector file (dropped)",
            "no_trigger_events": "events without a triggered hit (no time reference)",
            "not_triggered": "untriggered hits dropped",
            "outside_time_window": "hits outside the time window dropped",
        }
        rows = [(described.get(k, k), n) for k, n in report.hit_counts.items()]
        console.print(_table("geometry and time", ["", "count"], rows))
    console.print(f"wrote {report.events_written:,} events to {report.path} in {report.wall_seconds:.1f} s "
                  f"({report.events_per_second:,.0f} events/s read)")


def _print_hits(console, image: str, hits: dict, shape: Sequence[int] = ()) -> None:
    """An image's hit statistics: the totals on a line of their own (as a table title they
    wrapped at the table's width), then the hits outside it per axis."""
    named = f"{image} {tuple(shape)}" if shape else image
    console.print(f"{named} hits: {hits.get('hits', 0):,} after cuts, {hits.get('in_image', 0):,} in the image, "
                  f"{hits.get('nan', 0):,} NaN, {hits.get('clipped', 0):,} clipped")
    rows = [(a, n, hits["overflow"][a]) for a, n in hits.get("underflow", {}).items()]
    console.print(_table(f"{image}: hits outside, per axis", ["axis", "underflow", "overflow"], rows))


def print_info(info: dict, console) -> None:
    console.print(f"[bold]{info['path']}[/] (hepdask {info['version']}, created {info['created']})")
    rows = [(split, s["events"], "x".join(map(str, s["image_shape"])), ",".join(s["image_dims"]), s["dtype"],
             s["chunk_events"], " ".join(f"{k}:{v:,}" for k, v in s["labels"].items()))
            for split, s in info["splits"].items()]
    console.print(_table("splits", ["split", "events", "image", "dims", "dtype", "chunk", "labels"], rows))
    compressors = sorted({s["compressor"] for s in info["splits"].values()})
    if compressors:
        console.print(f"image compressor: {', '.join(compressors)}")
    more = {name: image for s in info["splits"].values() for name, image in s.get("more_images", {}).items()}
    for name, image in more.items():
        console.print(f"{name}: {'x'.join(map(str, image['shape']))} {image['dtype']} ({', '.join(image['dims'])}), "
                      f"{image['compressor']}")
    bad = any(s.get("bad_files") for s in info["samples"].values())
    rows = [(name, s["label"], s["files"], *([s.get("bad_files", 0)] if bad else []), s["entries"], s["selected"],
             " ".join(f"{k}={v}" for k, v in s.get("metadata", {}).items()))
            for name, s in info["samples"].items()]
    columns = ["sample", "label", "files", *(["bad files (skipped)"] if bad else []), "entries", "selected", "metadata"]
    console.print(_table("provenance", columns, rows))


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Without --verbose, Dask's own INFO chatter stays out of the way of the progress bar."""
    return record.levelno >= logging.WARNING or not record.name.startswith(("distributed", "dask_jobqueue"))


#: Modules the console script imports before a command runs (see ``entry``).
PRELOAD = {"build-dataset": BUILD_STACK}

COMMANDS = {"build-dataset": _build, "info": _info, "show": _show, "train": _train, "verify": _verify,
            "make-example-data": _example}


def _events_shown(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_EVENTS_SHOWN:
        msg = f"takes 1 to {MAX_EVENTS_SHOWN} events, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command *argv* (default: ``sys.argv``); return the exit status."""
    return run(_parser().parse_args(argv))


def entry() -> None:
    """The ``hepdask`` console script: ``main`` in a process of its own, with less garbage
    collection.

    The command's modules (``PRELOAD``) are imported with the collector paused and frozen
    (``hepdask.heap``), and everything is frozen again before the interpreter exits, whose
    shutdown would otherwise collect the whole heap once more. Objects made while the command
    runs are collected as usual. ``main``, which tests and other Python code call, leaves the
    collector alone.
    """
    args = _parser().parse_args()
    try:
        import_frozen(PRELOAD.get(args.command, ()))
    except KeyboardInterrupt:  # nothing has started yet
        print("hepdask: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    status = run(args)
    gc.freeze()
    sys.exit(status)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; a hepdask error is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_libraries)
    try:
        return COMMANDS[args.command](args)
    except HepdaskError as err:
        print(f"hepdask: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        more = {"build-dataset": "; the new store is not finalised: run the same command to resume",
                "train": "; run the same command to resume after the last finished epoch"}.get(args.command, "")
        print(f"hepdask: interrupted{more}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    entry()
