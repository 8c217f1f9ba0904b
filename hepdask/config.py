"""The typed YAML config of one dataset build.

``load(path, overrides)`` reads the file with ``yaml.safe_load``, applies ``--set key.sub=value``
overrides, validates with pydantic (unknown keys are rejected with a suggestion) and resolves
every relative path against the directory of the config file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, SelectionError, did_you_mean


def _not_empty(path: str) -> str:
    if not path:
        msg = "is empty: give a path (an empty one would name the config's own directory)"
        raise ValueError(msg)
    return path


#: A path in a config: an empty one is refused (resolved, it would name the config's directory).
PathText = Annotated[str, AfterValidator(_not_empty)]
#: dtypes an image may be stored as; integer images count hits and saturate at their maximum.
ImageDtype = Literal["uint8", "uint16", "uint32", "float32", "float64"]
INTEGER_DTYPES = ("uint8", "uint16", "uint32")

#: Aim for this many uncompressed bytes per image chunk when ``chunk_events: auto``. Measured
#: in benchmarks/RESULTS.md: zstd-1 chunks of ~7 MB wrote at 245 MB/s, 115 KB chunks at 53 MB/s.
AUTO_CHUNK_BYTES = 4 * 2**20

_ARRAY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


#: A seed of numpy's generators (``default_rng``), which take any integer >= 0.
Seed = Annotated[int, Field(ge=0)]
#: A seed of the tf.data reader (``hepdask.tfdata.SEED_LIMIT``).
ReaderSeed = Annotated[int, Field(ge=0, lt=2**32)]


class ExampleData(_Model):
    """Generate synthetic example files for a sample when its files do not exist yet."""

    kind: Literal["ldmx-ecal"] = "ldmx-ecal"
    signal: bool
    n_files: Annotated[int, Field(gt=0)] = 100
    events_per_file: Annotated[int, Field(gt=0)] = 500
    seed: Seed = 0
    directory: PathText


class Sample(_Model):
    """One labelled sample: files given by glob patterns or explicit paths."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")]
    files: list[PathText]
    label: int
    metadata: dict[str, float | int | str | bool] = {}
    generate: ExampleData | None = None
    #: This sample's detector file, overriding ``geometry.file`` (each run has its own).
    geometry: PathText | None = None

    @field_validator("files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("files")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            msg = "a sample needs at least one file or glob pattern"
            raise ValueError(msg)
        return value


class Axis(_Model):
    """One image axis: a hit field binned with uniform, log-spaced or explicit edges."""

    field: str
    bins: Annotated[int, Field(gt=0)] | None = None
    range: tuple[float, float] | None = None
    edges: list[float] | None = None
    scale: Literal["linear", "log"] = "linear"
    downsample: Annotated[int, Field(gt=0)] = 1
    units: str = ""
    name: str | None = None

    @model_validator(mode="after")
    def _edges_or_bins(self) -> Axis:
        if self.edges is not None:
            if self.bins is not None or self.range is not None:
                msg = f"axis {self.field!r}: give either 'edges' or 'bins' with 'range', not both"
                raise ValueError(msg)
            if (len(self.edges) < 2 or not all(math.isfinite(e) for e in self.edges)
                    or any(b <= a for a, b in zip(self.edges, self.edges[1:]))):
                msg = f"axis {self.field!r}: edges {list(self.edges)} must be at least two finite, increasing numbers"
                raise ValueError(msg)
            if self.scale != "linear":
                msg = f"axis {self.field!r}: 'scale' applies to bins+range, not explicit edges"
                raise ValueError(msg)
            nbins = len(self.edges) - 1
        else:
            if self.bins is None or self.range is None:
                msg = f"axis {self.field!r}: needs 'bins' and 'range' (or explicit 'edges')"
                raise ValueError(msg)
            lo, hi = self.range
            if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(hi - lo) and hi > lo):
                msg = f"axis {self.field!r}: range {list(self.range)} must be finite and increasing"
                raise ValueError(msg)
            if self.scale == "log" and lo <= 0:
                msg = f"axis {self.field!r}: a log-spaced axis needs a positive range start"
                raise ValueError(msg)
            nbins = self.bins
            import numpy as np

            spaced = np.geomspace if self.scale == "log" else np.linspace
            if not np.all(np.diff(spaced(lo, hi, nbins + 1)) > 0):
                msg = (f"axis {self.field!r}: {nbins} bins over range {list(self.range)} are narrower than "
                       f"float64 can tell apart there")
                raise ValueError(msg)
        if nbins % self.downsample:
            msg = f"axis {self.field!r}: {nbins} bins are not divisible by downsample={self.downsample}"
            raise ValueError(msg)
        return self

    @property
    def label(self) -> str:
        return self.name or self.field

    @property
    def nbins_out(self) -> int:
        """Number of bins in the stored image, after downsampling."""
        n = self.bins if self.edges is None else len(self.edges) - 1
        return n // self.downsample


