"""Input files: discovery, partition planning and reading with uproot.

``plan`` expands each sample's globs and file lists into partitions without opening any file
(10,000 files plan in milliseconds); the entry counts come back from the workers that read
them. ``read`` runs on a worker: it opens one partition's file and yields it in steps of at
most ``step_size`` entries, so a worker's memory is bounded by the step, not by the file.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from .errors import BranchError, ConfigError, InputFileError, MissingInputError, did_you_mean

try:  # ISA-L's inflate, where installed: ``inflating``
    from isal import isal_zlib as _isal_zlib
except ImportError:
    _isal_zlib = None

_GLOB_CHARS = re.compile(r"[*?\[]")
_INDEXED = re.compile(r"^(?P<branch>.+?)\[(?P<index>-?\d+)\]$")


@dataclass(frozen=True)
class Partition:
    """One unit of work: an entry range of one file of one sample."""

    index: int
    sample: str
    label: int
    file: str
    entry_start: int = 0
    entry_stop: int | None = None

    @property
    def key(self) -> str:
        return f"p{self.index:07d}"


@dataclass
class Step:
    """One read step of a partition: flat hit arrays, hit offsets and event arrays."""

    entries: np.ndarray
    offsets: np.ndarray
    hits: dict[str, np.ndarray]
    events: dict[str, np.ndarray]

    @property
    def n_events(self) -> int:
        return int(self.entries.size)


def expand(sample_name: str, patterns: list[str], *, must_exist: bool = True) -> list[str]:
    """The sorted files of a sample; a pattern that matches nothing is an error.

    With ``must_exist=False`` a listed file that does not exist is kept: its partition then
    fails on a worker and the bad-file policy decides.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern):
            matched = sorted(glob.glob(pattern, recursive=True))
            if not matched:
                msg = f"sample {sample_name!r}: pattern {pattern!r} matches no file"
                raise MissingInputError(msg)
        else:
            if must_exist and not os.path.exists(pattern):
                msg = f"sample {sample_name!r}: file {pattern!r} does not exist"
                raise MissingInputError(msg)
            matched = [pattern]
        for path in matched:
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def plan(samples: list[tuple[str, int, list[str]]], *, must_exist: bool = True) -> list[Partition]:
    """Partitions for ``(name, label, patterns)`` samples: one per file, in a stable order.
    A file in two samples (its events would be written twice, under two labels) is refused."""
    partitions: list[Partition] = []
    owner: dict[str, str] = {}
    for name, label, patterns in samples:
        for path in expand(name, patterns, must_exist=must_exist):
            other = owner.setdefault(str(Path(path).absolute()), name)
            if other != name:
                msg = f"file {path!r} is in samples {other!r} and {name!r}; a file belongs to one sample"
                raise ConfigError(msg)
            partitions.append(Partition(len(partitions), name, label, path))
    return partitions


def _split_index(expression: str) -> tuple[str, int | None]:
    match = _INDEXED.match(expression.strip())
    if match:
        return match["branch"], int(match["index"])
    return expression.strip(), None


def branches_needed(hits: dict[str, str], events: dict[str, str]) -> list[str]:
    names = [_split_index(b)[0] for b in (*hits.values(), *events.values())]
    return list(dict.fromkeys(names))


#: Exceptions of uproot and its decompressors that mean "this input file is bad".
BAD_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    zlib.error,
    *(() if _isal_zlib is None else (_isal_zlib.error,)),  # a bad ZLIB basket, inflated by ISA-L
    uproot.deserialization.DeserializationError,
    EOFError,
)


