"""Orchestration of one build on a Dask Client: plan, stage, assemble, finalize, report.

This is the only module that knows the whole flow; each step's logic lives in the module of
its stage (``sources``, ``selection``, ``binning``, ``store``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, binning, cluster, examples, geometry, selection, sources, store, truth
from .config import (
    AUTO_CHUNK_BYTES,
    Config,
    Geometry,
    Image,
    Labels,
    Time,
    image_dim_prefix,
)
from .errors import (
    FULL_DISK_ERRNOS,
    BuildError,
    GeometryError,
    HepdaskError,
    InputFileError,
    StoreError,
    did_you_mean,
)

log = logging.getLogger(__name__)

#: At most this many bytes of rows that a write task gathers for its whole run
#: (``store.gathered_bytes``: sparse images, per-event values; assembling them holds up to
#: twice that); dense-staged images are gathered ``store.GATHER_BYTES`` at a time. Counting
#: the dense image bytes instead made a shuffled 3,200-file demo build 26 write tasks, each
#: of which read rows from every partition: 0.24 ms a partition, 20 of the write phase's 26 s
#: of CPU.
WRITE_TASK_BYTES = 128 * 2**20
#: ...and at most this many bytes of images (uncompressed): a task's share of progress and
#: of what a killed build redoes.
WRITE_TASK_IMAGE_BYTES = 2 * 2**30
#: Aim for this many write tasks per worker, so that a slow task does not idle the others.
TASKS_PER_WORKER = 4
#: With ``read.partitions_per_task: auto``, aim for this many stage tasks per worker...
STAGE_TASKS_PER_WORKER = 8
#: ...of at most this many partitions. A Dask task costs a worker and the scheduler ~3 ms
#: (2 workers on 2 cores, distributed 2026.8), as much as reading a 500-event demo file:
#: 200 such files read in 1.5-1.9 s one a task and in 0.8-1.0 s ten a task.
MAX_PARTITIONS_PER_TASK = 16
#: A plan reading at most this many bytes from at most this many files runs in this process
#: (``cluster.processes`` unset; ``hepdask.cluster.connect``): starting worker processes costs
#: 2-3 s, about what one thread needs for ~50 MB (measured, 2 cores: 40 demo files, 10 MB,
#: 2.3 s in the process against 4.3 s on 2 worker processes; 200 files, 50 MB, 5.3 against
#: 5.8 s; 16 KM3NeT files, 57 MB, 2.9 against 4.5 s).
IN_PROCESS_BYTES = 32 * 2**20
IN_PROCESS_FILES = 64


# --------------------------------------------------------------------------------------------
# progress


class Bar:
    """A rich progress display with named tasks; silent when disabled (tests, notebooks)."""

    def __init__(self, *, enabled: bool, console=None) -> None:
        if enabled and console is None:  # progress is not output: stderr, as the CLI does
            from rich.console import Console

            console = Console(stderr=True, soft_wrap=True)
        self.enabled = enabled
        self.console = console
        self._progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            )

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None and self._progress.live.is_started:
            self._progress.stop()

    def add(self, description: str, total: int):
        """A new bar; the display starts with the first (without a terminal, rich prints the
        final display when it stops: a build refused before any bar left a blank line)."""
        if self._progress is None:
            return None
        if not self._progress.live.is_started:
            self._progress.start()
        return self._progress.add_task(description, total=total)

    def advance(self, task, n: int = 1) -> None:
        if self._progress is not None and task is not None:
            self._progress.advance(task, n)

    def print(self, text: str) -> None:
        """Tell the user (on the console when there is one, else in the log)."""
        if self._progress is not None:
            self._progress.console.print(text)
        elif self.console is not None:
            self.console.print(text)
        else:
            log.info(text)



# --------------------------------------------------------------------------------------------
# what a worker needs to process one partition


def image_layout(config: Config) -> binning.ImageLayout:
    """The binning layout the config's ``image`` section describes."""
    return layout_of(config.image)


def layout_of(image: Image) -> binning.ImageLayout:
    """The binning layout one image section describes."""
    axes = []
    for spec in image.axes:
        if spec.edges is not None:
            axis = binning.BinAxis.explicit(spec.label, spec.edges, spec.units)
        elif spec.scale == "log":
            axis = binning.BinAxis.log(spec.label, spec.bins, *spec.range, spec.units)
        else:
            axis = binning.BinAxis.uniform(spec.label, spec.bins, *spec.range, spec.units)
        axes.append(axis.downsampled(spec.downsample) if spec.downsample > 1 else axis)
    if image.format == "xyz":
        return binning.xyz_layout(axes)
    return binning.histogram_layout(axes)


@dataclass(frozen=True)
class ImageJob:
    """One image of every event: stored as array ``array`` with dims ``dim_prefix + dim``."""

    array: str
    axis_fields: tuple[str, ...]
    weight: str | None
    dtype: str
    layout: binning.ImageLayout
    hit_cut: str | None
    dim_prefix: str

    @classmethod
    def from_config(cls, array: str, image: Image) -> ImageJob:
        return cls(array, tuple(a.field for a in image.axes), image.weight, image.resolved_dtype,
                   layout_of(image), image.hits, image_dim_prefix(array))

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.axis_fields, *([self.weight] if self.weight else []))

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.dim_prefix + d for d in self.layout.dims)

    @property
    def event_bytes(self) -> int:
        return self.layout.size * np.dtype(self.dtype).itemsize


def image_jobs(config: Config) -> tuple[ImageJob, ...]:
    return tuple(ImageJob.from_config(array, image) for array, image in config.all_images().items())


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to read, select, bin and stage a partition (picklable)."""

    tree: str
    hits: dict[str, str]
    events: dict[str, str]
    step_size: int
    memory_map: bool
    #: The main image (array ``image``) first, then the ``images`` section's.
    images: tuple[ImageJob, ...]
    hit_cut: str | None
    event_cut: str | None
    staging: str
    on_bad_file: str
    geometry: Geometry | None = None
    #: Detector file of each sample (``geometry.file`` unless the sample names its own).
    detectors: dict[str, str] = field(default_factory=dict)
    time: Time | None = None
    truth_prefix: str | None = None
    labels: Labels | None = None
    #: Unique per build and part of every task key: a Client that ran an earlier build may
    #: still hold results under that build's keys, and Dask would hand them back.
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def from_config(cls, config: Config) -> Job:
        events = dict(config.event)
        if config.truth is not None:
            events.update(truth.truth_branches(config.truth.prefix, config.truth.track))
        detectors = {}
        if config.geometry is not None:
            detectors = {s.name: s.geometry or config.geometry.file for s in config.samples}
        return cls(
            tree=config.tree, hits=dict(config.hits), events=events,
            step_size=config.read.step_size, memory_map=config.read.memory_map,
            images=image_jobs(config), hit_cut=config.selection.hits, event_cut=config.selection.events,
            staging=str(store.staging_path(config.output.path)),
            on_bad_file=config.read.on_bad_file,
            geometry=config.geometry, detectors=detectors, time=config.time,
            truth_prefix=config.truth.prefix if config.truth is not None else None, labels=config.labels,
        )

    @property
    def layout(self) -> binning.ImageLayout:
        """The main image's layout."""
        return self.images[0].layout

    @property
    def dtype(self) -> str:
        return self.images[0].dtype

    def hit_names(self, detector: geometry.Detector | None) -> list[str]:
        """The hit fields after the geometry join: the read ones, the detector's columns and
        the calibrated time."""
        if detector is None:
            return list(self.hits)
        return [*self.hits, *detector.fields, *([self.geometry.calibrated] if self.geometry.time else [])]

    def detector(self, sample: str) -> geometry.Detector | None:
        """The (per-process cached) detector table of *sample*, or None without geometry."""
        if self.geometry is None:
            return None
        return geometry.load(self.detectors[sample], tuple(self.geometry.key_map()), self.geometry.centre)