class Image(_Model):
    """How each event's hits become one image."""

    axes: Annotated[list[Axis], Field(min_length=1, max_length=4)]
    format: Literal["histogram", "xyz", "z_split"] = "histogram"
    weight: str | None = None
    dtype: ImageDtype | None = None
    #: A hit cut for this image alone (after ``selection``), e.g. ``du == 2`` for one string.
    hits: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Image:
        labels = [a.label for a in self.axes]
        if len(set(labels)) != len(labels):
            msg = f"image axes need distinct names, got {labels}; set 'name' on repeated fields"
            raise ValueError(msg)
        if self.weight is not None and self.dtype in INTEGER_DTYPES:
            msg = f"a weighted image (weight={self.weight!r}) needs a float dtype, not {self.dtype}"
            raise ValueError(msg)
        if self.format in ("xyz", "z_split"):
            fields = [a.field for a in self.axes]
            if len(self.axes) != 3:
                msg = f"format {self.format!r} needs exactly three axes (x, y, z), got {fields}"
                raise ValueError(msg)
        if self.format == "xyz":
            sizes = {a.nbins_out for a in self.axes}
            if len(sizes) != 1:
                msg = "format 'xyz' stacks three square projections: all axes need equal bins"
                raise ValueError(msg)
        return self

    @property
    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "float32" if self.weight else "uint16"


class Selection(_Model):
    """Cuts written as expressions over field names, e.g. ``E > 0.5`` or ``nhits >= 10``."""

    hits: str | None = None
    events: str | None = None


class Read(_Model):
    """How input files are read, and what a bad input file does to the build.

    ``step_size`` entries are read at a time (this bounds a worker's memory).
    ``entries_per_partition`` splits every file into partitions of at most that many entries,
    so that a few large files are staged in parallel (by default a partition is a whole
    file); the entries are then counted by opening every file once on the workers.
    ``partitions_per_task`` partitions (files) are staged by one Dask task: ``auto`` groups
    small-file datasets so that per-task overhead does not dominate (see
    ``build.partitions_per_task``); it does not change what is stored. ``memory_map``
    reads input files through a memory map (``uproot.MemmapSource``), which costs less per
    file than uproot's default source; ``false`` gives uproot's default (for file systems
    where mapping files misbehaves). With
    ``on_bad_file: skip``, a file that cannot be read (see ``sources.BAD_FILE_ERRORS``) or
    that kills its worker on every retry is left out and listed in the report; if more than
    ``max_bad_fraction`` of the files are bad, the build stops without finalising.
    """

    step_size: Annotated[int, Field(gt=0)] = 20_000
    entries_per_partition: Annotated[int, Field(gt=0)] | None = None
    partitions_per_task: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    memory_map: bool = True
    on_bad_file: Literal["fail", "skip"] = "fail"
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05


class Geometry(_Model):
    """A detector table joined onto every hit (see ``hepdask.geometry``).

    ``file`` is a KM3NeT ``.detx`` (any version) or a CSV table. ``keys`` maps the table's key
    columns to hit fields (a detx is keyed by ``dom_id`` and ``channel_id``; MC hits use
    ``{pmt_id: pmt_id}``). Every other table column becomes a hit field (``pos_x``, ``pos_y``,
    ``pos_z``, ``dir_x``, ``dir_y``, ``dir_z``, ``t0``, ``du``, ``floor``...). With ``time``
    set, the hit field ``calibrated`` (default ``time``) is ``time + t0``, minus the PMT time
    slewing of ``tot`` when ``time_slewing`` is on (KM3NeT's default, as OrcaSong does).
    """

    file: PathText | None = None
    keys: dict[str, str] | None = None
    time: str | None = None
    tot: str | None = None
    time_slewing: bool = True
    calibrated: str = "time"
    on_unknown: Literal["error", "drop"] = "error"
    det_id: str | None = None
    centre: tuple[float | None, float | None, float | None] | None = None

    @model_validator(mode="after")
    def _check(self) -> Geometry:
        if self.time_slewing and self.time is not None and self.tot is None:
            msg = "geometry.time_slewing needs geometry.tot (the hit field with the time over threshold); or set time_slewing: false"
            raise ValueError(msg)
        return self

    def key_map(self) -> dict[str, str]:
        return dict(self.keys) if self.keys else {"dom_id": "dom_id", "channel_id": "channel_id"}


class Time(_Model):
    """Hit-time handling, applied after the geometry join and before the selection.

    ``reference: first_triggered`` subtracts, per event, the earliest (calibrated) time among
    the event's triggered hits (``triggered`` field non-zero), taken over all its hits before
    any hit cut, as OrcaSong's ``center_time`` does; an event without a triggered hit then
    has no time (its hits count as NaN in the statistics, or, with ``window``, as outside
    it). ``triggered_only`` keeps only the triggered hits; ``window`` keeps hits with
    ``lo <= time <= hi`` (after the centring, compared in float64).
    """

    field: str = "time"
    triggered: str | None = None
    reference: Literal["none", "first_triggered"] = "none"
    triggered_only: bool = False
    window: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> Time:
        if (self.reference == "first_triggered" or self.triggered_only) and self.triggered is None:
            msg = "time.triggered (the hit field flagging triggered hits) is needed for first_triggered / triggered_only"
            raise ValueError(msg)
        if self.window is not None and not self.window[0] < self.window[1]:
            msg = f"time.window {list(self.window)} must be increasing"
            raise ValueError(msg)
        return self