def _as_input_error(path: str, err: BaseException) -> InputFileError:
    if isinstance(err, InputFileError):
        return err
    if isinstance(err, FileNotFoundError):
        return MissingInputError(f"{path}: file does not exist")
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    header = _first_bytes(path)
    start = header[: len(ROOT_MAGIC)] if header is not None else None
    if start is not None and start != ROOT_MAGIC:
        return InputFileError(f"{path}: not a ROOT file (it starts with {start!r}, not {ROOT_MAGIC!r})")
    end = _recorded_end(header) if header is not None else None
    size = _size(path)
    if end is not None and size is not None and size < end:
        return InputFileError(f"{path}: truncated: {size:,} of the {end:,} bytes its ROOT header says it holds "
                              f"(an interrupted copy or write?)")
    return InputFileError(f"{path}: cannot read ({_error_class(err).__name__}: {text})")


def _error_class(err: BaseException) -> type:
    """The class an input error is reported as: a corrupt ZLIB basket is ``zlib.error``
    whichever library inflated it (``inflating``)."""
    if _isal_zlib is not None and isinstance(err, _isal_zlib.error):
        return zlib.error
    return type(err)


#: The first bytes of every ROOT file.
ROOT_MAGIC = b"root"
#: The ROOT file header: magic, fVersion, fBEGIN, fEND (big-endian; fEND is 64-bit from
#: fVersion 1000000 on, the "large file" format).
_HEADER = struct.Struct(">4sii")
_LARGE_FILE_VERSION = 1_000_000


def _first_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(_HEADER.size + 8)
    except OSError:
        return None


def _recorded_end(header: bytes) -> int | None:
    """Where the file's ROOT header says the file ends (fEND), or None if it is too short."""
    if len(header) < _HEADER.size + 4:
        return None
    _, version, _ = _HEADER.unpack_from(header)
    if version >= _LARGE_FILE_VERSION:
        return struct.unpack_from(">q", header, _HEADER.size)[0] if len(header) >= _HEADER.size + 8 else None
    return struct.unpack_from(">i", header, _HEADER.size)[0]


def _size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def open_options(*, memory_map: bool) -> dict:
    """The ``uproot.open`` options hepdask reads files with. With *memory_map* the file is
    read through ``uproot.MemmapSource`` (uproot falls back to plain reads where a map cannot
    be made) instead of uproot's default fsspec source, which costs more per request
    (``benchmarks/RESULTS.md``, KM3NeT section)."""
    return {"handler": uproot.MemmapSource} if memory_map else {}


def open_tree(path: str, tree_name: str, *, memory_map: bool = True):
    """Open *path* (with ``open_options``) and return ``(file, tree)``, raising
    InputFileError/BranchError clearly."""
    memoise_uproot_classnames()
    try:
        with inflating():
            file = uproot.open(path, **open_options(memory_map=memory_map))
    except BAD_FILE_ERRORS as err:
        raise _as_input_error(path, err) from err
    try:
        with inflating():  # the tree's metadata is ZLIB-compressed too
            tree = file[tree_name]
    except uproot.KeyInFileError:
        keys = file.keys(cycle=False)
        file.close()
        msg = f"{path}: no tree {tree_name!r}{did_you_mean(tree_name, keys)} (objects: {keys[:10]})"
        raise BranchError(msg) from None
    except BAD_FILE_ERRORS as err:
        file.close()
        raise _as_input_error(path, err) from err
    if not isinstance(tree, uproot.TTree):
        file.close()
        kind = getattr(tree, "classname", None) or type(tree).__name__
        msg = f"{path}: {tree_name!r} is a {kind}, not a TTree (hepdask reads TTrees)"
        raise BranchError(msg)
    return file, tree


#: uproot's pure string functions that it calls for every object it deserialises.
MEMOISED_CLASSNAME_FUNCTIONS = ("classname_regularize", "classname_version")


def memoise_uproot_classnames() -> None:
    """Put an LRU cache in front of ``uproot.model.classname_regularize`` and
    ``classname_version`` (idempotent).

    Both are pure functions of a class name (regular expressions and constant tables), and
    uproot calls them for each of the thousands of objects in a TTree's metadata: on a
    KM3NeT offline file (124 branches), where that metadata is most of what staging a file
    costs, the cache makes opening the tree a fifth cheaper (``benchmarks/RESULTS.md``).
    uproot already caches their sibling ``classname_decode`` the same way. A function that
    is missing, or already cached, is left alone.
    """
    for name in MEMOISED_CLASSNAME_FUNCTIONS:
        function = getattr(uproot.model, name, None)
        if callable(function) and not hasattr(function, "cache_info"):
            setattr(uproot.model, name, functools.lru_cache(maxsize=4096)(function))