def process_partition(partition: sources.Partition, job: Job) -> dict:
    """Stage one partition (or reuse its staged copy if its file is unchanged).

    Returns the staging record as JSON, or, under ``on_bad_file: skip``, ``{"key", "bad"}``
    for a file that cannot be read.
    """
    done = store.load_staged(job.staging, partition.key)
    if done is not None:
        if _unchanged(done, partition):
            return done.to_json()
        store.discard_staged(job.staging, partition.key)
    try:
        return _stage(partition, job).to_json()
    except InputFileError as err:
        if job.on_bad_file != "skip":
            raise
        return {"key": partition.key, "bad": sources.describe_failure(err)}


def _unchanged(done: store.Staged, partition: sources.Partition) -> bool:
    try:
        current = sources.file_info(partition.file)
    except OSError:
        return False
    current["entry_range"] = [partition.entry_start, partition.entry_stop]
    return all(done.info.get(k) == v for k, v in current.items())


@dataclass
class Tally:
    """What :func:`partition_steps` counts over a partition: entries read, the binning
    statistics of each image array, and (with a geometry or a time window) the hit counters."""

    entries: int
    stats: dict[str, binning.BinStats]
    counts: dict[str, int] | None

    @classmethod
    def of(cls, job: Job) -> Tally:
        stats = {img.array: binning.BinStats(tuple(a.name for a in img.layout.axes)) for img in job.images}
        counts = dict.fromkeys(HIT_COUNTERS, 0) if job.geometry is not None or job.time is not None else None
        return cls(0, stats, counts)


def partition_steps(partition: sources.Partition, job: Job, tally: Tally) -> Iterator[dict[str, np.ndarray]]:
    """Read, calibrate, cut and bin *partition* one read step at a time.

    Yields, per step, the per-event arrays a build stores: each image array, ``entry`` (the
    source entry numbers), ``label`` (with ``labels:``) and the event fields. *tally* counts
    as the steps go.
    """
    detector = job.detector(partition.sample)
    hit_names = job.hit_names(detector)
    event_names = list(job.events)
    if job.truth_prefix is not None:
        event_names += truth.truth_fields(job.truth_prefix)
    hit_cut = selection.hit_cut(job.hit_cut, hit_names)
    event_cut = selection.event_cut(job.event_cut, event_names)
    image_cuts = {img.array: selection.hit_cut(img.hit_cut, hit_names) for img in job.images}
    for step in sources.read(partition, job.tree, job.hits, job.events, job.step_size, memory_map=job.memory_map):
        tally.entries += step.n_events
        offsets, hits, events, entries = step.offsets, step.hits, step.events, step.entries
        if job.truth_prefix is not None:
            events = truth.derive(events, job.truth_prefix)
        if detector is not None:
            offsets, hits = _calibrate(partition.file, job.geometry, detector, offsets, hits, events, entries, tally.counts)
        if job.time is not None:
            offsets, hits = _time(job.time, offsets, hits, tally.counts)
        if hit_cut is not None:
            mask = hit_cut(hits)
            offsets = selection.apply_hit_mask(offsets, mask)
            hits = {k: v[mask] for k, v in hits.items()}
        if event_cut is not None:
            keep = event_cut({**events, "nhits": np.diff(offsets)})
            offsets, hit_mask = selection.select_events(offsets, keep)
            hits = {k: v[hit_mask] for k, v in hits.items()}
            events = {k: v[keep] for k, v in events.items()}
            entries = entries[keep]
        images = {}
        for img in job.images:
            images[img.array], step_stats = _bin(img, image_cuts[img.array], offsets, hits)
            tally.stats[img.array] += step_stats
        labels = {}
        if job.labels is not None:
            labels["label"] = truth.map_labels(events[job.labels.field], job.labels.map, job.labels.default,
                                               where=partition.file)
        yield {**images, "entry": entries, **labels, **events}


def _stage(partition: sources.Partition, job: Job) -> store.Staged:
    tally = Tally.of(job)
    writer = store.PartitionWriter(job.staging, partition.key)
    try:
        for arrays in partition_steps(partition, job, tally):
            writer.append(arrays)
        info = {"entries": tally.entries, "stats": tally.stats["image"].to_dict(), **sources.file_info(partition.file),
                "entry_range": [partition.entry_start, partition.entry_stop]}
        if len(job.images) > 1:
            info["image_stats"] = {k: v.to_dict() for k, v in tally.stats.items() if k != "image"}
        if tally.counts is not None:
            info["hit_counts"] = tally.counts
    except BaseException:
        writer.abort()
        raise
    return writer.close(info)


def _bin(img: ImageJob, cut, offsets: np.ndarray, hits: dict[str, np.ndarray]):
    """One image of every event of a step: its own hit cut, then the binning kernel."""
    if cut is not None:
        mask = cut(hits)
        offsets = selection.apply_hit_mask(offsets, mask)
        hits = {f: hits[f][mask] for f in img.fields}
    coords = np.stack([hits[f] for f in img.axis_fields]) if hits else np.zeros((len(img.axis_fields), 0))
    weights = hits[img.weight] if img.weight else None
    return binning.bin_events(coords, offsets, img.layout, weights=weights, dtype=img.dtype)


#: What the geometry join and the time handling count per partition (in the report).
HIT_COUNTERS = ("unknown_channel", "no_trigger_events", "not_triggered", "outside_time_window")