class Truth(_Model):
    """Event truth from the KM3NeT offline format's MC tracks (track ``track``, 0 being the
    primary): ``<prefix>energy``, ``dir_x/y/z``, ``zenith``, ``azimuth``, ``vertex_x/y/z``,
    ``pdgid``, and ``bjorken_y`` (``w2list[8]`` of gSeaGen files), NaN where absent. Zenith
    and azimuth are those of the direction the particle comes from, in radians, as
    ``km3pipe.math.zenith`` / ``azimuth`` define them."""

    preset: Literal["km3net-offline"] = "km3net-offline"
    track: Annotated[int, Field(ge=0)] = 0
    prefix: str = "mc_"


class Labels(_Model):
    """Labels per event from an event field: ``map`` takes a value to a class (e.g. PDG id
    to class); an unmapped value is an error unless ``default`` is set."""

    field: str
    map: dict[float, int]
    default: int | None = None


#: The highest level of each compressor (``none`` takes any, and ignores it; ``auto`` may
#: pick either of the other two).
MAX_LEVEL = {"zstd": 22, "blosc-lz4": 9, "auto": 9}


class Compressor(_Model):
    """``auto``: ``zstd``, except ``blosc-lz4`` (bit-shuffled LZ4) for one-byte count images
    that a trial of their first events finds nearly as small with it (noisy images,
    which it decodes up to 3.5x faster, so training reads them faster)
    (``store.compressor_name``; README, "The store")."""

    name: Literal["auto", "zstd", "blosc-lz4", "none"] = "auto"
    level: Annotated[int, Field(ge=0)] = 1

    @model_validator(mode="after")
    def _level_in_range(self) -> Compressor:
        if self.level > MAX_LEVEL.get(self.name, self.level):
            msg = f"compressor {self.name!r}: level {self.level} is above its highest, {MAX_LEVEL[self.name]}"
            raise ValueError(msg)
        return self


class Shuffle(_Model):
    enabled: bool = True
    seed: Seed = 42