#: hepdask reads in progress in this process (``inflating``), and the ZLIB library uproot
#: had when the first of them began.
_INFLATE_LOCK = threading.Lock()
_inflating = 0
_library_before: str | None = None


@contextmanager
def inflating() -> Iterator[str]:
    """While hepdask reads, have uproot inflate ZLIB with ISA-L (``isal``) where it is
    installed; yield the library uproot uses ("isal", or what it had: "zlib").

    ROOT writes ZLIB unless told otherwise, and inflating baskets was 40 % of reading a demo
    file under a profile: ISA-L read the demo files 13-15 % faster to stage, to the same
    bytes (``benchmarks/RESULTS.md``). uproot has the choice built in, for the whole process
    (``_DecompressZLIB.library``); it is switched from "zlib" only while at least one
    hepdask read runs, then given back, so a user's own uproot reads in the same process
    (a notebook, an inline build) keep Python's zlib and its ``zlib.error``. A library the
    user chose other than "zlib" is kept. Without ``isal``, or with an uproot that has no
    such setting, nothing changes.
    """
    global _inflating, _library_before
    decompressor = getattr(uproot.compression, "_decompress_ZLIB", None)
    if _isal_zlib is None or decompressor is None or not hasattr(decompressor, "library"):
        yield getattr(decompressor, "library", "zlib")
        return
    with _INFLATE_LOCK:
        if _inflating == 0:
            _library_before = decompressor.library
            if _library_before == "zlib":
                decompressor.library = "isal"
        _inflating += 1
    try:
        yield decompressor.library
    finally:
        with _INFLATE_LOCK:
            _inflating -= 1
            if _inflating == 0:
                decompressor.library = _library_before


@dataclass(frozen=True)
class BranchType:
    """How uproot reads a branch, and whether it holds a list of values per event."""

    interpretation: object
    jagged: bool


def check_branches(tree, path: str, tree_name: str, hits: dict[str, str], events: dict[str, str]) -> dict[str, tuple]:
    """Every configured branch exists, hit branches are jagged and event branches are not.

    Returns ``{branch name: (branch, BranchType)}`` for every branch the mappings read.
    """
    checked: dict[str, tuple] = {}
    streamers = None  # the digest of the file's streamer record, read once per file
    for role, mapping in (("hits", hits), ("event", events)):
        for name, expression in mapping.items():
            branch_name, index = _split_index(expression)
            if branch_name not in checked:
                try:
                    branch = tree[branch_name]
                except uproot.KeyInFileError:
                    keys = set(tree.keys(full_paths=True)) | set(tree.keys(full_paths=False))
                    msg = (
                        f"{path}: {role}.{name}: branch {branch_name!r} not in tree {tree_name!r}"
                        f"{did_you_mean(branch_name, keys)}"
                    )
                    raise BranchError(msg) from None
                try:
                    if streamers is None:
                        streamers = _streamer_digest(tree.file)
                    kind = branch_type(branch, streamers)
                except BAD_FILE_ERRORS as err:
                    raise _as_input_error(path, err) from err
                if isinstance(kind.interpretation, uproot.interpretation.identify.UnknownInterpretation):
                    msg = (f"{path}: {role}.{name}: uproot cannot read branch {branch_name!r} as an array "
                           f"({kind.interpretation})")
                    raise BranchError(msg)
                checked[branch_name] = (branch, kind)
            kind = checked[branch_name][1]
            if role == "hits" and not kind.jagged:
                msg = (
                    f"{path}: hits.{name}: branch {branch_name!r} has one value per event "
                    f"({kind.interpretation.typename}); a hit field needs a jagged branch (one value per hit)"
                )
                raise BranchError(msg)
            shape = _value_shape(kind)
            if role == "hits" and shape:
                msg = (f"{path}: hits.{name}: branch {branch_name!r} holds {list(shape)} values per hit "
                       f"({kind.interpretation.typename}); a hit field needs one number per hit")
                raise BranchError(msg)
            if role == "event" and (kind.jagged or shape) and index is None:
                what = "jagged" if kind.jagged else f"an array of {list(shape)} per event"
                msg = (
                    f"{path}: event.{name}: branch {branch_name!r} is {what} ({kind.interpretation.typename}); "
                    f"pick one element per event, e.g. '{branch_name}[0]'"
                )
                raise BranchError(msg)
            if role == "event" and index is not None and kind.jagged and shape:
                msg = (f"{path}: event.{name}: branch {branch_name!r} holds lists of {list(shape)} arrays "
                       f"({kind.interpretation.typename}); '{expression}' would pick an array, not a number")
                raise BranchError(msg)
            if role == "event" and index is not None and not kind.jagged and len(shape) != 1:
                what = "one number" if not shape else f"an array of {list(shape)}"
                msg = (f"{path}: event.{name}: branch {branch_name!r} holds {what} per event "
                       f"({kind.interpretation.typename}); '{expression}' picks from a list")
                raise BranchError(msg)
    return checked