def _calibrate(path: str, spec: Geometry, detector: geometry.Detector, offsets, hits, events, entries,
               counts: dict[str, int]):
    """Join the detector onto the hits; check det_id; drop or refuse unknown channels."""
    if spec.det_id is not None and detector.det_id is not None:
        data_ids = np.asarray(events[spec.det_id])
        wrong = np.flatnonzero(data_ids != detector.det_id)
        if wrong.size:
            e = int(wrong[0])
            msg = (
                f"{path}: entry {int(entries[e])}: det_id {int(data_ids[e])} does not match the detector file "
                f"{detector.path} (det_id {detector.det_id})"
            )
            raise GeometryError(msg)
    key_map = spec.key_map()
    joined, rows = geometry.join(detector, [hits[key_map[k]] for k in detector.keys])
    hits = {**hits, **joined}
    if spec.time is not None:
        tot = hits[spec.tot] if spec.time_slewing else None
        hits[spec.calibrated] = geometry.calibrated_time(hits[spec.time], hits["t0"], tot)
    unknown = rows < 0
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        if spec.on_unknown == "error":
            event = int(np.searchsorted(offsets, i, side="right")) - 1
            channel = ", ".join(f"{k}={int(hits[key_map[k]][i])}" for k in detector.keys)
            msg = (
                f"{path}: entry {int(entries[event])}: a hit's channel ({channel}) is not in the detector file "
                f"{detector.path} ({int(unknown.sum())} such hits in this read step); "
                "set geometry.on_unknown: drop to drop and count them"
            )
            raise GeometryError(msg)
        counts["unknown_channel"] += int(unknown.sum())
        offsets = selection.apply_hit_mask(offsets, ~unknown)
        hits = {k: v[~unknown] for k, v in hits.items()}
    return offsets, hits


def _time(spec: Time, offsets, hits, counts: dict[str, int]):
    """Centre hit times on the first triggered hit; keep triggered hits / a time window."""
    if spec.reference == "first_triggered":
        reference = geometry.first_triggered_time(offsets, hits[spec.field], hits[spec.triggered])
        counts["no_trigger_events"] += int(np.isnan(reference).sum())
        hits = {**hits, spec.field: hits[spec.field] - np.repeat(reference, np.diff(offsets))}
    keep = None
    if spec.triggered_only:
        keep = hits[spec.triggered] != 0
        counts["not_triggered"] += int((~keep).sum())
    if spec.window is not None:
        time = hits[spec.field]
        lo, hi = np.float64(spec.window[0]), np.float64(spec.window[1])  # not rounded to float32 times
        inside = (time >= lo) & (time <= hi)
        counts["outside_time_window"] += int((~inside if keep is None else keep & ~inside).sum())
        keep = inside if keep is None else keep & inside
    if keep is not None:
        offsets = selection.apply_hit_mask(offsets, keep)
        hits = {k: v[keep] for k, v in hits.items()}
    return offsets, hits


# --------------------------------------------------------------------------------------------
# the report


@dataclass
class BuildReport:
    """What a build did; ``to_dict()`` is what the store records as its statistics."""

    name: str
    path: str
    samples: dict[str, dict[str, int]] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    hits: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()
    image_dtype: str = ""
    chunk_events: int = 0
    n_partitions: int = 0
    wall_seconds: float = 0.0
    dashboard: str | None = None
    dry_run: bool = False
    plan: dict[str, Any] = field(default_factory=dict)
    bad_files: list[dict[str, str]] = field(default_factory=list)
    hit_counts: dict[str, int] = field(default_factory=dict)
    #: The ``images`` section's images: shape, dtype and hit statistics of each.
    images: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def events_written(self) -> int:
        return sum(s["events"] for s in self.splits.values())

    @property
    def events_read(self) -> int:
        return sum(s["read"] for s in self.samples.values())

    @property
    def events_per_second(self) -> float:
        return self.events_read / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "samples": self.samples, "splits": self.splits,
            "hits": self.hits, "image_shape": list(self.image_shape), "image_dtype": self.image_dtype,
            "chunk_events": self.chunk_events, "partitions": self.n_partitions,
            "wall_seconds": round(self.wall_seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            "bad_files": self.bad_files,
            **({"hit_counts": self.hit_counts} if self.hit_counts else {}),
            **({"images": self.images} if self.images else {}),
        }


# --------------------------------------------------------------------------------------------
# the build


def _missing_examples(config: Config) -> dict[str, int]:
    """How many example files each sample with a ``generate:`` block still lacks."""
    missing = {}
    for sample in config.samples:
        gen = sample.generate
        if gen is None:
            continue
        examples.check_settings(gen.directory, signal=gen.signal, events_per_file=gen.events_per_file, seed=gen.seed)
        paths = examples.file_paths(gen.directory, signal=gen.signal, n_files=gen.n_files)
        missing[sample.name] = sum(not path.exists() for path in paths)
    return missing


def _generate_examples(config: Config, missing: dict[str, int], progress: Callable | None) -> None:
    """Write the example files the samples ask for (``generate:``) where they are missing."""
    for sample in config.samples:
        gen = sample.generate
        if gen is None or not missing.get(sample.name):
            continue
        log.info("generating %d example files for sample %r in %s", missing[sample.name], sample.name, gen.directory)
        examples.generate(gen.directory, signal=gen.signal, n_files=gen.n_files,
                          events_per_file=gen.events_per_file, seed=gen.seed, progress=progress)


def _without_extra_examples(config: Config, partitions: list[sources.Partition], bar: Bar) -> list[sources.Partition]:
    """A sample with a ``generate:`` block holds the first ``n_files`` example files: those
    its ``files`` pattern also matches from a run that generated more are left out, and said so."""
    extra: set[str] = set()
    for sample in config.samples:
        gen = sample.generate
        if gen is None:
            continue
        paths = [p.file for p in partitions if p.sample == sample.name]
        left_out = examples.beyond(paths, gen.directory, signal=gen.signal, n_files=gen.n_files)
        if left_out:
            bar.print(f"sample {sample.name!r}: {len(left_out)} example file(s) in {gen.directory} beyond "
                      f"generate.n_files={gen.n_files} left out (from a run that generated more)")
        extra |= left_out
    if not extra:
        return partitions
    kept = [p for p in partitions if p.file not in extra]
    return [replace(p, index=i) for i, p in enumerate(kept)]


#: Under ``on_bad_file: skip``, the probe tries up to this many files of a sample.
PROBE_FILES = 10


def probe(config: Config, partitions: list[sources.Partition]) -> dict[str, int]:
    """Open a file of each sample on the client: tree and branches exist; its entries.

    Under ``skip`` a bad file is passed over (up to PROBE_FILES), so only an error that
    every tried file shares, such as a misspelt branch, stops the build here.
    """
    tries = PROBE_FILES if config.read.on_bad_file == "skip" else 1
    job = Job.from_config(config)
    _check_detectors(config, job)
    entries = {}
    for sample in config.samples:
        candidates = [p for p in partitions if p.sample == sample.name][:tries]
        for i, partition in enumerate(candidates):
            try:
                file, tree = sources.open_tree(partition.file, config.tree, memory_map=config.read.memory_map)
                with file:
                    sources.check_branches(tree, partition.file, config.tree, job.hits, job.events)
                    entries[sample.name] = int(tree.num_entries)
                break
            except InputFileError:
                if i == len(candidates) - 1:
                    raise
    return entries