class Output(_Model):
    path: PathText
    split: dict[str, Annotated[float, Field(ge=0, le=1)]] = {"train": 0.8, "val": 0.1, "test": 0.1}
    shuffle: Shuffle = Shuffle()
    chunk_events: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    compressor: Compressor = Compressor()
    overwrite: bool = False

    @field_validator("shuffle", mode="before")
    @classmethod
    def _bool_shuffle(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("path")
    @classmethod
    def _names_a_directory(cls, value: str) -> str:
        if not Path(value).name:
            msg = f"{value!r} names no directory to build the store in (give e.g. {str(Path(value) / 'data.zarr')!r})"
            raise ValueError(msg)
        return value

    @field_validator("split")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            msg = "output.split needs at least one split"
            raise ValueError(msg)
        for name in value:
            if not name.isidentifier():
                msg = f"split name {name!r} must be a plain identifier"
                raise ValueError(msg)
        total = sum(value.values())
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            msg = f"split fractions must add up to 1, got {total:g} from {value}"
            raise ValueError(msg)
        return value


class Tls(_Model):
    """Dask TLS: ``temporary`` makes a self-signed certificate for a LocalCluster; for an
    existing scheduler give the files (as dask's ``Security`` takes them)."""

    temporary: bool = False
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None


#: A Dask scheduler address: ``[protocol://]host:port`` (``inproc://`` addresses have no port).
_SCHEDULER_ADDRESS = re.compile(r"^(inproc://\S+|([a-z]+://)?(\[[0-9a-fA-F:]+\]|[^\s:/\[\]]+):\d+)$")

#: ``cluster.dashboard_address: auto`` for a LocalCluster of worker processes.
DEFAULT_DASHBOARD = "127.0.0.1:8787"


class Cluster(_Model):
    """Where the build runs: a LocalCluster (default), SLURM jobs, or a scheduler address.

    ``slurm``: a dask-jobqueue SLURMCluster from ``profile`` (dask-jobqueue's own YAML, see
    jobqueue/slurm.yaml), scaled adaptively between ``minimum_jobs`` and ``jobs`` jobs; the
    build starts once ``minimum_jobs`` jobs' workers have joined (``worker_timeout`` seconds
    at most).

    ``processes`` (``local`` only): ``true`` starts worker processes, ``false`` runs the
    tasks inside the hepdask process, one at a time (no process start-up, no protection
    against a file that crashes its worker): in the calling thread, or, where a dashboard,
    ``performance_report`` or ``tls`` needs a Dask scheduler, on one worker thread of an
    in-process LocalCluster. Unset, a plan of one partition runs in the
    process (there is nothing to run in parallel), and so does a plan whose files are small
    (``hepdask.build.IN_PROCESS_BYTES`` in all, at most ``IN_PROCESS_FILES`` files) unless
    ``workers`` or ``threads_per_worker`` is set; any other plan runs on worker processes.
    ``dashboard_address``: where the Dask dashboard listens; ``auto`` is 127.0.0.1:8787 for
    worker processes and none for a build in this process (its one worker shows nothing a
    progress bar does not, and starting the dashboard costs ~0.6 s);
    ``null`` starts none. ``tune_malloc`` sets glibc's malloc
    thresholds on every worker so that chunk-sized buffers are reused (``hepdask.malloc``,
    through the ``hepdask.workers.TunedMalloc`` worker plugin). ``tune_gc`` has every worker
    process import the build stack with the garbage collector paused and freeze it, so that
    its collections skip those objects (``hepdask.heap``, through the
    ``hepdask.workers.FrozenImports`` worker plugin).
    """

    kind: Literal["local", "slurm", "address"] = "local"
    address: str | None = None
    workers: Annotated[int, Field(gt=0)] | None = None
    threads_per_worker: Annotated[int, Field(gt=0)] = 1
    processes: bool | None = None
    memory_limit: str = "auto"
    dashboard_address: str | None = "auto"
    tls: Tls | None = None
    profile: PathText | None = None
    jobs: Annotated[int, Field(gt=0)] = 4
    minimum_jobs: Annotated[int, Field(ge=0)] = 1
    worker_timeout: Annotated[float, Field(gt=0)] = 600
    performance_report: bool = False
    tune_malloc: bool = True
    tune_gc: bool = True

    @model_validator(mode="after")
    def _address(self) -> Cluster:
        if self.kind == "address" and not self.address:
            msg = "cluster.kind 'address' needs cluster.address (e.g. tcp://127.0.0.1:8786)"
            raise ValueError(msg)
        if self.kind == "address" and not _SCHEDULER_ADDRESS.match(self.address or ""):
            hint = did_you_mean(str(self.address), ["local", "slurm"])
            msg = (f"cluster.address {self.address!r} is not a scheduler address such as tcp://127.0.0.1:8786"
                   f"{hint}{' (cluster.kind, or --cluster)' if hint else ''}")
            raise ValueError(msg)
        if self.minimum_jobs > self.jobs:
            msg = f"cluster.minimum_jobs ({self.minimum_jobs}) exceeds cluster.jobs ({self.jobs})"
            raise ValueError(msg)
        if self.processes is False:
            if self.kind != "local":
                msg = f"cluster.processes false runs the build in this process; cluster.kind is {self.kind!r}"
                raise ValueError(msg)
            for key in ("workers", "threads_per_worker"):
                if (getattr(self, key) or 1) > 1:
                    msg = (f"cluster.processes false runs one single-threaded worker in this process; "
                           f"cluster.{key} is {getattr(self, key)}")
                    raise ValueError(msg)
        return self

    def dashboard(self, in_process: bool) -> str | None:
        """The address the dashboard of a LocalCluster listens on (None: no dashboard)."""
        if self.dashboard_address != "auto":
            return self.dashboard_address
        return None if in_process else DEFAULT_DASHBOARD

    def in_process(self, n_partitions: int, small_input: bool = False) -> bool:
        """Whether a plan of *n_partitions* runs on a worker inside this process: with
        ``processes`` unset, a plan of one partition does, and so does any plan whose input is
        small (*small_input*) unless ``workers`` or ``threads_per_worker`` asks for more."""
        if self.kind != "local":
            return False
        if self.processes is not None:
            return not self.processes
        return n_partitions <= 1 or (small_input and self.workers is None and self.threads_per_worker == 1)


class Config(_Model):
    """A whole build: samples, fields, image, selection, output and cluster."""

    name: str
    samples: Annotated[list[Sample], Field(min_length=1)]
    tree: str
    hits: Annotated[dict[str, str], Field(min_length=1)]
    event: dict[str, str] = {}
    geometry: Geometry | None = None
    time: Time | None = None
    truth: Truth | None = None
    labels: Labels | None = None
    image: Image
    #: More images of the same events, each stored as ``image_<name>`` with dims ``<name>_<axis>``.
    images: dict[str, Image] = {}
    selection: Selection = Selection()
    read: Read = Read()
    output: Output
    cluster: Cluster = Cluster()

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        names = [s.name for s in self.samples]
        if len(set(names)) != len(names):
            msg = f"sample names must be unique, got {names}"
            raise ValueError(msg)
        hit_fields = self.hit_fields()
        # A name missing from a CSV table's unknown columns is reported by the build's check.
        checked = hit_fields if self.table_columns_known() else None
        for key in self.images:
            if not _ARRAY_NAME.match(key):
                msg = f"images: name {key!r} must be a plain identifier (it names the array image_{key})"
                raise ValueError(msg)
        for where, image in self.all_images().items():
            where = image_key(where)
            for axis in image.axes:
                if checked is not None and axis.field not in checked:
                    msg = f"{where} axis field {axis.field!r} is not a hit field{did_you_mean(axis.field, hit_fields)} (hit fields: {sorted(hit_fields)})"
                    raise ValueError(msg)
            if checked is not None and image.weight is not None and image.weight not in checked:
                msg = f"{where}.weight {image.weight!r} is not a hit field{did_you_mean(image.weight, hit_fields)}"
                raise ValueError(msg)
        self._check_geometry(hit_fields)
        event_fields = self.event_fields()
        if self.labels is not None and self.labels.field not in event_fields:
            msg = f"labels.field {self.labels.field!r} is not an event field{did_you_mean(self.labels.field, event_fields)} (event fields: {sorted(event_fields)})"
            raise ValueError(msg)
        for name in event_fields:
            if not _ARRAY_NAME.match(name):
                msg = f"event field name {name!r} must be a plain identifier (it names a stored array)"
                raise ValueError(msg)
        if "nhits" in event_fields:
            msg = ("event field name 'nhits' is taken: in selection.events it is the number of hits "
                   "that passed the hit cut; give the branch another field name (event: {n_hits: nhits})")
            raise ValueError(msg)
        reserved = {*self.all_images(), "label", "sample", "source_file", "entry", "event", *self.output.split}
        clash = reserved & set(event_fields)
        if clash:
            msg = f"event field names {sorted(clash)} clash with store arrays {sorted(reserved)}"
            raise ValueError(msg)
        for key in self.metadata_fields():
            if not _ARRAY_NAME.match(key) or key in reserved or key in event_fields:
                msg = (f"samples: metadata key {key!r} names a per-event array: it must be a plain identifier "
                       f"and not one of {sorted(reserved | set(event_fields))}")
                raise ValueError(msg)
        self._check_cuts(hit_fields, event_fields)
        return self

    def _check_cuts(self, hit_fields: list[str], event_fields: list[str]) -> None:
        """Parse every cut now, so a typo fails before any cluster starts. Hit field names are
        all known unless a CSV detector table adds columns that only the file names."""
        from .selection import Cut

        hit_names = hit_fields if self.table_columns_known() else None
        cuts = [(where, text, hit_names) for where, text in self.hit_cuts()]
        if self.selection.events:
            cuts.append(("selection.events", self.selection.events, [*event_fields, "nhits"]))
        for where, text, names in cuts:
            try:
                Cut(text, names, where)
            except SelectionError as err:
                raise ValueError(str(err)) from None

    def hit_cuts(self) -> list[tuple[str, str]]:
        """Every hit cut as ``(config key, text)``: ``selection.hits``, then each image's."""
        cuts = [("selection.hits", self.selection.hits)]
        cuts += [(f"{image_key(array)}.hits", image.hits) for array, image in self.all_images().items()]
        return [(where, text) for where, text in cuts if text]

    def all_images(self) -> dict[str, Image]:
        """Every image of the build by its array name: ``image``, then ``image_<name>``."""
        return {"image": self.image, **{f"image_{k}": v for k, v in self.images.items()}}

    def detector_files(self) -> dict[str, str | None]:
        """The detector file each sample joins (``geometry.file`` unless the sample names its
        own); empty without a geometry section."""
        if self.geometry is None:
            return {}
        return {s.name: s.geometry or self.geometry.file for s in self.samples}

    def table_columns_known(self) -> bool:
        """Whether the config alone tells every hit field: true unless a sample joins a CSV
        table (or a file of another kind), whose columns only its header names."""
        return all((f or "").lower().endswith(".detx") for f in self.detector_files().values())

    def hit_fields(self) -> list[str]:
        """Hit fields after the geometry join: the read ones and what the detector adds.

        A ``.detx`` adds its fixed columns; a CSV table's columns are not listed here
        (:meth:`table_columns_known` is then false): the build checks them against the
        table's header before any task runs (``build.probe``).
        """
        fields = list(self.hits)
        if self.geometry is not None:
            from .geometry import DETX_COLUMNS

            if self.table_columns_known():
                fields += [f for f in DETX_COLUMNS if f not in fields]
            if self.geometry.time is not None:
                fields.append(self.geometry.calibrated)
        return list(dict.fromkeys(fields))

    def metadata_fields(self) -> dict[str, str]:
        """Every sample metadata key with the dtype of the per-event array that stores it:
        ``str`` if any sample gives text, ``int64`` if every sample gives a whole number (or
        a bool), else ``float64`` (NaN for a sample without the key)."""
        keys = list(dict.fromkeys(k for s in self.samples for k in s.metadata))
        dtypes = {}
        for key in keys:
            values = [s.metadata.get(key) for s in self.samples]
            if any(isinstance(v, str) for v in values):
                dtypes[key] = "str"
            elif all(isinstance(v, int) for v in values):
                dtypes[key] = "int64"
            else:
                dtypes[key] = "float64"
        return dtypes

    def metadata_values(self) -> dict[str, dict[str, Any]]:
        """``{sample: {key: value}}``: every sample's metadata as its per-event arrays store
        it (:meth:`metadata_fields`; NaN or "" for a key the sample has not)."""

        def stored(value: Any, kind: str) -> Any:
            if kind == "str":
                return "" if value is None else str(value)
            if value is None:
                return float("nan")
            return int(value) if kind == "int64" else float(value)

        kinds = self.metadata_fields()
        return {s.name: {key: stored(s.metadata.get(key), kind) for key, kind in kinds.items()} for s in self.samples}

    def event_fields(self) -> list[str]:
        """Event fields stored per event: the read ones and the truth preset's."""
        from .truth import truth_fields

        derived = truth_fields(self.truth.prefix) if self.truth is not None else []
        return [*self.event, *derived]

    def _check_geometry(self, hit_fields: list[str]) -> None:
        geometry = self.geometry
        if geometry is None:
            if any(s.geometry for s in self.samples):
                msg = "a sample sets 'geometry' but the config has no geometry section"
                raise ValueError(msg)
            if self.time is not None and self.time.field not in hit_fields:
                msg = f"time.field {self.time.field!r} is not a hit field{did_you_mean(self.time.field, hit_fields)}"
                raise ValueError(msg)
            return
        if geometry.file is None and not all(s.geometry for s in self.samples):
            missing = [s.name for s in self.samples if not s.geometry]
            msg = f"geometry.file is not set and samples {missing} give no geometry of their own"
            raise ValueError(msg)
        for column, hit in geometry.key_map().items():
            if hit not in self.hits:
                msg = f"geometry.keys: {column!r} is joined on hit field {hit!r}, which is not read{did_you_mean(hit, self.hits)}"
                raise ValueError(msg)
        for name in (geometry.time, geometry.tot if geometry.time_slewing else None):
            if name is not None and name not in self.hits:
                msg = f"geometry: hit field {name!r} is not read{did_you_mean(name, self.hits)} (hit fields: {sorted(self.hits)})"
                raise ValueError(msg)
        if geometry.time is not None and geometry.calibrated in self.hits:
            msg = f"geometry.calibrated {geometry.calibrated!r} clashes with a read hit field; name the calibrated time differently"
            raise ValueError(msg)
        if geometry.det_id is not None and geometry.det_id not in self.event:
            msg = f"geometry.det_id {geometry.det_id!r} is not an event field{did_you_mean(geometry.det_id, self.event)}"
            raise ValueError(msg)
        if self.time is not None and self.table_columns_known():
            for name in (self.time.field, self.time.triggered):
                if name is not None and name not in hit_fields:
                    msg = f"time: {name!r} is not a hit field{did_you_mean(name, hit_fields)}"
                    raise ValueError(msg)

    def content_hash(self) -> str:
        """Hash of everything that determines the staged partitions and the store's content.

        Where the build runs, whether it may overwrite, how partitions are grouped into
        tasks, how files are read (memory-mapped or not) and the bad-file policy are left
        out: a build resumed with ``--overwrite`` off or ``skip`` on reuses what was staged.
        """
        payload = self.model_dump(
            mode="json",
            exclude={"cluster": True, "output": {"overwrite"},
                     "read": {"on_bad_file", "max_bad_fraction", "partitions_per_task", "memory_map"}},
        )
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def image_dim_prefix(array: str) -> str:
    """The prefix of an image array's dims: ``""`` for ``image``, ``"<name>_"`` for ``image_<name>``."""
    return "" if array == "image" else array[len("image_"):] + "_"


def image_key(array: str) -> str:
    """The config key of an image array: ``image``, or ``images.<name>`` for ``image_<name>``."""
    return "image" if array == "image" else f"images.{array[len('image_'):]}"


# --------------------------------------------------------------------------------------------
# loading


class Override(str):
    """A ``key.sub=value`` override that a command-line flag made: errors name the flag as
    the user typed it (``--workers 0``), not the ``--set`` it stands for."""

    label: str

    def __new__(cls, text: str, label: str) -> Override:
        override = super().__new__(cls, text)
        override.label = label
        return override

    def __getnewargs__(self) -> tuple[str, str]:  # copy and pickle keep the label
        return str(self), self.label


def override_origin(text: str) -> str:
    """How the user gave an override: its flag, or ``--set 'key=value'``."""
    return getattr(text, "label", None) or f"--set {str(text)!r}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value`` into its key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not all(parts):
        msg = f"{override_origin(text)}: expected KEY.SUB=VALUE (keys separated by single dots)"
        raise ConfigError(msg)
    if any("[" in part for part in parts):
        dotted = re.sub(r"\[\s*(\d+)\s*\]", r".\1", key.strip())
        msg = f"{override_origin(text)}: list items are numbered with dots: {dotted}={raw.strip()}"
        raise ConfigError(msg)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        msg = f"{override_origin(text)}: value is not valid YAML: {_yaml_problem(err)}"
        raise ConfigError(msg) from err
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to the raw config mapping (list items by integer index)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    msg = f"{override_origin(text)}: {where!r} is not an index of a list of {len(node)}"
                    raise ConfigError(msg)
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                msg = f"{override_origin(text)}: {'.'.join(path[:depth])!r} is a value, not a section"
                raise ConfigError(msg)
    return data


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        model = _first_model(annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


#: Names pydantic gives the members of a union in an error's location (besides names that
#: are no identifiers, such as ``constrained-int`` or ``literal['auto']``).
_UNION_TAGS = {"int", "float", "str", "bool", "none"}


def _key(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error's location without pydantic's union-member tags: the config key at fault."""
    return tuple(p for p in loc if not (isinstance(p, str) and (not p.isidentifier() or p in _UNION_TAGS)))


def _merged_message(items: list[dict]) -> str:
    """One message for the errors of one key: the alternatives of a union joined with "or"."""
    messages = [item["msg"].removeprefix("Value error, ") for item in items]
    prefix = "Input should be "
    if len(messages) > 1 and all(m.startswith(prefix) for m in messages):
        return prefix + " or ".join(m[len(prefix):].split(",")[0] for m in messages)
    return "; ".join(dict.fromkeys(messages))


def _describe(err: ValidationError, source: str, root: type[BaseModel] | None = None,
              overrides: Sequence[str] = ()) -> str:
    """One line per config key at fault, naming the key, the value given, and where it was
    given: the config file, or the ``--set`` override (or flag) that set it."""
    root = root or Config
    set_by = [(tuple(parse_override(text)[0]), text) for text in overrides]

    def origin(key: tuple[Any, ...]) -> str:
        """The last override that set the key (or a section holding it); for an error of a
        whole section, the file and every override inside the section."""
        parts = tuple(map(str, key))
        setting = [text for path, text in set_by if parts[: len(path)] == path]
        if setting:
            return override_origin(setting[-1])
        inside = [override_origin(text) for path, text in set_by if path[: len(parts)] == parts]
        return f"{source} with {', '.join(dict.fromkeys(inside))}" if inside else source

    grouped: dict[tuple[Any, ...], list[dict]] = {}
    for item in err.errors():
        grouped.setdefault(_key(tuple(item["loc"])), []).append(item)
    missing = {key for key, items in grouped.items() if items[0]["type"] == "missing"}
    lines, explained = [], set()
    for key, items in grouped.items():
        if items[0]["type"] != "extra_forbidden":
            continue
        parent = _model_at(key[:-1], root)
        choices = list(parent.model_fields) if parent else []
        lines.append(f"{origin(key)}: unknown key {'.'.join(map(str, key))!r}{did_you_mean(str(key[-1]), choices)}")
        explained.update(m for m in missing if m[:-1] == key[:-1] and did_you_mean(str(key[-1]), [m[-1]]))
    for key, items in grouped.items():
        if items[0]["type"] == "extra_forbidden" or key in explained:
            continue  # a misspelt required key: its unknown-key line says what to write
        value = items[0].get("input")
        shown = "" if isinstance(value, dict | list) or items[0]["type"] == "missing" else f" (got {value!r})"
        where = f"{'.'.join(map(str, key))}: " if key else ""
        lines.append(f"{origin(key)}: {where}{_merged_message(items)}{shown}")
    return "\n".join(lines)


#: ``km3net-testdata:offline/x.root`` names a file of the km3net-testdata package.
TESTDATA_SCHEME = "km3net-testdata:"


def _testdata(path: str) -> str:
    try:
        import km3net_testdata
    except ImportError:
        msg = f"{path!r} needs the km3net-testdata package: pip install 'hepdask[km3net]'"
        raise ConfigError(msg) from None
    try:
        return str(km3net_testdata.data_path(path[len(TESTDATA_SCHEME):]))
    except (RuntimeError, OSError, ValueError) as err:
        msg = f"{path!r}: no such file in the km3net-testdata package ({err})"
        raise ConfigError(msg) from None


def _resolve(path: str, base: Path) -> str:
    if not path:  # left for validation to refuse (PathText), not taken as the config's directory
        return path
    if path.startswith(TESTDATA_SCHEME):
        return _testdata(path)
    expanded = os.path.expanduser(os.path.expandvars(path))
    if "://" in expanded or os.path.isabs(expanded):
        return expanded
    return os.path.normpath(str(base / expanded))


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    for sample in data.get("samples") or []:
        if not isinstance(sample, dict):
            continue
        files = sample.get("files")
        if isinstance(files, str):
            sample["files"] = _resolve(files, base)
        elif isinstance(files, list):
            sample["files"] = [_resolve(f, base) if isinstance(f, str) else f for f in files]
        if isinstance(sample.get("geometry"), str):
            sample["geometry"] = _resolve(sample["geometry"], base)
        gen = sample.get("generate")
        if isinstance(gen, dict) and isinstance(gen.get("directory"), str):
            gen["directory"] = _resolve(gen["directory"], base)
    geometry = data.get("geometry")
    if isinstance(geometry, dict) and isinstance(geometry.get("file"), str):
        geometry["file"] = _resolve(geometry["file"], base)
    output = data.get("output")
    if isinstance(output, dict) and isinstance(output.get("path"), str):
        output["path"] = _resolve(output["path"], base)
    cluster = data.get("cluster")
    if isinstance(cluster, dict) and isinstance(cluster.get("profile"), str):
        cluster["profile"] = _resolve(cluster["profile"], base)
    return data


def from_dict(data: dict[str, Any], *, base: str | Path = ".", source: str = "<config>",
              overrides: Sequence[str] = ()) -> Config:
    """Validate a config mapping; relative paths are taken relative to *base*. *overrides*
    (already applied) are named in the errors of the keys they set."""
    if not isinstance(data, dict):
        msg = f"{source}: the config must be a YAML mapping, got {type(data).__name__}"
        raise ConfigError(msg)
    data = _resolve_paths(json.loads(json.dumps(data)), Path(base).resolve())
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source, overrides=overrides)) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's text spans several lines,
    with a copy of the offending line)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        msg = f"config file {str(path)!r} does not exist"
        raise ConfigError(msg) from None
    except OSError as err:
        msg = f"config file {str(path)!r} cannot be read: {err}"
        raise ConfigError(msg) from None
    except UnicodeDecodeError as err:
        msg = f"config file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); is it a YAML file?"
        raise ConfigError(msg) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        msg = f"{path}: not valid YAML (only plain YAML is accepted, no Python tags): {_yaml_problem(err)}"
        raise ConfigError(msg) from None
    if not isinstance(data, dict):
        msg = f"{path}: the config must be a YAML mapping, got {type(data).__name__}"
        raise ConfigError(msg)
    _refuse_duplicate_keys(path, yaml.compose(text, Loader=yaml.SafeLoader))
    return data


def _refuse_duplicate_keys(path: Path, node: yaml.Node | None, where: str = "",
                           keys: yaml.SafeLoader | None = None) -> None:
    """YAML lets a later key silently replace an earlier one of the same mapping (two
    ``weight:`` lines); a config that says a thing twice is refused, naming both lines."""
    keys = keys or yaml.SafeLoader("")  # builds the mappings' keys from their nodes
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Node] = {}
        for key, value in node.value:
            # Compared as YAML reads them: 13 and 13.0 are one key, 1 and '1' two.
            name = keys.construct_object(key) if isinstance(key, yaml.ScalarNode) else None
            full = f"{where}.{key.value}" if where else str(key.value)
            if name is not None and name in seen:
                msg = (f"{path}: key {full!r} is given twice (lines {seen[name].start_mark.line + 1} and "
                       f"{key.start_mark.line + 1}); keep one")
                raise ConfigError(msg)
            seen[name] = key
            _refuse_duplicate_keys(path, value, full, keys)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(path, item, f"{where}.{i}", keys)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override, validate and resolve the YAML config at *path* (*overrides*: a list of
    ``key.sub=value`` strings, or one)."""
    path = Path(path)
    data, overrides = _read_overridden(path, overrides)
    return from_dict(data, base=path.parent, source=str(path), overrides=overrides)


def _read_overridden(path: Path, overrides: Sequence[str] | str) -> tuple[dict[str, Any], list[str]]:
    """The YAML mapping at *path* with *overrides* applied (one string is one override), and
    the overrides as a list."""
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    data = _read_yaml(path)
    return (apply_overrides(data, overrides) if overrides else data), overrides


# --------------------------------------------------------------------------------------------
# training


class TrainData(_Model):
    """What a training reads from the store, and how."""

    fields: tuple[str, str] = ("image", "label")
    extra_inputs: list[str] = []
    batch_size: Annotated[int, Field(gt=0)] = 256
    shuffle_buffer: Annotated[int, Field(gt=0)] | None = None
    transforms: list[Literal["log1p", "divide_by_max", "add_channel_axis", "channels_first_to_last"]] = []
    #: The dtype the images reach the model in; ``null`` keeps the stored dtype (e.g. uint8
    #: counts, cast by the model on the accelerator: a quarter of the bytes to move).
    cast: Literal["float32", "float16", "bfloat16"] | None = "float32"
    seed: ReaderSeed = 42
    steps_per_epoch: Annotated[int, Field(gt=0)] | None = None


class Model(_Model):
    """A model of the zoo: ``ldmx_convnet`` (2 conv + 2 dense, the LDMX study), ``vgg``
    (the KM3NeT muon/neutrino study's VGG-like CNN) or ``resnet`` (a small ResNet)."""

    name: Literal["ldmx_convnet", "vgg", "resnet"] = "ldmx_convnet"
    dims: Literal[2, 3] = 2
    filters: Annotated[int, Field(gt=0)] = 32
    dense: Annotated[int, Field(gt=0)] = 128
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    classes: Annotated[int, Field(ge=2)] = 2


class Fit(_Model):
    """``evaluate``: which weights the test metrics are of: ``best`` (the epoch with the lowest
    validation loss, saved as best.keras; the training loss without a val split) or ``last``."""

    epochs: Annotated[int, Field(gt=0)] = 5
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    evaluate: Literal["best", "last"] = "best"


class Strategy(_Model):
    """``mirrored`` over all visible GPUs (or ``devices``), ``one_device`` on ``devices[0]``.
    ``logical_cpus: N`` splits the CPU into N logical devices, which ``mirrored`` then uses
    when no GPU is visible (a real N-replica MirroredStrategy on CPU, as the tests use); with
    a GPU, the GPUs are used."""

    kind: Literal["mirrored", "one_device"] = "mirrored"
    devices: list[str] | None = None
    logical_cpus: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _devices(self) -> Strategy:
        if self.kind == "one_device" and self.devices is not None and len(self.devices) != 1:
            msg = f"strategy one_device takes one device, got {self.devices}"
            raise ValueError(msg)
        return self


class TrainConfig(_Model):
    """A training run on a store."""

    name: str
    store: PathText
    output: PathText
    data: TrainData = TrainData()
    model: Model = Model()
    fit: Fit = Fit()
    strategy: Strategy = Strategy()
    overwrite: bool = False


def load_train(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read and validate a training config; ``store`` and ``output`` are relative to it."""
    path = Path(path)
    data, overrides = _read_overridden(path, overrides)
    base = path.parent.resolve()
    for key in ("store", "output"):
        if isinstance(data.get(key), str):
            data[key] = _resolve(data[key], base)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, str(path), TrainConfig, overrides)) from None