def _value_shape(kind: BranchType) -> tuple[int, ...]:
    """The fixed shape of a branch's values (``float[3]``: ``(3,)``; a number: ``()``), per
    event or, for a jagged branch, per list element; ``()`` for what uproot reads as objects."""
    interpretation = kind.interpretation
    if isinstance(interpretation, uproot.interpretation.jagged.AsJagged):
        interpretation = interpretation.content
    return tuple(getattr(interpretation, "inner_shape", ()) or ())


#: Branch types uproot identified in this process, keyed by everything the identification
#: depends on (the digest of the file's streamer record and ``_type_chain``). Identifying a
#: branch of a split class reads and parses the file's streamers, which on a KM3NeT offline
#: file is about a quarter of what opening, checking and reading it cost. The files of one
#: production share their streamers and branch types, so a worker identifies them once. The
#: oldest entries go first beyond ``MAX_BRANCH_TYPES``.
_BRANCH_TYPES: dict[tuple, BranchType] = {}
_BRANCH_TYPES_LOCK = threading.Lock()
MAX_BRANCH_TYPES = 4096

#: The members of a branch and of its leaves that uproot's identification reads
#: (``uproot.interpretation.identify`` and ``TBranch.streamer``); what varies from file to
#: file for one type (baskets, entry counts, value ranges) is left out.
_BRANCH_TYPE_MEMBERS = ("fClassName", "fParentName", "fClonesName", "fClassVersion", "fCheckSum", "fID",
                        "fType", "fStreamerType", "fTitle")
_LEAF_TYPE_MEMBERS = ("fName", "fTitle", "fLen", "fLenType", "fOffset", "fIsRange", "fIsUnsigned", "fID", "fType")
#: In ROOT's key header, fKeylen (int16, the header's length) follows fNbytes (int32),
#: fVersion (int16), fObjlen (int32) and fDatime (uint32).
_KEYLEN = struct.Struct(">h")
_KEYLEN_OFFSET = 14


def branch_type(branch, streamers: str) -> BranchType:
    """The branch's interpretation (uproot's own identification, or the one it gave a branch
    of the same type in a file with the same streamers) and whether it is jagged.

    *streamers* is ``_streamer_digest`` of the branch's file."""
    key = (streamers, *_type_chain(branch))
    kind = _BRANCH_TYPES.get(key)
    if kind is None:
        interpretation = branch.interpretation
        jagged = False
        if not isinstance(interpretation, uproot.interpretation.identify.UnknownInterpretation):
            typename = interpretation.typename
            jagged = isinstance(interpretation, uproot.AsJagged) or "[]" in typename or "vector" in typename
        kind = BranchType(interpretation, jagged)
        with _BRANCH_TYPES_LOCK:  # a worker may run several threads
            if len(_BRANCH_TYPES) >= MAX_BRANCH_TYPES:
                del _BRANCH_TYPES[next(iter(_BRANCH_TYPES))]
            _BRANCH_TYPES[key] = kind
    return kind