def _check_detectors(config: Config, job: Job) -> None:
    """Read every detector file on the client (a bad one fails before any task runs) and
    check that the image axes name fields the hits will have."""
    for sample in config.samples:
        detector = job.detector(sample.name)
        if detector is None:
            return
        if config.geometry.time is not None and "t0" not in detector.fields:
            msg = (
                f"geometry.time is set but the detector file {detector.path} has no 't0' column to add "
                f"(columns: {sorted(detector.fields)}); unset geometry.time or add the column"
            )
            raise GeometryError(msg)
        fields = set(job.hit_names(detector))
        time_fields = (config.time.field, config.time.triggered) if config.time is not None else ()
        for name in sorted({f for img in job.images for f in img.fields} | {f for f in time_fields if f}):
            if name not in fields:
                msg = (
                    f"hit field {name!r} (named by the image or time section) is neither a read hit field nor a "
                    f"column of the detector file {detector.path}{did_you_mean(name, fields)} "
                    f"(columns: {sorted(detector.fields)})"
                )
                raise GeometryError(msg)
        for where, text in config.hit_cuts():
            selection.Cut(text, fields, f"{where} (sample {sample.name!r}, detector file {detector.path})")


def chunk_events(config: Config, images: tuple[ImageJob, ...] | None = None) -> int:
    """Events per chunk: the configured number, or ~AUTO_CHUNK_BYTES of images (all of an
    event's *images* together, the config's by default) per chunk."""
    if config.output.chunk_events != "auto":
        return int(config.output.chunk_events)
    return max(1, AUTO_CHUNK_BYTES // event_bytes(images if images is not None else image_jobs(config)))


def event_bytes(images: tuple[ImageJob, ...]) -> int:
    """Bytes of all of one event's images."""
    return sum(img.event_bytes for img in images)


def plan_report(config: Config, partitions, first_entries: dict[str, int], generated: dict[str, int]) -> BuildReport:
    layout = image_layout(config)
    report = BuildReport(config.name, config.output.path, dry_run=True)
    report.image_shape = layout.shape
    report.image_dtype = config.image.resolved_dtype
    images = image_jobs(config)
    report.chunk_events = chunk_events(config, images)
    report.n_partitions = len(partitions)
    image_bytes = event_bytes(images)
    report.images = {img.array: {"shape": list(img.layout.shape), "dtype": img.dtype} for img in images[1:]}
    estimate = 0
    per_partition = config.read.entries_per_partition
    split_later = _counted_on_workers(config, partitions)
    counted = {p.sample for p in partitions}
    for sample in config.samples:
        n_files = len({p.file for p in partitions if p.sample == sample.name})
        per_file = first_entries.get(sample.name, 0)
        if generated.get(sample.name) and sample.generate is not None:
            n_files, per_file = sample.generate.n_files, sample.generate.events_per_file
        events = per_file * n_files
        if sample.name not in counted or split_later:
            # Not planned yet (files still to generate, or to be cut into entry ranges by the
            # workers): estimated like the events.
            pieces = -(-per_file // per_partition) if per_partition else 1
            report.n_partitions += n_files * max(1, pieces) - sum(p.sample == sample.name for p in partitions)
        estimate += events
        report.samples[sample.name] = {"files": n_files, "label": sample.label, "estimated_events": events,
                                       "files_to_generate": generated.get(sample.name, 0)}
    output = Path(config.output.path)
    report.plan = {
        "estimated_events": estimate,
        "estimated_uncompressed_bytes": estimate * image_bytes,
        "note": "events estimated from the first file of each sample (or its generator) times its number of files"
                + ("; so are the partitions" if split_later or len(counted) < len(config.samples) else ""),
        "output_exists": output.exists() and not _empty_directory(output),
        "output_plan": output_plan(config).describe(config.output.path),
    }
    return report


def build_dataset(
    config: Config,
    *,
    client=None,
    dry_run: bool = False,
    progress: bool = True,
    console=None,
) -> BuildReport:
    """Build the store the config describes; return the report (the plan if *dry_run*)."""
    started = time.perf_counter()
    with Bar(enabled=progress and not dry_run, console=console) as bar:
        generated = _missing_examples(config)
        if any(generated.values()) and not dry_run:
            todo = [s.generate.n_files for s in config.samples if generated.get(s.name)]
            task = bar.add("generate example files", sum(todo))
            _generate_examples(config, generated, lambda: bar.advance(task))
            started = time.perf_counter()  # the build's wall time and events/s leave the generation out
        pending = {name for name, n in generated.items() if n and dry_run}
        skip = config.read.on_bad_file == "skip"
        partitions = sources.plan(
            [(s.name, s.label, s.files) for s in config.samples if s.name not in pending], must_exist=not skip,
        )
        partitions = _without_extra_examples(config, partitions, bar)
        first_entries = probe(config, partitions)
        if config.read.entries_per_partition and len(partitions) == 1:
            # The probe opened the only file: its entry ranges are known without another open.
            counts = [first_entries.get(partitions[0].sample)]
            partitions = sources.split_entries(partitions, counts, config.read.entries_per_partition)
        if Path(config.output.path).is_symlink():
            # A link to a store: build (and replace) the store it points to, as --output does.
            target = str(Path(config.output.path).resolve())
            config = config.model_copy(update={"output": config.output.model_copy(update={"path": target})})
        if dry_run:
            return plan_report(config, partitions, first_entries, generated)
        with store.output_lock(config.output.path):
            return _build_locked(config, partitions, client, bar, started)


def _build_locked(config: Config, partitions: list[sources.Partition], client, bar, started: float) -> BuildReport:
    """The build proper, under the output's lock: prepare the output, connect, stage, write.
    A cluster that does not come leaves no new staging area behind."""
    resumed = _prepare_output(config)
    if resumed:
        bar.print(f"resuming the interrupted build in {store.staging_path(config.output.path)}")
    in_process = config.cluster.in_process(len(partitions), small_input=_small_input(partitions))
    context = nullcontext(client) if client is not None else _connect(config, bar, in_process)
    # A LocalCluster started without a dashboard still has Dask's HTTP server, whose link
    # leads to no dashboard.
    dashboard = (client is not None or config.cluster.kind != "local"
                 or config.cluster.dashboard(in_process) is not None)
    # The build's client is Dask's current one while it runs: Dask helpers that look up the
    # default client (the performance report) must not find a user's other, or a closed, one.
    with ExitStack() as stack:
        try:
            active = stack.enter_context(context)
        except BaseException:
            if not resumed:  # nothing can have run: the staging area is the one just made
                shutil.rmtree(store.staging_path(config.output.path), ignore_errors=True)
            raise
        stack.enter_context(active.as_current())
        link = cluster.dashboard_link(active, config.cluster if client is None else None) if dashboard else None
        report_path = Path(config.output.path + ".performance-report.html")
        with _performance_report(report_path if config.cluster.performance_report else None):
            return _run(config, partitions, active, bar, started, dashboard=link)


def _small_input(partitions: list[sources.Partition]) -> bool:
    """Whether the plan's files are few and small (IN_PROCESS_FILES, IN_PROCESS_BYTES); at
    most IN_PROCESS_FILES files are looked at."""
    files = list(dict.fromkeys(p.file for p in partitions))
    if len(files) > IN_PROCESS_FILES:
        return False
    total = 0
    for path in files:
        try:
            total += Path(path).stat().st_size
        except OSError:  # a file that went missing: the build reports it, on workers
            return False
    return total <= IN_PROCESS_BYTES


def _connect(config: Config, bar: Bar, in_process: bool):
    return cluster.connect(config.cluster, say=bar.print, log_directory=slurm_log_directory(config),
                           in_process=in_process)


def slurm_log_directory(config: Config) -> str:
    """Where a SLURM build's worker jobs write their logs: beside the store."""
    return config.output.path + ".slurm-logs"


def _performance_report(path: Path | None):
    """Dask's performance report of the build, saved as HTML next to the store."""
    if path is None:
        return nullcontext()
    from distributed import performance_report

    return performance_report(filename=str(path))


@dataclass(frozen=True)
class OutputPlan:
    """What a build will do with its output and staging area (``output_plan``), decided
    without touching either: the dry run reports it, ``_prepare_output`` carries it out."""

    refusal: str | None = None  # the StoreError the build raises before writing anything
    resume: bool = False  # an interrupted build of the same config is resumed
    discard_staging: bool = False
    discard_output: bool = False  # an incomplete store with nothing to resume, replaced
    replaces: bool = False  # a complete store is replaced once the new build writes

    def describe(self, output: str) -> str:
        """One sentence for the dry run."""
        staging = store.staging_path(output)
        if self.refusal is not None:
            return f"the build will refuse: {self.refusal}"
        if self.resume:
            return f"the build will resume the interrupted build in {staging}"
        done = []
        if self.discard_staging:
            done.append("discard the staging area an interrupted build left, which cannot be resumed")
        if self.discard_output:
            done.append("replace the incomplete store there")
        if self.replaces:
            done.append("replace the complete store once it starts writing")
        return f"the build will {' and '.join(done)}" if done else "the build will write a new store"


def output_plan(config: Config) -> OutputPlan:
    """Decide what a build of *config* does with its output (see ``_prepare_output``)."""
    output = Path(config.output.path)
    staging = store.staging_path(output)
    for path, ours in ((output, store.is_hepdask_store(output)), (staging, store.read_build_record(staging) is not None)):
        if path.exists() and not ours and not _empty_directory(path):
            return OutputPlan(refusal=(
                f"{str(path)!r} exists and is not a hepdask {'store' if path == output else 'staging area'}; "
                "hepdask replaces only what it made: choose another output.path (--output) or move it away"))
    complete = store.is_complete(output)
    overwrite = config.output.overwrite
    discard_staging = False
    if staging.exists() and not store.has_finished_work(staging):
        # Left by a build that failed or was stopped before it finished anything (a bad cut,
        # a cluster that never came): nothing to resume.
        discard_staging = True
    record = store.read_build_record(staging) if staging.exists() and not discard_staging else None
    if record is not None:
        problem = _staged_elsewise(config, record)
        if problem is None and (overwrite or not complete or record.get("replaces")):
            # The store is kept: if it was prepared for the same write plan, the chunks its
            # finished write tasks wrote are kept too (``_run`` decides once it has the plan).
            return OutputPlan(resume=True)
        if problem is not None and not overwrite:
            return OutputPlan(refusal=(f"{str(staging)!r} holds an interrupted build {problem}; pass --overwrite "
                                       "(output.overwrite=true) to discard it and start over"))
        discard_staging = True
    if complete and not overwrite:
        return OutputPlan(refusal=(f"output {str(output)!r} exists (a complete store); pass --overwrite "
                                   "(output.overwrite=true) to replace it"))
    discard_output = not complete and output.exists() and not _empty_directory(output)
    if discard_output and not overwrite:
        return OutputPlan(refusal=(f"output {str(output)!r} exists (an incomplete store with nothing to resume); "
                                   "pass --overwrite (output.overwrite=true) to replace it"))
    return OutputPlan(discard_staging=discard_staging, discard_output=discard_output, replaces=complete)


def _prepare_output(config: Config) -> bool:
    """Make room for the build; return True when an interrupted build of the same config resumes.

    A staging area left by a killed build of the same config (same content hash, same
    detector files) is kept and its finished partitions are reused, whether or not the
    command says ``--overwrite``: running the same command again resumes. A complete store
    is replaced only by a build given ``overwrite`` (or resuming one that was), and only once
    the new build starts writing (``_run``): a build that fails while reading its inputs
    leaves it as it was. A staging area of another config is refused, never mixed; with
    ``overwrite`` it is discarded. Anything that is not hepdask's is refused.
    """
    plan = output_plan(config)
    if plan.refusal is not None:
        raise StoreError(plan.refusal)
    output = Path(config.output.path)
    staging = store.staging_path(output)
    if plan.resume:
        store.clean_staging(staging)
        return True
    if plan.discard_staging:
        shutil.rmtree(staging, ignore_errors=True)
    if plan.discard_output:
        shutil.rmtree(output, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        store.write_build_record(staging, {"config_hash": config.content_hash(), "version": __version__,
                                           "detectors": detector_digests(config), "replaces": plan.replaces})
    except OSError as err:
        msg = f"cannot create the output {str(output)!r}: {err.strerror or err} ({err.filename or output})"
        raise StoreError(msg) from err
    return False


def _staged_elsewise(config: Config, record: dict) -> str | None:
    """Why a staging area (its build *record*) cannot be resumed by *config*, or None."""
    if record.get("config_hash") != config.content_hash():
        return "of a different config"
    changed = [p for p, digest in detector_digests(config).items() if record.get("detectors", {}).get(p) != digest]
    if changed:
        return f"made with other contents of the detector file(s) {changed}"
    return None


def _empty_directory(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def detector_digests(config: Config) -> dict[str, str]:
    """sha256 of every detector file the build joins: a resumed build must use the same ones."""
    if config.geometry is None:
        return {}
    paths = sorted({s.geometry or config.geometry.file for s in config.samples})
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _raise_task_error(future, err: BaseException, where: str | Path) -> None:
    """Raise what task *future* raised, as one line; *where* is the directory it wrote to."""
    if isinstance(err, HepdaskError):
        raise err
    if isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS:
        msg = (f"task {future.key!r} could not write under {str(where)!r}: {err.strerror} "
               f"({err.filename or 'errno ' + str(err.errno)}); fix that and run the same command again to resume")
        raise BuildError(msg) from err
    msg = f"task {future.key!r} failed: {type(err).__name__}: {err}"
    raise BuildError(msg) from err


def process_partitions(partitions: list[sources.Partition], job: Job) -> list[dict]:
    """Stage several partitions in one task (``process_partition`` each, in order)."""
    return [process_partition(p, job) for p in partitions]


def partitions_per_task(setting: int | str, n_partitions: int, n_workers: int) -> int:
    """Partitions one stage task processes: *setting*, or with ``auto`` enough tasks for
    STAGE_TASKS_PER_WORKER per worker, at most MAX_PARTITIONS_PER_TASK each."""
    if setting != "auto":
        return int(setting)
    by_balance = n_partitions // (STAGE_TASKS_PER_WORKER * max(1, n_workers))
    return max(1, min(MAX_PARTITIONS_PER_TASK, by_balance))


def _stage_all(client, partitions: list[sources.Partition], job: Job, bar, worker_timeout: float,
               per_task: int) -> list[dict]:
    """Stage every partition, *per_task* consecutive ones a task; under ``skip``, a partition
    whose worker died on every retry (a "poison" file) is reported as bad instead of failing
    the build. A group that killed its workers is retried one partition a task, so only the
    poison file is lost (the group's partitions staged before it are reused)."""
    task = bar.add("read + bin", len(partitions))
    results: list[dict] = [{} for _ in partitions]
    todo = []
    for i, partition in enumerate(partitions):
        # Partitions a resumed build already staged from unchanged files need no task.
        done = store.load_staged(job.staging, partition.key)
        if done is not None and _unchanged(done, partition):
            results[i] = done.to_json()
            bar.advance(task)
        else:
            todo.append(i)
    groups = [todo[k : k + per_task] for k in range(0, len(todo), per_task)]
    members: dict[str, list[int]] = {}

    def submit(group: list[int]):
        key = f"stage-{job.build_id}-{partitions[group[0]].key}-{len(group)}"
        members[key] = group
        return client.submit(process_partitions, [partitions[i] for i in group], job, key=key)

    futures = [submit(g) for g in groups]
    # Results come with the completion events: one round trip per task would cost the
    # client several ms of CPU each on a machine whose cores the workers need. The loop is
    # *client*'s, not the default client's (see ``cluster.as_completed``).
    with cluster.WorkerWatch(client, futures, bar.print, worker_timeout) as watch:
        waiting = cluster.as_completed(client, futures, with_results=True)
        for future, result in waiting:
            watch.check()
            group = members[future.key]
            if future.status != "error":
                for i, staged in zip(group, result):
                    results[i] = staged
                bar.advance(task, len(group))
                continue
            err = result[1]
            if job.on_bad_file != "skip" or not cluster.killed_worker(err):
                client.cancel(futures)
                _raise_task_error(future, err, job.staging)
            if len(group) > 1:
                for i in group:
                    single = submit([i])
                    futures.append(single)
                    waiting.add(single)
                continue
            message = f"{partitions[group[0]].file}: every worker that read it died (a crash or out of memory)"
            results[group[0]] = {"key": partitions[group[0]].key,
                                 "bad": {"exception": "KilledWorker", "message": message}}
            bar.advance(task)
    return results


def _wait(client, futures, bar, task, worker_timeout: float, where: str | Path) -> None:
    """Wait for *futures*, advancing *task*; the first failure cancels the rest. The tasks
    write under *where*."""
    with cluster.WorkerWatch(client, futures, bar.print, worker_timeout) as watch:
        for future in cluster.as_completed(client, futures):
            watch.check()
            if future.status == "error":
                err = future.exception()
                client.cancel(futures)
                _raise_task_error(future, err, where)
            bar.advance(task)


def _counted_on_workers(config: Config, partitions: list[sources.Partition]) -> bool:
    """Whether the files are still to be cut into ``read.entries_per_partition`` ranges, once
    the workers have counted their entries (a one-file plan is cut with the probe's count)."""
    return config.read.entries_per_partition is not None and all(p.entry_stop is None for p in partitions)


def _split_files(client, partitions: list[sources.Partition], config: Config, bar, build_id: str):
    """Count every file's entries on the workers (a few files a task) and cut the files into
    partitions of at most ``read.entries_per_partition`` entries."""
    files = [p.file for p in partitions]
    per_task = max(1, -(-len(files) // (STAGE_TASKS_PER_WORKER * max(1, len(client.nthreads())))))
    groups = [files[i : i + per_task] for i in range(0, len(files), per_task)]
    task = bar.add("count entries", len(groups))
    futures = [client.submit(sources.count_entries, group, config.tree, memory_map=config.read.memory_map,
                             key=f"count-{build_id}-{i}") for i, group in enumerate(groups)]
    _wait(client, futures, bar, task, config.cluster.worker_timeout, config.output.path)
    counts = [n for group in client.gather(futures) for n in group]
    return sources.split_entries(partitions, counts, config.read.entries_per_partition)


def _run(config: Config, partitions: list[sources.Partition], client, bar, started: float, *,
         dashboard: str | None = None) -> BuildReport:
    job = Job.from_config(config)
    layout = job.layout
    report = BuildReport(config.name, config.output.path, dashboard=dashboard)
    if report.dashboard:
        bar.print(f"Dask dashboard: {report.dashboard}")
    cluster.setup_workers(client, config.cluster)
    if len(partitions) > 1 and _counted_on_workers(config, partitions):
        partitions = _split_files(client, partitions, config, bar, job.build_id)
    report.n_partitions = len(partitions)

    n_workers = max(1, len(client.nthreads()))
    per_task = partitions_per_task(config.read.partitions_per_task, len(partitions), n_workers)
    log.info("staging %d partition(s) of %d file(s), %d a task, on %d worker(s)", len(partitions),
             len({p.file for p in partitions}), per_task, n_workers)
    results = _stage_all(client, partitions, job, bar, config.cluster.worker_timeout, per_task)
    log.info("staged, %.2f s since the start", time.perf_counter() - started)
    bad_by_file = {p.file: {"path": p.file, "sample": p.sample, **r["bad"]} for p, r in zip(partitions, results)
                   if "bad" in r}
    report.bad_files = list(bad_by_file.values())
    _check_bad_fraction(config, report.bad_files, len({p.file for p in partitions}))
    staged = [store.Staged(r["key"], 0, {}) if "bad" in r else store.Staged.from_json(r) for r in results]

    by_sample = _sample_counts(config, partitions, staged, report.bad_files)
    _check_selected(config, by_sample, job.staging, bar)
    plans = store.assign([s.n_events for s in staged], config.output.split, seed=config.output.shuffle.seed,
                         shuffle=config.output.shuffle.enabled)
    arrays, dims = _array_specs(config, job.images, staged)
    per_chunk = chunk_events(config, job.images)
    coordinates = [c for img in job.images for c in _coordinates(img.layout, img.dim_prefix)]
    compressor = config.output.compressor
    codecs = store.resolve_compressors(compressor.name, compressor.level,
                                       _codec_samples(config, job, staged, arrays, per_chunk))
    plan_id = store.plan_digest(config.content_hash(), staged, codecs)
    finished = set()
    if store.prepared_for(config.output.path, plan_id):
        finished = store.written_tasks(job.staging, plan_id)
    else:
        shutil.rmtree(config.output.path, ignore_errors=True)
        store.prepare(
            config.output.path, {k: v.size for k, v in plans.items()}, arrays, dims, coordinates,
            chunk_events=store.array_chunk_events(arrays, (img.array for img in job.images), per_chunk),
            compressor=(compressor.name, compressor.level), resolved=codecs,
            attrs={store.PREFIX + "building": True},
            array_attrs={"label": _label_attrs(config)}, plan=plan_id,
        )
    metadata = config.metadata_values()
    constants = {
        i: {"label": p.label, "sample": p.sample, "source_file": p.file, **metadata[p.sample]}
        for i, p in enumerate(partitions)
    }
    ranges = {split: store.chunk_ranges(plan.size, per_chunk) for split, plan in plans.items()}
    chunk_bytes = int(per_chunk * store.gathered_bytes(staged, len(arrays)))
    # Counted again, not only before staging: SLURM workers may have joined since.
    n_workers = max(1, len(client.nthreads()))
    group = _chunks_per_task(sum(map(len, ranges.values())), chunk_bytes, n_workers,
                             image_chunk_bytes=per_chunk * event_bytes(job.images))
    slim = [s.slim() for s in staged]
    writes = []
    n_tasks = 0
    for split, plan in plans.items():
        for i in range(0, len(ranges[split]), group):
            n_tasks += 1
            task_ranges = ranges[split][i : i + group]
            start, stop = task_ranges[0][0], task_ranges[-1][1]
            name = f"{split}-{start}-{stop}"
            if name in finished:
                continue
            part, row = plan.part[start:stop], plan.row[start:stop]
            used = np.unique(part).tolist()
            sources_of_task = store.Sources({p: slim[p] for p in used}, {p: constants[p] for p in used})
            writes.append(client.submit(
                store.write_chunks, config.output.path, split, task_ranges, part, row, sources_of_task,
                job.staging, store.written_marker(job.staging, plan_id, name), key=f"write-{job.build_id}-{name}",
            ))
    if finished:
        bar.print(f"resuming: {n_tasks - len(writes)} of {n_tasks} write tasks had finished")
    write_task = bar.add("write chunks", n_tasks)
    bar.advance(write_task, n_tasks - len(writes))
    log.info("writing %s event(s) in %d task(s) of up to %d chunk(s) of %d events",
             {split: plan.size for split, plan in plans.items()}, len(writes), group, per_chunk)
    _wait(client, writes, bar, write_task, config.cluster.worker_timeout, config.output.path)
    log.info("written, %.2f s since the start; finalising", time.perf_counter() - started)

    maxima = store.written_maxima(job.staging, plan_id)
    report.image_shape, report.image_dtype, report.chunk_events = layout.shape, job.dtype, per_chunk
    _fill_report(report, config, job.images, partitions, staged, plans, by_sample)
    bad = {b["path"]: b for b in report.bad_files}
    manifest: dict[str, dict] = {}
    for p, s in zip(partitions, staged):  # one row per file, whatever its entry ranges
        row = manifest.setdefault(p.file, {
            "path": p.file, "sample": p.sample, "label": p.label, "entries": 0, "selected": 0,
            "size": s.info.get("size"), "mtime": s.info.get("mtime"), "status": "bad" if p.file in bad else "ok",
            **({"exception": bad[p.file]["exception"], "message": bad[p.file]["message"]} if p.file in bad else {}),
        })
        row["entries"] += s.info.get("entries", 0)
        row["selected"] += s.n_events
        for key in ("size", "mtime"):
            row[key] = row[key] if row[key] is not None else s.info.get(key)
    # The digests the build checked at its start (and a resume checked again), not a re-read.
    record = store.read_build_record(job.staging) or {}
    report.wall_seconds = time.perf_counter() - started
    _finalize(config.output.path, {
        store.PREFIX + "statistics": report.to_dict(),
        store.PREFIX + "version": __version__,
        store.PREFIX + "config": config.to_yaml(),
        store.PREFIX + "config_hash": config.content_hash(),
        store.PREFIX + "manifest": list(manifest.values()),
        **({store.PREFIX + "detectors": record.get("detectors", {})} if config.geometry is not None else {}),
        store.PREFIX + "splits": list(plans),
        store.PREFIX + "samples": {s.name: {"label": s.label, "metadata": s.metadata} for s in config.samples},
        **({store.PREFIX + "image_max": maxima} if maxima is not None else {}),
        store.PREFIX + "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        store.PREFIX + "building": False,
    })
    shutil.rmtree(job.staging, ignore_errors=True)
    return report


def _codec_samples(config: Config, job: Job, staged: list[store.Staged], arrays: dict[str, store.ArraySpec],
                   per_chunk: int) -> dict[str, tuple[str, np.ndarray | None]]:
    """``{image: (dtype, rows)}``: the first events (in plan order; a chunk's worth, at most
    ``store.AUTO_TRIAL_BYTES``) of each one-byte image, for ``auto`` to choose its
    compressor by (``store.compressor_name``); nothing for other compressors or dtypes. Read
    before an old store is replaced: a staged file that cannot be read fails the build first."""
    samples = {}
    for img in job.images:
        spec = arrays.get(img.array)
        if spec is not None and store.auto_trial(config.output.compressor.name, spec.dtype):
            n = store.auto_trial_rows(spec, per_chunk)
            samples[img.array] = (spec.dtype, store.first_rows(job.staging, staged, img.array, n))
    return samples


def _finalize(path: str, attrs: dict[str, Any]) -> None:
    """``store.finalize``, its I/O errors (a full disk) in one line: the store is then left
    without its completion marker, and the same command resumes it."""
    try:
        store.finalize(path, attrs)
    except OSError as err:
        if isinstance(err, HepdaskError):
            raise
        msg = (f"cannot finish the store {path!r}: {err.strerror or err} ({err.filename or path}); "
               f"free the space (or fix the cause) and run the same command again to finish it")
        raise StoreError(msg) from None


def _label_attrs(config: Config) -> dict[str, Any]:
    if config.labels is not None:
        values = set(config.labels.map.values()) | ({config.labels.default} if config.labels.default is not None else set())
        return {"flag_values": sorted(values), "source_field": config.labels.field}
    # Samples that share a label (two productions of one background) share its flag: the
    # meaning names them all, joined by '+'.
    names: dict[int, list[str]] = {}
    for sample in config.samples:
        names.setdefault(sample.label, []).append(sample.name)
    values = sorted(names)
    return {"flag_values": values, "flag_meanings": " ".join("+".join(names[v]) for v in values)}


def _sample_counts(config: Config, partitions: list[sources.Partition], staged: list[store.Staged],
                   bad_files: list[dict]) -> dict[str, dict]:
    """Per sample: files read, bad files skipped, events read and events selected (kept by
    the cuts)."""
    counts = {s.name: {"files": 0, "bad_files": 0, "read": 0, "selected": 0} for s in config.samples}
    bad = {b["path"] for b in bad_files}
    files = set()
    for partition, part in zip(partitions, staged):
        entry = counts[partition.sample]
        if partition.file not in files:
            entry["bad_files" if partition.file in bad else "files"] += 1
        files.add(partition.file)
        entry["read"] += int(part.info.get("entries", 0))
        entry["selected"] += part.n_events
    return counts


def _check_selected(config: Config, counts: dict[str, dict], staging: str, bar) -> None:
    """Refuse to write a store without events; say which samples lost every event (*counts*:
    ``_sample_counts``)."""
    read = {name: c["read"] for name, c in counts.items()}
    kept = {name: c["selected"] for name, c in counts.items()}
    cuts = ", ".join(f"{key} {text!r}" for key, text in (("selection.hits", config.selection.hits),
                                                          ("selection.events", config.selection.events)) if text)
    if not sum(kept.values()):
        # Nothing staged is worth resuming: any change that keeps events is a new config.
        shutil.rmtree(staging, ignore_errors=True)
        msg = (f"no event to write: of {sum(read.values())} events read, the selection ({cuts or 'none'}) "
               "kept none; nothing was written")
        raise BuildError(msg)
    for sample, n in kept.items():
        if n:
            continue
        if not read[sample] and counts[sample]["bad_files"] and not counts[sample]["files"]:
            bar.print(f"warning: sample {sample!r}: all its {counts[sample]['bad_files']} file(s) were bad "
                      f"and skipped (read.on_bad_file: skip); it has no events")
        else:
            bar.print(f"warning: sample {sample!r}: the selection ({cuts or 'none'}) kept none of its "
                      f"{read[sample]} events read")


def _check_bad_fraction(config: Config, bad_files: list[dict], n_files: int) -> None:
    if not bad_files or len(bad_files) <= config.read.max_bad_fraction * n_files:
        return
    listing = "; ".join(f"{b['path']} ({b['exception']})" for b in bad_files[:10])
    more = f" and {len(bad_files) - 10} more" if len(bad_files) > 10 else ""
    msg = (
        f"{len(bad_files)} of {n_files} input files are bad, more than read.max_bad_fraction="
        f"{config.read.max_bad_fraction:g}: {listing}{more}. The store is not finalised; "
        "the good partitions stay staged for a re-run"
    )
    raise BuildError(msg)


def _chunks_per_task(n_chunks: int, chunk_bytes: int, n_workers: int, unit: int = store.EVENT_ARRAY_CHUNKS,
                     image_chunk_bytes: int = 0) -> int:
    """Consecutive image chunks one write task fills: enough tasks to keep every worker
    busy (TASKS_PER_WORKER each), at most WRITE_TASK_BYTES held per task (*chunk_bytes* a
    chunk) and, given *image_chunk_bytes*, WRITE_TASK_IMAGE_BYTES of images, rounded to a
    multiple of *unit*: a task must own whole chunks of the small per-event arrays too
    (``store.EVENT_ARRAY_CHUNKS`` image chunks each)."""
    by_bytes = max(1, WRITE_TASK_BYTES // max(1, chunk_bytes))
    if image_chunk_bytes:
        by_bytes = min(by_bytes, max(1, WRITE_TASK_IMAGE_BYTES // image_chunk_bytes))
    by_balance = max(1, -(-n_chunks // (TASKS_PER_WORKER * n_workers)))
    return max(1, round(min(by_bytes, by_balance) / unit)) * unit


def _array_specs(config: Config, images: tuple[ImageJob, ...], staged: list[store.Staged]):
    arrays = {img.array: store.ArraySpec(img.dtype, img.layout.shape) for img in images}
    arrays |= {
        "label": store.ArraySpec("int32"),
        "sample": store.ArraySpec("str"),
        "source_file": store.ArraySpec("str"),
        "entry": store.ArraySpec("int64"),
    }
    example = next((s for s in staged if s.n_events), None)
    for name in config.event_fields():
        arrays[name] = example.arrays[name] if example else store.ArraySpec("float64")
    for name, dtype in config.metadata_fields().items():  # per-partition constants, like label
        arrays[name] = store.ArraySpec(dtype)
    dims = dict.fromkeys(arrays, ())
    for img in images:
        dims[img.array] = img.dims
    return arrays, dims


def _coordinates(layout: binning.ImageLayout, prefix: str = "") -> list[store.Coordinate]:
    """Coordinates of an image's dims (named ``prefix + dim``): bin centres, edges, units."""
    kinds = {binning.UNIFORM: "linear", binning.LOG: "log", binning.EXPLICIT: "explicit"}
    if layout.channel_names:
        n = layout.shape[0]
        described = {"u": "rows: first axis of each projection", "v": "columns: second axis of each projection"}
        coords = [store.Coordinate(prefix + d, np.arange(n, dtype=np.int64), {"description": described[d]})
                  for d in ("u", "v")]
        axes_attrs = {a.name: {"edges": a.edges.tolist(), "units": a.units, "scale": kinds[a.kind]} for a in layout.axes}
        coords.append(store.Coordinate(prefix + "projection", np.array(layout.channel_names),
                                       {"axes": axes_attrs}))
        return coords
    return [
        store.Coordinate(prefix + a.name, a.centers,
                         {"edges": a.edges.tolist(), "units": a.units, "scale": kinds[a.kind]})
        for a in layout.axes
    ]


def _fill_report(report: BuildReport, config: Config, images: tuple[ImageJob, ...], partitions, staged,
                 plans, by_sample: dict[str, dict]) -> None:
    stats = binning.BinStats(tuple(a.name for a in images[0].layout.axes))
    extra = {img.array: binning.BinStats(tuple(a.name for a in img.layout.axes)) for img in images[1:]}
    report.samples.update(by_sample)
    for s in staged:
        if "stats" in s.info:
            stats += binning.BinStats.from_dict(s.info["stats"])
        for name, image_stats in s.info.get("image_stats", {}).items():
            extra[name] += binning.BinStats.from_dict(image_stats)
        for name, n in s.info.get("hit_counts", {}).items():
            report.hit_counts[name] = report.hit_counts.get(name, 0) + int(n)
    index = {s.name: i for i, s in enumerate(config.samples)}
    part_sample = np.array([index[p.sample] for p in partitions], np.int64)
    for split, plan in plans.items():
        in_split = np.bincount(part_sample[plan.part], minlength=len(config.samples)) if plan.size else np.zeros(len(config.samples), int)
        report.splits[split] = {"events": plan.size, **{s.name: int(n) for s, n in zip(config.samples, in_split)}}
    report.hits = stats.to_dict()
    report.images = {img.array: {"shape": list(img.layout.shape), "dtype": img.dtype, "hits": extra[img.array].to_dict()}
                     for img in images[1:]}

