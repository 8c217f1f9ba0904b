"""The Zarr v3 store: staging, assembly into splits, finalisation and reading.

A build writes in three steps, as pangeo-forge does:

1. ``stage``: each partition's events land in the staging area beside the store, as one
   file ``<store>.hepdask-staging/<key>.part`` (raw sections per array, a mostly-zero image
   as its non-zero bins, and the partition's record at its end), moved into place by an
   atomic rename when the partition is complete, so a task that runs twice is harmless.
2. ``assign`` + ``write_chunks``: a seeded permutation decides every event's split and
   position; each task then fills a run of whole chunks of every array of one split, so no
   two tasks ever write into the same Zarr chunk, and leaves a marker once done: a resumed
   build of the same plan (``plan_digest``) skips the tasks that finished.
3. ``finalize``: attributes and consolidated metadata, then the completion marker
   ``hepdask:complete`` as the very last write; the build then removes the staging area.

Layout, per split group (``train``, ``val``, ``test``): ``image(event, <axes>)``,
``label(event)``, ``sample(event)``, ``source_file(event)``, ``entry(event)``, one array per
event field, and a coordinate per image axis (bin centres; edges and units in its attrs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

from .errors import StoreError

log = logging.getLogger(__name__)

COMPLETE = "hepdask:complete"
PREFIX = "hepdask:"
STAGING_SUFFIX = ".hepdask-staging"
LOCK_SUFFIX = ".hepdask-lock"
#: A staged partition's file, after its key.
PART_SUFFIX = ".part"


def staging_path(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + STAGING_SUFFIX)


def make_parent(store: str | Path) -> None:
    """Create the directory that holds *store*, or say in one line why it cannot be."""
    parent = Path(store).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{str(blocking)!r} is a file, not a directory" if blocking else f"{err.strerror or err} ({err.filename})"
        msg = f"cannot create the output {str(store)!r}: {reason}"
        raise StoreError(msg) from None


def lock_path(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + LOCK_SUFFIX)


@contextmanager
def output_lock(store: str | Path) -> Iterator[None]:
    """Hold the build lock of the output *store* (``{store}.hepdask-lock``, an exclusive
    ``flock``) while a build prepares, stages and writes it: a second build of the same
    output, from any process that sees the same file system, is refused, naming the first.
    The lock is released with the process however it ends; the file is removed by its holder.
    Another user's lock file is locked read-only; one this user cannot open is refused, naming
    it. Only where no lock file can be made at all (a directory this user cannot write) or
    ``flock`` is missing does the build go on unlocked."""
    import fcntl
    import socket

    path = lock_path(store)
    if not Path(store).name:
        msg = f"output {str(store)!r} names no directory to build into"
        raise StoreError(msg)
    make_parent(store)
    while True:
        fd, writable = _open_lock(path)
        if fd is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() if writable else ""
            os.close(fd)
            holder = holder or f"another build (its lock file {str(path)!r} is {_owner(path)}'s)"
            msg = (f"output {str(store)!r} is being built by {holder}: wait for that build to end "
                   f"(or stop it) before starting another")
            raise StoreError(msg) from None
        except OSError:  # no flock here (some network file systems)
            os.close(fd)
            fd = None
            break
        try:
            same = os.fstat(fd).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: again
    if fd is None:
        log.warning("building %s without a lock: %s cannot be locked here", store, path)
        yield
        return
    try:
        if writable:
            with suppress(OSError):  # the holder's name is a courtesy (a full disk, a size limit)
                os.ftruncate(fd, 0)
                os.write(fd, f"hepdask process {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with suppress(OSError):  # another user's file in a directory we may not change holds nothing
            path.unlink(missing_ok=True)
        with suppress(OSError):
            os.close(fd)


def _open_lock(path: Path) -> tuple[int | None, bool]:
    """The lock file, open for writing (made if missing, readable by every user, whatever the
    umask, so that their builds can lock it too), else read-only (another user's). None
    where no lock file can be made (a directory this user cannot write); ``StoreError`` where
    one is there that this user cannot open: its holder may be running."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        pass
    else:
        with suppress(OSError):
            os.fchmod(fd, 0o644)
        return fd, True
    try:
        return os.open(path, os.O_RDONLY), False
    except FileNotFoundError:
        return None, False
    except OSError:
        msg = (f"cannot lock the output: {str(path)!r} is {_owner(path)}'s and this user cannot open it; "
               f"if no build of that output is running, its owner can delete it")
        raise StoreError(msg) from None


def _owner(path: Path) -> str:
    try:
        import pwd

        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (ImportError, KeyError, OSError):
        return "another user"


# --------------------------------------------------------------------------------------------
# 1. staging


@dataclass(frozen=True)
class ArraySpec:
    """dtype and per-event shape of one staged array, and how it is staged.

    A *sparse* array is staged as its non-zero elements only; a *table* array is a column
    of the partition's one table of small per-event values (see ``PartitionWriter``).
    """

    dtype: str
    shape: tuple[int, ...] = ()
    sparse: bool = False
    table: bool = False

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))

    @property
    def size(self) -> int:
        """Elements per event."""
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Staged:
    """What a finished partition left in the staging area.

    *blocks* locates its sections in its file: one block per appended step, each
    ``{"n": events, "at": {section: [byte offset, bytes]}}``. Sections are named after the
    array and how it is staged (``SPARSE_SECTIONS``, ``DENSE_SECTION``), the table is
    ``TABLE_SECTION``.
    """

    key: str
    n_events: int
    arrays: dict[str, ArraySpec]
    info: dict[str, Any] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        arrays = {k: {"dtype": v.dtype, "shape": list(v.shape), **({"sparse": True} if v.sparse else {}),
                      **({"table": True} if v.table else {})}
                  for k, v in self.arrays.items()}
        return {"key": self.key, "n_events": self.n_events, "arrays": arrays, "info": self.info,
                "blocks": self.blocks}

    def slim(self) -> Staged:
        """The record without ``info`` (the statistics): what reading its rows needs."""
        return Staged(self.key, self.n_events, self.arrays, blocks=self.blocks)

    @classmethod
    def from_json(cls, data: dict) -> Staged:
        arrays = {k: ArraySpec(v["dtype"], tuple(v["shape"]), bool(v.get("sparse", False)),
                               bool(v.get("table", False)))
                  for k, v in data["arrays"].items()}
        return cls(data["key"], int(data["n_events"]), arrays, data.get("info", {}), data.get("blocks", []))

    def extents(self, section: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per block: its first event, and the byte offset and length of *section* in it."""
        cache = self.__dict__.setdefault("_extents", {})  # a write task asks for each many times
        if section not in cache:
            n = np.array([b["n"] for b in self.blocks], dtype=np.int64)
            at = np.array([b["at"][section] for b in self.blocks], dtype=np.int64).reshape(-1, 2)
            cache[section] = (np.cumsum(n) - n, at[:, 0], at[:, 1])
        return cache[section]

    @property
    def table_dtype(self) -> np.dtype:
        """One record of the partition's table file: its table arrays, packed, in order."""
        return table_dtype(self.arrays)


def table_dtype(specs: Mapping[str, ArraySpec]) -> np.dtype:
    return np.dtype([(name, spec.dtype, spec.shape) for name, spec in specs.items() if spec.table])


class PartitionWriter:
    """Append a partition's events step by step; ``close(info)`` publishes them atomically.

    Everything goes into one file, ``<key>.part``: each appended step is a block of raw
    sections, and the partition's record (``Staged``, with where each block's sections
    lie) closes the file, followed by its length and ``PART_MAGIC``. A file without that
    ending is not a staged partition (``load_staged``). One file per partition, not one per
    array: creating a file is a metadata operation that cost this 2-core VM 0.1-0.4 ms on
    ext4, more than binning the partition, and costs more on a parallel file system.

    The arrays' dtypes and per-event shapes are taken from the first step appended. Arrays of
    at most ``TABLE_ROW_BYTES`` per event (labels, entries, event fields, MC truth) are staged
    together as the records of one section, ``TABLE_SECTION``. A larger dense array is staged
    as ``<name>.bin``, its raw bytes. An image array whose first step is mostly zeros
    (``_stage_sparse``) is staged as its non-zero elements: ``<name>.nnz`` (int32 non-zero
    count per event), ``<name>.idx`` (int32 flat position of each non-zero element within
    its event) and ``<name>.val`` (the element). "Zero" means all bits zero, so -0.0 and NaN
    are kept and the rows read back are byte-identical. Calorimeter and hit-count images are
    ~95 % zeros: staging them dense wrote, and the write phase read back, 20 times the bytes.
    """

    def __init__(self, staging: str | Path, key: str) -> None:
        self.staging = Path(staging)
        self.key = key
        self.specs: dict[str, ArraySpec] = {}
        self.tmp = self.staging / f".tmp-{key}-{uuid.uuid4().hex[:12]}{PART_SUFFIX}"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")  # closed by close or abort
        self._table = np.dtype([])
        self._blocks: list[dict] = []
        self.n_events = 0

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        if not self.specs:
            self.specs = {name: _staged_spec(a) for name, a in arrays.items()}
            self._table = table_dtype(self.specs)
        n = {a.shape[0] for a in arrays.values()}
        if set(arrays) != set(self.specs) or len(n) != 1:
            msg = f"staging {self.key}: arrays {sorted(arrays)} of lengths {sorted(n)} do not match {sorted(self.specs)}"
            raise StoreError(msg)
        count = next(iter(n))
        records = np.empty(count, dtype=self._table) if self._table.names else None
        sections: list[tuple[str, np.ndarray]] = []
        for name, spec in self.specs.items():
            array = arrays[name].astype(spec.dtype, copy=False)
            if array.shape[1:] != spec.shape:
                msg = f"staging {self.key}/{name}: got shape {array.shape}, expected (n, *{spec.shape})"
                raise StoreError(msg)
            if spec.table:
                records[name] = array
            elif spec.sparse:
                # Imported here: numba's import is a third of `hepdask info`'s start-up.
                from .binning import nonzero_elements

                sections += [(f"{name}{suffix}", part) for suffix, part in zip(SPARSE_SECTIONS, nonzero_elements(array))]
            else:
                sections.append((f"{name}{DENSE_SECTION}", array))
        if records is not None:
            sections.append((TABLE_SECTION, records))
        at = {}
        offset = self._file.tell()
        for section, values in sections:
            at[section] = [offset, values.nbytes]
            if values.nbytes:
                self._file.write(values)  # its buffer, no copy
            offset += values.nbytes
        self._blocks.append({"n": count, "at": at})
        self.n_events += count

    def close(self, info: Mapping[str, Any]) -> Staged:
        staged = Staged(self.key, self.n_events, self.specs, dict(info), self._blocks)
        record = json.dumps(staged.to_json()).encode()
        try:
            self._file.write(record + len(record).to_bytes(8, "little") + PART_MAGIC)
            self._file.close()
            # Atomic; a copy an earlier run of this task published holds the same content.
            self.tmp.replace(staged_file(self.staging, self.key))
        except BaseException:
            self.abort()
            raise
        return staged

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


#: The last bytes of a complete staged partition file (after its record and the record's length).
PART_MAGIC = b"HDPART01"


def staged_file(staging: str | Path, key: str) -> Path:
    """The file of a staged partition (published or not)."""
    return Path(staging) / f"{key}{PART_SUFFIX}"


#: The sections of a sparse staged array, after its name; of a dense one.
SPARSE_SECTIONS = (".nnz", ".idx", ".val")
DENSE_SECTION = ".bin"
#: The section of a partition's table arrays (one packed record per event), and the most
#: bytes per event an array may have to be staged there.
TABLE_SECTION = "table"
TABLE_ROW_BYTES = 64


def _staged_spec(array: np.ndarray) -> ArraySpec:
    """How the array of a partition's first step is staged: sparse, a table column, or raw."""
    spec = ArraySpec(str(array.dtype), array.shape[1:], _stage_sparse(array))
    if not spec.sparse and spec.itemsize <= TABLE_ROW_BYTES and array.dtype.kind not in "OV":
        return ArraySpec(spec.dtype, spec.shape, table=True)
    return spec


#: Stage an image sparse when its non-zero elements and their int32 positions take at most
#: this fraction of its dense bytes.
SPARSE_MAX_FRACTION = 0.5


def _stage_sparse(array: np.ndarray) -> bool:
    """Whether *array* (a first step of events) is an image that pays to stage sparse."""
    if array.ndim < 2 or array.shape[0] == 0 or array.dtype.itemsize not in (1, 2, 4, 8):
        return False
    flat = np.ascontiguousarray(array).reshape(array.shape[0], -1)
    if flat.shape[1] >= 2**31:  # positions are int32
        return False
    nonzero = int(np.count_nonzero(flat.view(f"u{flat.dtype.itemsize}")))
    return nonzero * (4 + array.dtype.itemsize) <= SPARSE_MAX_FRACTION * flat.nbytes


BUILD_RECORD = "build.json"


def write_build_record(staging: str | Path, record: Mapping[str, Any]) -> None:
    """What the staging area belongs to (the config hash), so a resumed build can check it."""
    (Path(staging) / BUILD_RECORD).write_text(json.dumps(dict(record)))


def read_build_record(staging: str | Path) -> dict | None:
    path = Path(staging) / BUILD_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def clean_staging(staging: str | Path) -> None:
    """Remove what killed tasks left half-written (their ``.tmp-*`` files)."""
    for tmp in Path(staging).glob(".tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def has_finished_work(staging: str | Path) -> bool:
    """Whether a staging area holds anything a resumed build would reuse: a published
    partition or a finished write task."""
    staging = Path(staging)
    published = (p for p in staging.glob(f"*{PART_SUFFIX}") if not p.name.startswith(".tmp-"))
    return any(published) or any(p.is_file() for p in (staging / WRITTEN).rglob("*"))


def discard_staged(staging: str | Path, key: str) -> None:
    staged_file(staging, key).unlink(missing_ok=True)


def load_staged(staging: str | Path, key: str) -> Staged | None:
    """The record of a published partition, or None (none, or a damaged file)."""
    try:
        with open(staged_file(staging, key), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end < 8 + len(PART_MAGIC):
                return None
            f.seek(end - 8 - len(PART_MAGIC))
            tail = f.read()
            n = int.from_bytes(tail[:8], "little")
            if tail[8:] != PART_MAGIC or n > end - len(tail):
                return None
            f.seek(end - len(tail) - n)
            return Staged.from_json(json.loads(f.read(n)))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):  # a damaged record: stage it again
        return None


def read_rows(staging: str | Path, staged: Staged, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows *rows* of a staged array (dense, whatever its staging), read with ``preadv``.

    Runs of wanted rows (of a sparse array: of their non-zero elements) less than
    ``COALESCE_BYTES`` apart are read in one call, the bytes in between read and dropped: a
    shuffled build wants scattered rows, and one system call per row costs more than reading
    a few unwanted ones. Files are opened for this call only: a write task touching thousands
    of partitions holds no file descriptors and no memory maps (which would count in the
    worker's RSS).
    """
    spec = staged.arrays[name]
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.empty((0, *spec.shape), dtype=spec.dtype)
    if spec.table:
        return np.ascontiguousarray(read_table_rows(staging, staged, rows)[name])
    if not spec.sparse:
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        with _Part(staging, staged) as part:
            values, at = part.read_ranges(f"{name}{DENSE_SECTION}", ordered, ordered + 1, spec.itemsize)
        out = np.empty((rows.size, *spec.shape), dtype=spec.dtype)
        out[order] = np.frombuffer(values, dtype=spec.dtype).reshape(-1, *spec.shape)[at]
        return out
    counts, positions, values = read_sparse_rows(staging, staged, name, rows)
    return densify(counts, positions, values, spec).reshape(rows.size, *spec.shape)


def read_table_rows(staging: str | Path, staged: Staged, rows: np.ndarray) -> np.ndarray:
    """Rows *rows* of a partition's table: the records of all its table arrays at once,
    in the order of *rows* (read as ``read_rows`` reads)."""
    record = staged.table_dtype
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    out = np.empty(rows.size, dtype=record)
    if rows.size:
        with _Part(staging, staged) as part:
            values, at = part.read_ranges(TABLE_SECTION, ordered, ordered + 1, record.itemsize)
        out[order] = np.frombuffer(values, dtype=record)[at]
    return out


def read_sparse_rows(staging: str | Path, staged: Staged, name: str, rows: np.ndarray):
    """Rows *rows* of a sparse staged array as ``(counts, positions, values)``
    (``binning.nonzero_elements``' form), in the order asked for."""
    return _sparse_rows(staging, staged, name, rows, with_table=False)[:3]


#: A partition staged in one block, whose sections a write task reads take at most this
#: many bytes, is read with one open and a call per section when the task wants at least
#: 1/WHOLE_BLOCK_SHARE of its rows: a shuffled build's write task wants a few scattered rows
#: of every partition, and the per-call cost of the ranged reads, not the bytes, was most of
#: its time (0.4 ms a partition and task). With many tasks (many workers) each wants too few
#: rows for reading the whole sections to pay.
WHOLE_BLOCK_BYTES = 2**20
WHOLE_BLOCK_SHARE = 16


def _whole_block(staging: str | Path, staged: Staged, sections: list[str], n_rows: int) -> dict[str, memoryview] | None:
    """*sections* of a one-block partition read whole, if they are small enough and
    *n_rows* wanted rows are enough of the partition's (see WHOLE_BLOCK_BYTES); else None."""
    if len(staged.blocks) != 1 or n_rows * WHOLE_BLOCK_SHARE < staged.n_events:
        return None
    at = staged.blocks[0]["at"]
    offsets = np.array([at[section][0] for section in sections], dtype=np.int64)
    lengths = np.array([at[section][1] for section in sections], dtype=np.int64)
    if lengths.sum() > WHOLE_BLOCK_BYTES:
        return None
    with _Part(staging, staged) as part:
        view = memoryview(part._read("+".join(sections), offsets, lengths))
    starts = (np.cumsum(lengths) - lengths).tolist()
    return {section: view[a : a + n] for section, a, n in zip(sections, starts, lengths.tolist())}


def _sparse_rows(staging: str | Path, staged: Staged, name: str, rows: np.ndarray, *, with_table: bool):
    """``read_sparse_rows``, and, *with_table*, the same rows of the partition's table
    (``read_table_rows``; None without): ``(counts, positions, values, table)``."""
    spec = staged.arrays[name]
    rows = np.asarray(rows, dtype=np.int64)
    table = with_table and any(s.table for s in staged.arrays.values())
    sections = [f"{name}{suffix}" for suffix in SPARSE_SECTIONS] + ([TABLE_SECTION] if table else [])
    nnz_section, idx_section, val_section = sections[:3]
    whole = _whole_block(staging, staged, sections, rows.size)
    if whole is not None:
        record_type = staged.table_dtype
        sizes = {nnz_section: 4 * staged.n_events,
                 **({TABLE_SECTION: record_type.itemsize * staged.n_events} if table else {})}
        for section, size in sizes.items():
            if len(whole[section]) != size:
                msg = (f"staged file {staged_file(staging, staged.key)} does not match its record: "
                       f"section {section!r} of {len(whole[section])} bytes, {size} expected")
                raise StoreError(msg)
        nnz = np.frombuffer(whole[nnz_section], np.int32)
        ptr = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])
        if len(whole[idx_section]) != 4 * ptr[-1] or len(whole[val_section]) != np.dtype(spec.dtype).itemsize * ptr[-1]:
            msg = (f"staged file {staged_file(staging, staged.key)} does not match its record: "
                   f"sections {idx_section!r}, {val_section!r} do not hold {ptr[-1]} elements")
            raise StoreError(msg)
        positions = np.frombuffer(whole[idx_section], np.int32)
        values = np.frombuffer(whole[val_section], spec.dtype)
        counts = nnz[rows]
        take = _segments(ptr[rows], counts)
        records = np.frombuffer(whole[TABLE_SECTION], record_type)[rows] if table else None
        return counts, positions[take], values[take], records
    records = read_table_rows(staging, staged, rows) if table else None
    with _Part(staging, staged) as part:
        nnz = part.section(nnz_section, np.int32, staged.n_events)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        # Element ranges of the wanted rows, numbered per block as the blocks' sections are.
        first, _, _ = staged.extents(nnz_section)
        ptr = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])
        block_ptr = ptr[first]
        starts = ptr[ordered]
        stops = starts + nnz[ordered]
        element_first = (block_ptr, ordered, first)
        positions, at = part.read_ranges(idx_section, starts, stops, 4, element_first)
        values, _ = part.read_ranges(val_section, starts, stops, np.dtype(spec.dtype).itemsize, element_first)
    # Row rows[j] begins at at[inverse[j]] in both buffers.
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    counts = nnz[rows]
    take = _segments(at[inverse], counts)
    return counts, np.frombuffer(positions, np.int32)[take], np.frombuffer(values, spec.dtype)[take], records


class _Part:
    """A staged partition's file, open for reading its sections."""

    def __init__(self, staging: str | Path, staged: Staged) -> None:
        self.path = str(staged_file(staging, staged.key))
        self.staged = staged

    def __enter__(self) -> _Part:
        self.fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def _truncated(self, section: str, detail: str) -> StoreError:
        return StoreError(f"staged file {self.path} is truncated: section {section!r}, {detail}")

    def _read(self, section: str, offsets: np.ndarray, lengths: np.ndarray) -> bytearray:
        """The byte extents ``[offsets[i], offsets[i] + lengths[i])``, one after another."""
        out = bytearray(int(lengths.sum()))
        view = memoryview(out)
        at = 0
        for offset, length in zip(offsets.tolist(), lengths.tolist()):
            got = os.preadv(self.fd, [view[at : at + length]], offset) if length else 0
            if got != length:
                raise self._truncated(section, f"{got} of {length} bytes at byte {offset}")
            at += length
        return out

    def section(self, section: str, dtype, n: int) -> np.ndarray:
        """A whole section of *n* elements, all its blocks."""
        _, offsets, lengths = self.staged.extents(section)
        values = np.frombuffer(self._read(section, offsets, lengths), dtype=dtype)
        if values.size != n:
            raise self._truncated(section, f"{values.size} of {n} elements")
        return values

    def read_ranges(self, section: str, starts: np.ndarray, stops: np.ndarray, itemsize: int,
                    element_first: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                    ) -> tuple[bytearray, np.ndarray]:  # fmt: skip
        """Read the sorted, disjoint element ranges ``[starts[i], stops[i])`` of *section*
        (numbered across its blocks); ranges of one block less than ``COALESCE_BYTES``
        apart share one read.

        The block of each range is that of its row: of the row itself, or, given
        *element_first* ``(first element of each block, row of each range, first row of
        each block)``, looked up by row (a sparse array's empty rows have no element).
        Returns the bytes read and, per range, the element offset in them where it begins.
        """
        first_row, offsets, _ = self.staged.extents(section)
        if element_first is None:
            block = np.searchsorted(first_row, starts, side="right") - 1
            block_first = first_row
        else:
            block_first, rows, first_row = element_first
            block = np.searchsorted(first_row, rows, side="right") - 1
        byte_starts = offsets[block] + (starts - block_first[block]) * itemsize
        byte_stops = byte_starts + (stops - starts) * itemsize
        breaks = np.flatnonzero((byte_starts[1:] - byte_stops[:-1] > COALESCE_BYTES)
                                | (block[1:] != block[:-1])) + 1  # fmt: skip
        first = np.concatenate([[0], breaks]).astype(np.int64)
        last = np.concatenate([breaks - 1, [starts.size - 1]]).astype(np.int64)
        run_starts, run_stops = byte_starts[first], byte_stops[last]
        lengths = run_stops - run_starts
        buffer = self._read(section, run_starts, lengths)
        # Ranges of a run are in one block: their offsets differ by whole elements.
        run = np.repeat(np.arange(first.size), last - first + 1)
        before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return buffer, (before[run] + byte_starts - run_starts[run]) // itemsize


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices ``starts[0] .. starts[0] + lengths[0] - 1``, then those of segment 1, ..."""
    lengths = lengths.astype(np.int64)
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def densify(counts: np.ndarray, positions: np.ndarray, values: np.ndarray, spec: ArraySpec,
            out: np.ndarray | None = None) -> np.ndarray:
    """``(n, spec.size)`` dense rows from ``nonzero_elements``' form (into *out*, if given:
    a reused buffer costs no page faults)."""
    if out is None:
        out = np.zeros((counts.size, spec.size), dtype=spec.dtype)
    else:
        out = out[: counts.size]
        out.fill(0)
    out[np.repeat(np.arange(counts.size), counts), positions] = values
    return out


#: Wanted rows closer than this in a staged file are read with one system call.
COALESCE_BYTES = 32 * 2**10


# --------------------------------------------------------------------------------------------
# 2. assignment of events to splits and positions


@dataclass
class SplitPlan:
    """For each split: which staged partition and row feeds each stored event, in order."""

    part: np.ndarray
    row: np.ndarray

    @property
    def size(self) -> int:
        return int(self.part.size)


def assign(counts: Iterable[int], split: Mapping[str, float], *, seed: int, shuffle: bool) -> dict[str, SplitPlan]:
    """Seeded split assignment (and, with *shuffle*, a global order) of all staged events.

    Events are numbered in partition order. A permutation drawn from *seed* is cut into
    consecutive pieces of the split fractions; with *shuffle* each split keeps the permuted
    order, so every chunk mixes samples, otherwise its events stay in source order.
    """
    counts = np.asarray(list(counts), dtype=np.int64)
    total = int(counts.sum())
    starts = np.concatenate([[0], np.cumsum(counts)])
    perm = np.random.default_rng(seed).permutation(total)
    fractions = np.array(list(split.values()), dtype=np.float64)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(fractions)]) * total).astype(np.int64)
    bounds[-1] = total
    plans = {}
    for i, name in enumerate(split):
        ids = perm[bounds[i] : bounds[i + 1]]
        if not shuffle:
            ids = np.sort(ids)
        part = np.searchsorted(starts, ids, side="right") - 1
        plans[name] = SplitPlan(part.astype(np.int64), (ids - starts[part]).astype(np.int64))
    return plans


# --------------------------------------------------------------------------------------------
# 3. the Zarr arrays


@dataclass(frozen=True)
class Coordinate:
    """A coordinate array of one image dimension."""

    name: str
    values: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)


#: Blosc's typesize for arrays of one-byte values. Blosc's bit-unshuffle runs a scalar loop for
#: odd type sizes; shuffling pairs of bytes takes its SSE2 path: uint8 count images decoded
#: 1.6x faster at the same ratio (benchmarks/RESULTS.md).
BLOSC_BYTE_TYPESIZE = 2


#: ``auto`` gives a one-byte image ``blosc-lz4`` only where a trial of its first events (a
#: chunk's worth in plan order, at most ``AUTO_TRIAL_BYTES``) comes out at most this much
#: larger than with zstd. Where LZ4 is that close, the images are noisy (high entropy) and
#: zstd decodes them slowly: hits at random over 4.5-14 % of the pixels came out 1.32-0.87x
#: the size at 2.6-5.2x the decoding speed. Images whose hits cluster
#: (showers, tracks) came out 2.1-2.8x larger with LZ4 and decoded at most 1.2x faster, below
#: 2 % occupancy slower (``benchmarks/bench_codecs.py``; benchmarks/RESULTS.md).
AUTO_BLOSC_SIZE_LIMIT = 1.5
#: The most image bytes ``auto``'s trial compresses (what ``chunk_events: auto`` aims at).
AUTO_TRIAL_BYTES = 4 * 2**20


def compressors(name: str, level: int, dtype: str | np.dtype | None = None):
    """The Zarr codec of ``output.compressor`` for an array of *dtype* (None: left to zarr);
    ``auto`` is resolved by ``compressor_name`` without data: a build resolves it first
    (``resolve_compressors``)."""
    name = compressor_name(name, dtype)
    if name == "none":
        return None
    if name == "zstd":
        return ZstdCodec(level=level)
    return BloscCodec(cname="lz4", clevel=level, shuffle="bitshuffle",
                      typesize=BLOSC_BYTE_TYPESIZE if _one_byte(dtype) else None)


def compressor_name(name: str, dtype: str | np.dtype | None, sample: np.ndarray | None = None,
                    level: int = 1) -> str:
    """The compressor ``output.compressor.name`` gives an array of *dtype*.

    ``auto`` is ``zstd``, except for one-byte values (count images) given a *sample* of
    their rows (a build gives its first events in plan order) that bit-shuffled LZ4 at *level*
    stores at most ``AUTO_BLOSC_SIZE_LIMIT`` times larger than zstd does: ``blosc-lz4``.
    The choice depends on the data only, so every build of the same input makes the same.
    On float images bit-shuffling does not pay (2.9x against zstd's 17x on the demo's).
    """
    if name != "auto":
        return name
    if not auto_trial(name, dtype) or sample is None or sample.size == 0:
        return "zstd"
    from numcodecs import Zstd

    raw = np.ascontiguousarray(sample)
    blosc = _numcodecs_blosc(compressors("blosc-lz4", level, dtype))
    ratio = len(blosc.encode(raw)) / len(Zstd(level=level).encode(raw))
    return "blosc-lz4" if ratio <= AUTO_BLOSC_SIZE_LIMIT else "zstd"


def auto_trial(name: str, dtype: str | np.dtype | None) -> bool:
    """Whether ``output.compressor.name`` *name* decides an array of *dtype* by a trial of
    its rows (``auto``, one-byte values)."""
    return name == "auto" and _one_byte(dtype)


def planned_compressor(name: str, dtype: str | np.dtype | None) -> str:
    """What ``output.compressor.name`` will give an array of *dtype*, before any data is read
    (the dry run's words)."""
    if auto_trial(name, dtype):
        return (f"blosc-lz4 or zstd (auto: blosc-lz4 if a trial of the first events stores them at most "
                f"{AUTO_BLOSC_SIZE_LIMIT}x larger than zstd)")
    return compressor_name(name, dtype)


def auto_trial_rows(spec: ArraySpec, per_chunk: int) -> int:
    """Events of an array of *spec* that ``auto``'s trial compresses: a chunk's worth of
    *per_chunk* events, at most ``AUTO_TRIAL_BYTES``, at least one."""
    return min(per_chunk, max(1, AUTO_TRIAL_BYTES // max(1, spec.itemsize)))


def resolve_compressors(name: str, level: int, samples: Mapping[str, tuple[str, np.ndarray | None]]) -> dict[str, str]:
    """``compressor_name`` of each array of *samples* (``{array: (dtype, rows)}``)."""
    return {array: compressor_name(name, dtype, rows, level) for array, (dtype, rows) in samples.items()}


def first_rows(staging: str | Path, staged: Iterable[Staged], name: str, n: int) -> np.ndarray | None:
    """Up to *n* events of the staged array *name*, from the first partitions (in plan order)
    that hold any; None if none does."""
    parts = []
    for record in staged:
        if n <= 0:
            break
        if record.n_events == 0 or name not in record.arrays:
            continue
        take = min(n, record.n_events)
        parts.append(read_rows(staging, record, name, np.arange(take)))
        n -= take
    return np.concatenate(parts) if parts else None


def compressor_setting(array) -> tuple[str, int]:
    """*array*'s compressor as ``output.compressor`` (name, level) would make it; StoreError
    for a codec hepdask does not write."""
    codecs = array.metadata.codecs[1:]
    if not codecs:
        return "none", 0
    if len(codecs) == 1 and isinstance(codecs[0], ZstdCodec):
        return "zstd", codecs[0].level
    if len(codecs) == 1 and isinstance(codecs[0], BloscCodec) and _value(codecs[0].cname) == "lz4":
        return "blosc-lz4", codecs[0].clevel
    msg = f"{array.path}: chunks compressed with {compressor_label(array)}, not a compressor hepdask writes"
    raise StoreError(msg)


def compressor_label(array) -> str:
    """How *array*'s chunks are compressed, in ``output.compressor`` words with the level:
    ``zstd-1``, ``blosc-lz4-1``, ``none``; zarr's codec names for anything else."""
    labels = []
    for codec in array.metadata.codecs[1:]:
        if isinstance(codec, ZstdCodec):
            labels.append(f"zstd-{codec.level}")
        elif isinstance(codec, BloscCodec):
            labels.append(f"blosc-{_value(codec.cname)}-{codec.clevel}")
        else:
            labels.append(type(codec).__name__)
    return "+".join(labels) or "none"


def _one_byte(dtype: str | np.dtype | None) -> bool:
    return dtype is not None and _zarr_dtype(str(dtype)) is not str and np.dtype(dtype).itemsize == 1


#: Chunk files named ``c.<i>.0.0`` (``c.<i>`` for per-event values) beside the array's
#: ``zarr.json`` instead of zarr's default ``c/<i>/0/0``: the same files, without the two
#: directories per chunk that each write task had to create (368 ``mkdir`` calls, 9 % of the
#: demo's write phase in one process). Stores of the old layout are read and resumed by
#: their own metadata's encoding.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


def prepare(
    path: str | Path,
    sizes: Mapping[str, int],
    arrays: Mapping[str, ArraySpec],
    dims: Mapping[str, tuple[str, ...]],
    coords: Iterable[Coordinate],
    *,
    chunk_events: int | Mapping[str, int],
    compressor: tuple[str, int],
    attrs: Mapping[str, Any],
    array_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    plan: str | None = None,
    resolved: Mapping[str, str] | None = None,
) -> None:
    """Create the empty store: one group per split with every array and coordinate.

    *chunk_events*: events per chunk, of every array or per array (``array_chunk_events``).
    *resolved*: the compressor of some arrays, decided already (``resolve_compressors``:
    ``auto`` by a trial of their rows); the others get ``compressor``.

    *plan*, the digest of what the write tasks will put where (``plan_digest``), is recorded
    last, once every array exists: a resumed build keeps a store prepared for its plan and
    its finished write tasks (``prepared_for``).
    """
    array_attrs = array_attrs or {}
    resolved = resolved or {}
    codecs = {name: compressors(resolved.get(name, compressor[0]), compressor[1], spec.dtype)
              for name, spec in arrays.items()}
    per_array = chunk_events if isinstance(chunk_events, Mapping) else dict.fromkeys(arrays, chunk_events)
    base = min(per_array.values(), default=1)

    def chunk_of(name: str, n: int) -> int:
        """At most a split's size, rounded up to whole chunks of the finest chunking, so
        that every array's chunks stay multiples of it in a small split too."""
        if per_array[name] <= n:
            return max(1, per_array[name])
        return max(1, n if n <= base else min(per_array[name], -(-n // base) * base))

    coords = list(coords)

    async def create() -> None:
        # Every node at once: one by one, each creation is a round trip into zarr's event
        # loop thread (~3 ms): 90 ms for the demo's 24 arrays, 60 ms concurrently.
        root = await zarr.api.asynchronous.open_group(store=str(path), mode="w", zarr_format=3,
                                                      attributes=dict(attrs))  # fmt: skip
        groups = await asyncio.gather(*(root.create_group(split) for split in sizes))
        made = []
        for group, n in zip(groups, sizes.values()):
            for name, spec in arrays.items():
                made.append(group.create_array(
                    name, shape=(n, *spec.shape), chunks=(chunk_of(name, n), *spec.shape),
                    dtype=_zarr_dtype(spec.dtype), compressors=codecs[name], dimension_names=["event", *dims[name]],
                    fill_value=_fill(spec.dtype), attributes=dict(array_attrs.get(name, {})),
                    chunk_key_encoding=CHUNK_KEY_ENCODING,
                ))
            made.extend(_coordinate(group, coord) for coord in coords)
        await asyncio.gather(*made)
        if plan is not None:
            await root.update_attributes({PLAN: plan})

    sync(create())


async def _coordinate(group, coord: Coordinate) -> None:
    array = await group.create_array(
        coord.name, shape=coord.values.shape, chunks=coord.values.shape,
        dtype=_zarr_dtype(str(coord.values.dtype)), dimension_names=[coord.name],
        attributes=coord.attrs, compressors=None, config={"write_empty_chunks": True},
        chunk_key_encoding=CHUNK_KEY_ENCODING,
    )
    await array.setitem(..., coord.values)  # written even if all zeros (one bin centred on 0)


#: Root attribute: the digest of the write plan the store was prepared for.
PLAN = PREFIX + "plan"


def plan_digest(config_hash: str, partitions: Iterable[Staged], codecs: Mapping[str, str] | None = None) -> str:
    """What decides every stored event's split, position and content: the config and, per
    partition in order, its key, events and source file's size and mtime; and the
    compressors decided from the data (*codecs*, ``resolve_compressors``), so that a store
    prepared under another rule is not resumed."""
    identity = [config_hash, *([p.key, p.n_events, p.info.get("size"), p.info.get("mtime")] for p in partitions)]
    if codecs:
        identity.append(sorted(codecs.items()))
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def prepared_for(path: str | Path, plan: str) -> bool:
    """Whether *path* is an unfinished store fully prepared for *plan* (so a resumed build
    may keep it and the chunks its finished write tasks wrote)."""
    try:
        attrs = zarr.open_group(str(path), mode="r", zarr_format=3).attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        return False
    return attrs.get(PLAN) == plan and not attrs.get(COMPLETE, False)


WRITTEN = "written"


def _written(staging: str | Path, plan: str) -> Path:
    """The staging area's directory of *plan*'s finished write tasks."""
    return Path(staging) / WRITTEN / plan[:16]


def written_marker(staging: str | Path, plan: str, task: str) -> Path:
    """The file a write task leaves in the staging area once its chunks are all written."""
    return _written(staging, plan) / task


def written_tasks(staging: str | Path, plan: str) -> set[str]:
    """The write tasks of *plan* that finished (a resumed build skips them)."""
    directory = _written(staging, plan)
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def written_maxima(staging: str | Path, plan: str) -> dict[str, dict[str, float]] | None:
    """``{split: {image array: largest value}}`` over the finished write tasks of *plan*
    (their markers record what they wrote), or None if a marker lacks it."""
    maxima: dict[str, dict[str, float]] = {}
    directory = _written(staging, plan)
    for marker in directory.iterdir() if directory.is_dir() else ():
        try:
            record = json.loads(marker.read_text() or "{}")
        except ValueError:
            return None
        if "split" not in record:
            return None
        split = maxima.setdefault(record["split"], {})
        for name, value in record["max"].items():
            split[name] = max(split.get(name, value), value)
    return maxima


def _zarr_dtype(dtype: str):
    return str if dtype in ("str", "<U0", "O") or dtype.startswith("<U") else dtype


def _fill(dtype: str):
    if dtype == "str" or dtype.startswith("<U"):
        return ""
    kind = np.dtype(dtype).kind
    return np.nan if kind == "f" else 0


#: Chunks of an image array that one chunk of a small per-event array (label, entry, sample,
#: event fields: at most SMALL_EVENT_BYTES an event) spans. With the images' chunking such
#: an array's chunk held a few KB: the demo's store was 742 chunk files, 636 of them of
#: small arrays, and creating a file costs more than compressing a 4 MiB image chunk here.
EVENT_ARRAY_CHUNKS = 8


def array_chunk_events(arrays: Mapping[str, ArraySpec], images: Iterable[str], chunk_events: int) -> dict[str, int]:
    """Events per chunk of each array: *chunk_events* for the images and any array of more
    than SMALL_EVENT_BYTES an event, ``EVENT_ARRAY_CHUNKS`` times that for the others."""
    images = set(images)
    return {name: chunk_events if name in images or (spec.dtype != "str" and spec.itemsize > SMALL_EVENT_BYTES)
            else chunk_events * EVENT_ARRAY_CHUNKS
            for name, spec in arrays.items()}


def chunk_ranges(n: int, chunk_events: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_events, n)) for s in range(0, n, chunk_events)]


#: Blosc's shuffle names (zarr v3) and numbers (numcodecs).
BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _numcodecs_blosc(codec: BloscCodec):
    """The numcodecs codec zarr's *codec* encodes with (its ``_blosc_codec``): the same bytes.
    zarr turns off Blosc's global thread pool when it is imported, so each call runs on the
    calling thread, without the GIL, and encodes the same bytes every time."""
    from numcodecs import Blosc

    return Blosc.from_config({"cname": _value(codec.cname), "clevel": codec.clevel,
                              "shuffle": BLOSC_SHUFFLE[_value(codec.shuffle)],
                              "blocksize": codec.blocksize, "typesize": codec.typesize})


def _value(setting):
    """A codec setting as zarr's metadata spells it: the value of an enum member, or the
    string itself (zarr moves from enums to literal strings)."""
    return getattr(setting, "value", setting)


class ChunkFiles:
    """Whole chunks of one Zarr array, encoded and decoded here and read or written as files.

    For the layouts hepdask writes (a regular chunk grid along the events only, in a local
    directory store; little-endian ``bytes`` or ``vlen-utf8``, then zstd, Blosc or nothing), this is byte for byte
    what zarr writes, without zarr's per-chunk cost: ~1 ms of CPU a chunk through its async
    pipeline, five times the encoding of a per-event array's chunk. ``of`` gives None for any
    other layout; callers then go through zarr.
    """

    def __init__(self, array, path: Callable[[int], Path], encode, decode, compress, decompress) -> None:
        self.chunks = tuple(array.chunks)
        self.fill_value = array.metadata.fill_value
        self.path = path  # chunk index -> its file (``chunk_file``)
        self._encode, self._decode = encode, decode
        self._compress, self._decompress = compress, decompress
        self._made: set[Path] = set()

    @classmethod
    def of(cls, array) -> ChunkFiles | None:
        from numcodecs import VLenUTF8, Zstd
        from zarr.codecs import BytesCodec, VLenUTF8Codec
        from zarr.core.chunk_grids import RegularChunkGrid

        metadata = array.metadata
        path = chunk_file(array)
        if path is None or not isinstance(metadata.chunk_grid, RegularChunkGrid):
            return None
        first, rest = metadata.codecs[0], metadata.codecs[1:]
        if isinstance(first, BytesCodec) and _value(first.endian) in (None, "little"):
            dtype = np.dtype(array.dtype).newbyteorder("<")
            shape = tuple(array.chunks)

            def encode(values: np.ndarray) -> np.ndarray:
                # The codecs take any contiguous buffer: no copy into bytes first.
                return np.ascontiguousarray(values, dtype=dtype)

            def decode(raw) -> np.ndarray:
                return np.frombuffer(raw, dtype=dtype).reshape(shape)
        elif isinstance(first, VLenUTF8Codec):
            vlen = VLenUTF8()

            def encode(values: np.ndarray) -> bytes:
                return vlen.encode(np.asarray(values, dtype=object))

            def decode(raw) -> np.ndarray:
                return vlen.decode(raw).astype(array.dtype)
        else:
            return None
        if not rest:
            return cls(array, path, encode, decode, bytes, bytes)
        if len(rest) == 1 and isinstance(rest[0], ZstdCodec):
            zstd = Zstd(level=rest[0].level, checksum=rest[0].checksum)
            return cls(array, path, encode, decode, zstd.encode, zstd.decode)
        if len(rest) == 1 and isinstance(rest[0], BloscCodec):
            blosc = _numcodecs_blosc(rest[0])
            return cls(array, path, encode, decode, blosc.encode, blosc.decode)
        return None

    def read(self, index: int) -> np.ndarray:
        """Chunk *index*, whole (an edge chunk with its fill); FileNotFoundError if unwritten."""
        return self._decode(self._decompress(self.path(index).read_bytes()))

    def write(self, index: int, values: np.ndarray) -> None:
        """Write chunk *index*; *values* may be short of a whole chunk only at the array's end."""
        missing = self.chunks[0] - len(values)
        if missing:
            pad = np.full((missing, *values.shape[1:]), self.fill_value, dtype=values.dtype)
            values = np.concatenate([values, pad])
        path = self.path(index)
        # A store of zarr's default key encoding (made by an earlier hepdask) nests chunks.
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        path.write_bytes(self._compress(self._encode(values)))


@dataclass(frozen=True)
class Sources:
    """The staged records (``Staged.slim``) and the per-partition constants of the
    partitions a write task reads, as one argument: Dask walks every dict and list argument
    of a submitted task looking for futures, which cost 0.1 s per write task at 1,600
    partitions."""

    staged: Mapping[int, Staged]
    constants: Mapping[int, Mapping[str, Any]]


def write_chunks(
    path: str | Path,
    split: str,
    ranges: list[tuple[int, int]],
    part: np.ndarray,
    row: np.ndarray,
    sources: Sources,
    staging: str | Path,
    done: str | Path | None = None,
) -> int:
    """Fill the consecutive event ranges *ranges* (each exactly whole chunks) of *split*;
    then create the file *done* (``written_marker``), if given.

    ``part``/``row`` say, for every event from ``ranges[0][0]`` on, which staged partition
    and row it comes from; ``sources.constants`` holds per-partition values (label, sample,
    source file) that are not staged. With global shuffling nearly every chunk takes rows from
    nearly every partition, so each staged file is read once per task where its rows are
    small in memory (sparse images, per-event scalars), and once per span of consecutive
    chunks (up to ``GATHER_BYTES`` of rows) for dense images.
    """
    staging = Path(staging)
    staged, constants = sources.staged, sources.constants
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)[split]
    targets = {}
    # One listing that opens every array (``array_keys`` then ``group[name]`` read each
    # array's metadata twice), sorted: a deterministic order (and first error).
    for name, array in sorted(group.arrays(), key=lambda item: item[0]):
        if array.metadata.dimension_names[0] == "event":
            # Every chunk is written, also one equal to the fill value (an unshuffled run of
            # label-0 events): zarr would skip it by default, after comparing every element,
            # and a missing chunk is what ``verify`` reports as damage.
            targets[name] = array.with_config({"write_empty_chunks": True})
    origin, end = ranges[0][0], ranges[-1][1]
    # The spans' unit is the smallest chunk (the images'); an array of larger chunks
    # (``array_chunk_events``) is written once for the whole task.
    unit = min((array.chunks[0] for array in targets.values()), default=1)
    for name, array in targets.items():
        chunk = array.chunks[0]
        for start, stop in ranges if chunk == unit else [(origin, end)]:
            if start % chunk or (stop % chunk and stop != array.shape[0]):
                msg = f"{path}/{split}/{name}: region [{start}, {stop}) is not aligned to chunks of {chunk}"
                raise StoreError(msg)
    order = np.argsort(part, kind="stable")
    # The task's events of each partition: (partition, positions in the task).
    groups = [(int(part[w[0]]), w) for w in np.split(order, np.flatnonzero(np.diff(part[order])) + 1) if w.size]
    # What is small in memory is gathered once for the whole task, each staged file read
    # once: per-partition constants, per-event scalars and sparse images. Dense images are
    # gathered per span of at most GATHER_BYTES.
    tables: dict[int, np.ndarray] = {}  # each partition's table records, read once for all its columns
    # Sparse arrays first: their reads bring each partition's table rows along.
    sparse = {name for record in staged.values() for name, spec in record.arrays.items() if spec.sparse}
    whole = {name: _gather_task(name, targets[name], groups, row, staged, constants, staging, end - origin, tables)
             for name in sorted(targets, key=lambda name: name not in sparse)}
    del tables
    once = {name for name, array in targets.items() if array.chunks[0] != unit}
    for name in once:
        if whole[name] is None:
            msg = f"{path}/{split}/{name}: chunks of {targets[name].chunks[0]} events need its rows gathered whole"
            raise StoreError(msg)
    files = {name: ChunkFiles.of(array) for name, array in targets.items()}
    event_bytes = max(_event_bytes(a) for a in targets.values()) if targets else 1
    # Rows read from staging per span are gathered GATHER_BYTES at a time; where everything
    # is in memory already (sparse images), each chunk is densified into one reused buffer
    # that stays in the CPU's cache: a 64 MiB span buffer cost a page fault per 4 KiB.
    staged_per_span = any(whole[name] is None for name in targets if name not in once)
    written = 0
    maxima: dict[str, float] = {}
    for span in _spans(ranges, max(1, GATHER_BYTES // event_bytes) if staged_per_span else 1):
        first, last = span[0][0], span[-1][1]
        a, b = first - origin, last - origin
        parts, rows = part[a:b], row[a:b]
        span_order = np.argsort(parts, kind="stable")
        bounds = np.flatnonzero(np.diff(parts[span_order])) + 1
        for name, array in targets.items():
            if name in once:
                continue
            if whole[name] is not None:
                values = whole[name].rows(a, b)
            else:
                values = np.empty((b - a, *array.shape[1:]), dtype=array.dtype)
                for where in np.split(span_order, bounds):
                    values[where] = read_rows(staging, staged[int(parts[where[0]])], name, rows[where])
            _write_span(array, files[name], first, last, values)
            if name.startswith("image") and values.size and values.dtype.kind in "iuf":
                maxima[name] = max(maxima.get(name, -np.inf), float(np.nanmax(values)))
        written += last - first
    for name in once:
        _write_span(targets[name], files[name], origin, end, whole[name].rows(0, end - origin))
    if done is not None:
        # The marker also records the largest image values written, which the build
        # gathers into the store's statistics (for dividing by a split's maximum).
        Path(done).parent.mkdir(parents=True, exist_ok=True)
        Path(done).write_text(json.dumps({"split": split, "max": maxima}))
    return written


#: Bytes of dense rows (of the widest densely staged array) a write task gathers at once.
GATHER_BYTES = 64 * 2**20
#: Per-event arrays of at most this many bytes per event are gathered for a whole task.
SMALL_EVENT_BYTES = 64


@dataclass
class _DenseRows:
    values: np.ndarray

    def rows(self, a: int, b: int) -> np.ndarray:
        return self.values[a:b]


@dataclass
class _SparseRows:
    """A write task's rows of a sparse image, in task order, as ``nonzero_elements`` gives them."""

    counts: np.ndarray
    ptr: np.ndarray
    positions: np.ndarray
    values: np.ndarray
    spec: ArraySpec
    #: The dense rows of the latest span, reused for the next (zarr has encoded them).
    buffer: np.ndarray | None = None

    def rows(self, a: int, b: int) -> np.ndarray:
        if self.buffer is None or self.buffer.shape[0] < b - a:
            self.buffer = np.empty((b - a, self.spec.size), dtype=self.spec.dtype)
        lo, hi = self.ptr[a], self.ptr[b]
        dense = densify(self.counts[a:b], self.positions[lo:hi], self.values[lo:hi], self.spec, self.buffer)
        return dense.reshape(b - a, *self.spec.shape)


def gathered_bytes(staged: Iterable[Staged], n_arrays: int) -> float:
    """Bytes per event that a write task holds for its whole run (``_gather_task``): the
    sparse and table sections of the staged partitions, and an element of each of the
    store's *n_arrays* per-event arrays (8 bytes covers a number or a string's reference).
    Dense-staged arrays are not counted: they are gathered GATHER_BYTES at a time."""
    held = events = 0
    for record in staged:
        events += record.n_events
        held += sum(n for block in record.blocks for section, (_, n) in block["at"].items()
                    if not section.endswith(DENSE_SECTION))
    return held / max(events, 1) + 8 * n_arrays


def _gather_task(name, array, groups, row, staged, constants, staging, n: int,
                 tables: dict[int, np.ndarray] | None = None):
    """All *n* rows of a write task of one array, if they are small in memory; else None.

    *tables* keeps each partition's table records (``read_table_rows`` of the task's rows)
    for the task's other table arrays, so a table file is read once per task."""
    specs = [staged[p].arrays[name] for p, _ in groups if name in staged[p].arrays]
    if not specs:  # a per-partition constant (label, sample, source file)
        values = np.empty(n, dtype=object if array.dtype.kind in "OT" else array.dtype)
        for p, where in groups:
            values[where] = constants[p][name]
        return _DenseRows(values)
    if all(spec.sparse for spec in specs):
        counts = np.zeros(n, np.int32)
        pieces = []
        for p, where in groups:
            # The partition's table rows come with the same read, for the table arrays.
            with_table = tables is not None and p not in tables
            c, positions, values, records = _sparse_rows(staging, staged[p], name, row[where], with_table=with_table)
            if records is not None:
                tables[p] = records
            counts[where] = c
            pieces.append((where, c, positions, values))
        ptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        positions = np.empty(int(ptr[-1]), np.int32)
        values = np.empty(int(ptr[-1]), specs[0].dtype)
        for where, c, pos, val in pieces:
            dest = _segments(ptr[where], c)
            positions[dest], values[dest] = pos, val
        return _SparseRows(counts, ptr, positions, values, specs[0])
    if max(spec.itemsize for spec in specs) <= SMALL_EVENT_BYTES:
        values = np.empty((n, *array.shape[1:]), dtype=array.dtype)
        for p, where in groups:
            if tables is not None and staged[p].arrays[name].table:
                if p not in tables:
                    tables[p] = read_table_rows(staging, staged[p], row[where])
                values[where] = tables[p][name]
            else:
                values[where] = read_rows(staging, staged[p], name, row[where])
        return _DenseRows(values)
    return None


def _write_span(array, files: ChunkFiles | None, first: int, last: int, values: np.ndarray) -> None:
    """Events ``[first, last)`` (whole chunks; the last may end the array) of *array*."""
    if files is None:
        array[first:last] = values
        return
    chunk = files.chunks[0]
    for start in range(first, last, chunk):
        files.write(start // chunk, values[start - first : start - first + chunk])


def _event_bytes(array) -> int:
    per_event = int(np.prod(array.shape[1:], dtype=np.int64))
    return per_event * (8 if array.dtype.kind in "OT" else np.dtype(array.dtype).itemsize)


def _spans(ranges: list[tuple[int, int]], max_events: int) -> list[list[tuple[int, int]]]:
    """*ranges* in runs of consecutive ranges of at most *max_events* events (one range at least)."""
    spans: list[list[tuple[int, int]]] = []
    for start, stop in ranges:
        if spans and stop - spans[-1][0][0] <= max_events:
            spans[-1].append((start, stop))
        else:
            spans.append([(start, stop)])
    return spans


def finalize(path: str | Path, attrs: Mapping[str, Any]) -> None:
    """Remove what interrupted writers left, write the final attributes, consolidate
    metadata, then mark the store complete.

    Every write task has finished when this runs; a ``*.partial`` file is then zarr's
    temporary copy of a chunk whose writer was killed (a dead worker, a killed build) and
    whose chunk a rerun of the task wrote again.
    """
    for leftover in Path(path).rglob("*.partial"):
        leftover.unlink(missing_ok=True)
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    # One write of the group's metadata (``attrs.update`` rewrites it once per key).
    root.update_attributes(dict(attrs))
    with warnings.catch_warnings():
        # Consolidated metadata is not in the Zarr v3 spec yet; xarray reads it, so we write it.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)
        root = zarr.open_group(str(path), mode="r+", zarr_format=3, use_consolidated=True)
        root.attrs[COMPLETE] = True


# --------------------------------------------------------------------------------------------
# reading


def is_complete(path: str | Path) -> bool:
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        return False
    return bool(root.attrs.get(COMPLETE, False))


def is_hepdask_store(path: str | Path) -> bool:
    """Whether *path* is a store that hepdask made, complete or not (a Zarr v3 group with
    ``hepdask:`` attributes): the only kind of directory a build may replace."""
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
    except (OSError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        return False
    return any(key.startswith(PREFIX) for key in root.attrs)


def open_root(path: str | Path, *, require_complete: bool = True):
    """The root group of a store; an incomplete store is refused unless asked otherwise."""
    path = Path(path)
    if not path.exists():
        msg = f"store {str(path)!r} does not exist"
        raise StoreError(msg)
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
    except (zarr.errors.GroupNotFoundError, ValueError, KeyError) as err:
        msg = f"{path} is not a hepdask Zarr store ({err})"
        raise StoreError(msg) from None
    if require_complete and not root.attrs.get(COMPLETE, False):
        _refuse_a_group_inside(path, root)
        msg = f"store {str(path)!r} is incomplete (no {COMPLETE!r} marker): its build did not finish"
        raise StoreError(msg)
    return root


def _refuse_a_group_inside(path: Path, root) -> None:
    """A split's group (``STORE/train``) given where a store's path is asked for."""
    if not any(key.startswith(PREFIX) for key in root.attrs) and is_hepdask_store(path.parent):
        msg = f"{str(path)!r} is the group {path.name!r} inside the store {str(path.parent)!r}: give the store's path"
        raise StoreError(msg)


def split_names(root) -> list[str]:
    """The splits of a store's root group, in their recorded order."""
    return list(root.attrs.get(PREFIX + "splits", sorted(root.group_keys())))


def open_split(path: str | Path, split: str):
    """The Zarr group of one split of a complete store; a missing split is named with the
    splits there are."""
    root = open_root(path)
    available = split_names(root)
    if split not in available:
        msg = f"store {str(path)!r} has no split {split!r} (splits: {available})"
        raise StoreError(msg)
    return root[split]


def open_dataset(path: str | Path, split: str = "train"):
    """The split as a lazily loaded ``xarray.Dataset`` (refuses an incomplete store)."""
    import xarray as xr

    open_split(path, split)
    return xr.open_zarr(str(path), group=split, consolidated=True)


def store_info(path: str | Path) -> dict[str, Any]:
    """A summary of a complete store: splits, shapes, classes and provenance."""
    root = open_root(path)
    attrs = dict(root.attrs)
    info: dict[str, Any] = {
        "path": str(path),
        "version": attrs.get(PREFIX + "version"),
        "created": attrs.get(PREFIX + "created"),
        "config_hash": attrs.get(PREFIX + "config_hash"),
        "splits": {},
    }
    for split in attrs.get(PREFIX + "splits", []):
        group = root[split]
        image = group["image"]
        require_chunks(path, group["label"])
        labels = group["label"][:]
        values, counts = np.unique(labels, return_counts=True)
        info["splits"][split] = {
            "events": int(image.shape[0]),
            "image_shape": list(image.shape[1:]),
            "image_dims": list(image.metadata.dimension_names[1:]),
            "dtype": str(image.dtype),
            "chunk_events": int(image.chunks[0]),
            "compressor": compressor_label(image),
            "labels": {int(v): int(c) for v, c in zip(values, counts)},
            "more_images": {
                name: {"shape": list(group[name].shape[1:]), "dims": list(group[name].metadata.dimension_names[1:]),
                       "dtype": str(group[name].dtype), "compressor": compressor_label(group[name])}
                for name in sorted(group.array_keys()) if name.startswith("image_")
            },
        }
    manifest = attrs.get(PREFIX + "manifest", [])
    by_sample: dict[str, dict[str, int]] = {}
    for item in manifest:
        entry = by_sample.setdefault(item["sample"], {"label": item["label"], "files": 0, "bad_files": 0,
                                                      "entries": 0, "selected": 0})
        bad = item.get("status") == "bad"
        entry["files"] += not bad
        entry["bad_files"] += bad
        entry["entries"] += int(item.get("entries") or 0)
        entry["selected"] += int(item.get("selected") or 0)
    for name, sample in attrs.get(PREFIX + "samples", {}).items():
        if sample.get("metadata") and name in by_sample:
            by_sample[name]["metadata"] = sample["metadata"]
    info["samples"] = by_sample
    info["statistics"] = attrs.get(PREFIX + "statistics", {})
    return info


def verify(path: str | Path, *, decode: bool = True) -> list[str]:
    """Everything wrong with a store, as sentences; an empty list means it is sound.

    Checks: the completion marker; that every chunk of every array exists (a missing chunk
    would silently read back as the fill value) and, with *decode*, decodes to a whole chunk
    (a truncated or overwritten one would fail every reader); leftover temporary files
    (zarr's ``*.partial``; a staging area beside a store that is not complete); metadata
    that no longer matches the arrays. A staging area beside a complete store is an
    interrupted replacement (``staging_note``), not a fault of the store. A path that is no
    store to check (missing, or a split's group inside one) raises ``StoreError``.
    """
    path = Path(path)
    if not path.exists():
        staging = staging_path(path)
        msg = f"store {str(path)!r} does not exist" + (
            f" (an interrupted build's staging area is there: {staging})" if staging.exists() else "")
        raise StoreError(msg)
    problems: list[str] = []
    leftovers = sorted(str(p.relative_to(path)) for p in path.rglob("*.partial"))
    if leftovers:
        problems.append(f"temporary files left by an interrupted write: {', '.join(leftovers[:5])}")
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=False)
    except (zarr.errors.GroupNotFoundError, ValueError, KeyError) as err:
        return [*problems, f"{path} is not a Zarr v3 group ({err})"]
    attrs = dict(root.attrs)
    if not attrs.get(COMPLETE, False):
        _refuse_a_group_inside(path, root)
        problems.append(f"no {COMPLETE!r} marker: the build did not finish")
        if staging_path(path).exists():
            problems.append(f"staging area {staging_path(path)} is still there (an interrupted or failed build)")
    problems += _verify_metadata(path, root, attrs)
    for split in attrs.get(PREFIX + "splits", []):
        try:
            group = root[split]
            arrays = {name: group[name] for name in group.array_keys()}
        except KeyError:
            problems.append(f"split {split!r} is listed but has no group")
            continue
        except (ValueError, OSError) as err:
            problems.append(f"split {split!r}: its metadata cannot be read ({type(err).__name__}: {err})")
            continue
        for name, array in arrays.items():
            missing = _missing_chunks(path, array)
            if missing:
                problems.append(f"{split}/{name}: {len(missing)} chunk(s) missing, e.g. {missing[0]}")
            damaged = _damaged_chunks(array, skip=set(missing)) if decode else []
            if damaged:
                problems.append(f"{split}/{name}: {len(damaged)} chunk(s) cannot be decoded, e.g. {damaged[0]}")
    return problems


def staging_note(path: str | Path) -> str | None:
    """What ``verify`` leaves out: the staging area of an interrupted build beside a complete store."""
    staging = staging_path(path)
    if staging.exists() and is_complete(path):
        return (f"an interrupted build's staging area is beside it ({staging}): run that build again to "
                f"finish it, or delete it")
    return None


def _damaged_chunks(array, *, skip: set[str]) -> list[str]:
    """The chunks of *array* (but those whose keys are in *skip*) that do not decode to a
    whole chunk, read in parallel threads (zstd and Blosc decode without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = {coords: key for coords, key in _chunk_keys(array).items() if key not in skip}
    files = ChunkFiles.of(array)

    def damaged(chunk: tuple[int, ...]) -> str | None:
        try:
            if files is not None:
                files.read(chunk[0])
            else:
                np.asarray(array.blocks[chunk])
        except Exception as err:  # noqa: BLE001 - whatever a reader would meet is the finding
            return f"{keys[chunk]} ({type(err).__name__}: {err})"
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return [found for found in pool.map(damaged, keys) if found]


def _chunk_keys(array) -> dict[tuple[int, ...], str]:
    """Every chunk of *array*: its grid coordinates and its key in the store."""
    encoding = array.metadata.chunk_key_encoding
    grid = [-(-n // c) for n, c in zip(array.shape, array.chunks)]
    return {coords: f"{array.path}/{encoding.encode_chunk_key(coords)}" for coords in np.ndindex(*grid)}


def require_chunks(path: str | Path, array) -> None:
    """Refuse to read *array* of the store at *path* with chunk files missing: zarr would
    read them back as the fill value, without a word."""
    missing = _missing_chunks(Path(path), array)
    if missing:
        msg = (f"store {str(path)!r}: {len(missing)} chunk(s) of {array.path!r} missing, e.g. {missing[0]}: the "
               f"store is damaged; 'hepdask verify {path}' lists what else is")
        raise StoreError(msg)


def _missing_chunks(path: Path, array) -> list[str]:
    return [key for key in _chunk_keys(array).values() if not (path / key).is_file()]


def chunk_file(array) -> Callable[[int], Path] | None:
    """``path(i)``: the file of chunk *i* along the events of *array* (chunked along events
    only), for an array in a local directory store; None for any other."""
    from zarr.storage import LocalStore

    if not isinstance(array.store, LocalStore) or any(c != n for c, n in zip(array.chunks[1:], array.shape[1:])):
        return None
    root = Path(array.store.root) / array.path
    encode = array.metadata.chunk_key_encoding.encode_chunk_key
    trailing = (0,) * (len(array.shape) - 1)
    return lambda i: root / encode((i, *trailing))


def _verify_metadata(path: Path, root, attrs: dict) -> list[str]:
    problems = []
    try:
        consolidated = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=True).metadata.consolidated_metadata
    except ValueError:
        consolidated = None
    if consolidated is None:
        problems.append("no consolidated metadata (xarray would read it slowly)")
    else:
        for key, meta in consolidated.flattened_metadata.items():
            on_disk = path / key / "zarr.json"
            try:
                actual = json.loads(on_disk.read_text())
            except (OSError, ValueError):
                problems.append(f"stale metadata: {key} is in the consolidated metadata but not on disk")
                continue
            recorded = meta.to_dict()
            for field_name in ("shape", "data_type", "attributes"):
                if field_name in actual and _normal(actual.get(field_name)) != _normal(recorded.get(field_name)):
                    problems.append(f"stale metadata: {key} {field_name} differs from the consolidated metadata")
    statistics = attrs.get(PREFIX + "statistics", {})
    for split, numbers in statistics.get("splits", {}).items():
        try:
            n = root[split]["image"].shape[0]
        except KeyError:
            problems.append(f"stale metadata: statistics name split {split!r}, which has no image array")
            continue
        except (ValueError, OSError) as err:
            problems.append(f"{split}/image: its metadata cannot be read ({type(err).__name__}: {err})")
            continue
        if numbers.get("events") != n:
            problems.append(f"stale metadata: statistics say {split} has {numbers.get('events')} events, the store {n}")
    config_text = attrs.get(PREFIX + "config")
    if config_text is not None:
        import yaml

        from .config import from_dict
        from .errors import ConfigError

        try:
            recorded_hash = from_dict(yaml.safe_load(config_text), base=path.parent).content_hash()
        except ConfigError:
            # Valid for the hepdask that built the store, refused by this one (its checks grew):
            # not a fault of the store, and its hash cannot be recomputed here.
            recorded_hash = None
        except Exception as err:  # noqa: BLE001 - any other failure here is a finding, reported as such
            problems.append(f"stale metadata: the recorded config cannot be read back ({type(err).__name__})")
            recorded_hash = None
        if recorded_hash is not None and recorded_hash != attrs.get(PREFIX + "config_hash"):
            problems.append("stale metadata: hepdask:config_hash does not match hepdask:config")
    return problems


def _normal(value):
    return json.loads(json.dumps(value, default=str))