def _type_chain(branch) -> tuple:
    """The type members of the branch, of its leaves and of every branch above it."""
    chain = []
    node = branch
    while isinstance(node, uproot.behaviors.TBranch.TBranch):
        leaves = tuple(
            (type(leaf).__name__, *(_plain(leaf.member(m, none_if_missing=True)) for m in _LEAF_TYPE_MEMBERS),
             _name_of(leaf.member("fLeafCount", none_if_missing=True)))
            for leaf in node.member("fLeaves")
        )
        members = tuple(_plain(node.member(m, none_if_missing=True)) for m in _BRANCH_TYPE_MEMBERS)
        chain.append((type(node).__name__, node.name, members, leaves, tuple(b.name for b in node.branches)))
        node = node.parent
    return tuple(chain)


def _streamer_digest(file) -> str:
    """A digest of the file's streamer record (the key's payload at fSeekInfo, without the key
    header, which holds the write time): equal digests mean equal streamers."""
    if not file.fSeekInfo or not file.fNbytesInfo:
        return ""
    raw = file.source.chunk(file.fSeekInfo, file.fSeekInfo + file.fNbytesInfo).raw_data
    keylen = _KEYLEN.unpack_from(raw, _KEYLEN_OFFSET)[0] if len(raw) >= _KEYLEN_OFFSET + _KEYLEN.size else 0
    return hashlib.blake2b(bytes(raw[keylen:]), digest_size=16).hexdigest()


def _plain(value):
    return value if value is None or isinstance(value, (bool, int, float)) else str(value)


def _name_of(leaf) -> str | None:
    return None if leaf is None else str(leaf.member("fName"))


def count_entries(paths: list[str], tree_name: str, *, memory_map: bool = True) -> list[int | None]:
    """The entries of each file's tree (a Dask task); None for a file that cannot be read,
    whose partition then fails (or is skipped) on a worker as usual."""
    counts: list[int | None] = []
    for path in paths:
        try:
            file, tree = open_tree(path, tree_name, memory_map=memory_map)
        except InputFileError:
            counts.append(None)
            continue
        with file:
            counts.append(int(tree.num_entries))
    return counts


def split_entries(partitions: list[Partition], counts: list[int | None], entries_per_partition: int) -> list[Partition]:
    """Whole-file partitions cut into entry ranges of at most *entries_per_partition*
    (a file of unknown size, or a partition already cut, stays as it is), numbered anew in
    the same order."""
    ranges: list[tuple[Partition, int, int | None]] = []
    for partition, n in zip(partitions, counts):
        if n is None or n <= entries_per_partition or partition.entry_stop is not None:
            ranges.append((partition, partition.entry_start, partition.entry_stop))
            continue
        ranges.extend((partition, start, min(start + entries_per_partition, n))
                      for start in range(0, n, entries_per_partition))
    return [Partition(i, p.sample, p.label, p.file, start, stop) for i, (p, start, stop) in enumerate(ranges)]


def _flatten_hits(path: str, arrays: dict, hits: dict[str, str], start: int):
    counts = None
    flat: dict[str, np.ndarray] = {}
    for name, expression in hits.items():
        array = arrays[expression]
        if array.ndim != 2:
            msg = f"{path}: hits.{name}: branch {expression!r} is not one list of values per event"
            raise BranchError(msg)
        these, values = _jagged_parts(array)
        if counts is None:
            counts, first = these, name
        elif not np.array_equal(counts, these):
            bad = int(np.flatnonzero(counts != these)[0])
            msg = (
                f"{path}: hit fields {first!r} and {name!r} have different numbers of hits "
                f"in entry {start + bad} ({counts[bad]} and {these[bad]})"
            )
            raise BranchError(msg)
        flat[name] = values
    offsets = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, flat


def _jagged_parts(array) -> tuple[np.ndarray, np.ndarray]:
    """(hits per event, all hits flat) of a jagged array of numbers.

    What uproot returns for a jagged numeric branch, a list-offset layout over a flat
    buffer, is taken apart without copying (40 times faster than ``ak.num`` +
    ``ak.flatten``, which were 8 % of a demo stage task); any other layout goes through
    awkward.
    """
    layout = array.layout
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(layout.content, ak.contents.NumpyArray):
        offsets = np.asarray(layout.offsets, dtype=np.int64)
        data = np.asarray(layout.content.data)
        if data.ndim == 1:
            return np.diff(offsets), data[offsets[0] : offsets[-1]]
    return ak.to_numpy(ak.num(array, axis=1)).astype(np.int64), ak.to_numpy(ak.flatten(array, axis=1))


def _event_values(array, index: int | None) -> np.ndarray:
    """One value per event: the branch itself, or element *index* of each event's list
    (negative counts from the end), as float64 with NaN where the list is too short."""
    if index is None:
        return ak.to_numpy(array)
    counts = ak.to_numpy(ak.num(array, axis=1)).astype(np.int64)
    flat = ak.to_numpy(ak.flatten(array, axis=1)).astype(np.float64)
    position = np.full(counts.size, index, np.int64) if index >= 0 else counts + index
    present = (position >= 0) & (position < counts)
    starts = np.cumsum(counts) - counts
    out = np.full(counts.size, np.nan)
    out[present] = flat[(starts + position)[present]]
    return out


def read(
    partition: Partition,
    tree_name: str,
    hits: dict[str, str],
    events: dict[str, str],
    step_size: int,
    *,
    memory_map: bool = True,
) -> Iterator[Step]:
    """Yield a partition's entries in steps of at most *step_size* entries."""
    path = partition.file
    file, tree = open_tree(path, tree_name, memory_map=memory_map)
    with file, inflating():
        checked = check_branches(tree, path, tree_name, hits, events)
        start = partition.entry_start
        stop = tree.num_entries if partition.entry_stop is None else min(partition.entry_stop, tree.num_entries)
        for first in range(start, stop, step_size):
            last = min(first + step_size, stop)
            try:
                arrays = {
                    name: branch.array(kind.interpretation, entry_start=first, entry_stop=last, library="ak")
                    for name, (branch, kind) in checked.items()
                }
            except BAD_FILE_ERRORS as err:
                raise _as_input_error(path, err) from err
            n = len(next(iter(arrays.values()))) if arrays else 0
            offsets, flat = _flatten_hits(path, arrays, hits, first)
            event_arrays = {}
            for name, expression in events.items():
                branch, index = _split_index(expression)
                try:
                    event_arrays[name] = _event_values(arrays[branch], index)
                except ValueError as err:  # e.g. an element of a nested list is itself a list
                    msg = f"{path}: event.{name}: {expression!r} does not give one number per event ({err})"
                    raise BranchError(msg) from None
            yield Step(np.arange(first, first + n, dtype=np.int64), offsets, flat, event_arrays)


def file_info(path: str) -> dict:
    """Path, size and modification time, recorded to detect changed inputs."""
    stat = Path(path).stat()
    return {"path": path, "size": stat.st_size, "mtime": stat.st_mtime}


def describe_failure(err: BaseException) -> dict[str, str]:
    """The report entry of a bad file, with uproot's read-error report names."""
    cause = err.__cause__ if isinstance(err, InputFileError) and err.__cause__ is not None else err
    kind = _error_class(cause)
    name = kind.__name__ if kind.__module__ in ("builtins", "hepdask.errors") else f"{kind.__module__}.{kind.__name__}"
    return {"exception": name, "message": str(err)}
