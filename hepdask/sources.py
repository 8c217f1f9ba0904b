"""Input files: discovery, partition planning and reading with uproot.

``plan`` expands each sample's globs and file lists into partitions without opening any file
(10,000 files plan in milliseconds); the entry counts come back from the workers that read
them. ``read`` runs on a worker: it opens one partition's file and yields it in steps of at
most ``step_size`` entries, so a worker's memory is bounded by the step, not by the file.
"""

from __future__ import annotations

import glob
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from .errors import BranchError, InputFileError, MissingInputError, did_you_mean

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
    """Partitions for ``(name, label, patterns)`` samples: one per file, in a stable order."""
    partitions: list[Partition] = []
    for name, label, patterns in samples:
        for path in expand(name, patterns, must_exist=must_exist):
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
    uproot.deserialization.DeserializationError,
    EOFError,
)


def _as_input_error(path: str, err: BaseException) -> InputFileError:
    if isinstance(err, InputFileError):
        return err
    if isinstance(err, FileNotFoundError):
        return MissingInputError(f"{path}: file does not exist")
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return InputFileError(f"{path}: cannot read ({type(err).__name__}: {text})")


def open_tree(path: str, tree_name: str):
    """Open *path* and return ``(file, tree)``, raising InputFileError/BranchError clearly."""
    try:
        file = uproot.open(path)
    except BAD_FILE_ERRORS as err:
        raise _as_input_error(path, err) from err
    try:
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
        msg = f"{path}: {tree_name!r} is a {type(tree).__name__}, not a TTree"
        raise BranchError(msg)
    return file, tree


def check_branches(tree, path: str, tree_name: str, hits: dict[str, str], events: dict[str, str]) -> None:
    """Every configured branch exists, hit branches are jagged and event branches are not."""
    keys = set(tree.keys(full_paths=True)) | set(tree.keys(full_paths=False))
    for role, mapping in (("hits", hits), ("event", events)):
        for name, expression in mapping.items():
            branch, index = _split_index(expression)
            if branch not in keys:
                msg = (
                    f"{path}: {role}.{name}: branch {branch!r} not in tree {tree_name!r}"
                    f"{did_you_mean(branch, keys)}"
                )
                raise BranchError(msg)
            jagged = _is_jagged(tree[branch])
            if role == "hits" and not jagged:
                msg = (
                    f"{path}: hits.{name}: branch {branch!r} has one value per event "
                    f"({tree[branch].typename}); a hit field needs a jagged branch (one value per hit)"
                )
                raise BranchError(msg)
            if role == "event" and jagged and index is None:
                msg = (
                    f"{path}: event.{name}: branch {branch!r} is jagged ({tree[branch].typename}); "
                    f"pick one element per event, e.g. '{branch}[0]'"
                )
                raise BranchError(msg)


def _is_jagged(branch) -> bool:
    interp = branch.interpretation
    return isinstance(interp, uproot.AsJagged) or "[]" in branch.typename or "vector" in branch.typename


def num_entries(path: str, tree_name: str) -> int:
    file, tree = open_tree(path, tree_name)
    with file:
        return int(tree.num_entries)


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
) -> Iterator[Step]:
    """Yield a partition's entries in steps of at most *step_size* entries."""
    path = partition.file
    file, tree = open_tree(path, tree_name)
    with file:
        check_branches(tree, path, tree_name, hits, events)
        branches = branches_needed(hits, events)
        start = partition.entry_start
        stop = tree.num_entries if partition.entry_stop is None else partition.entry_stop
        iterator = tree.iterate(
            branches, step_size=step_size, entry_start=start, entry_stop=stop,
            library="ak", how=dict,
        )
        first = start
        while True:
            try:
                arrays = next(iterator)
            except StopIteration:
                return
            except BAD_FILE_ERRORS as err:
                raise _as_input_error(path, err) from err
            n = len(next(iter(arrays.values()))) if arrays else 0
            offsets, flat = _flatten_hits(path, arrays, hits, first)
            event_arrays = {}
            for name, expression in events.items():
                branch, index = _split_index(expression)
                event_arrays[name] = _event_values(arrays[branch], index)
            yield Step(np.arange(first, first + n, dtype=np.int64), offsets, flat, event_arrays)
            first += n


def file_info(path: str) -> dict:
    """Path, size and modification time, recorded to detect changed inputs."""
    stat = Path(path).stat()
    return {"path": path, "size": stat.st_size, "mtime": stat.st_mtime}


def describe_failure(err: BaseException) -> dict[str, str]:
    """The report entry of a bad file, with uproot's read-error report names."""
    cause = err.__cause__ if isinstance(err, InputFileError) and err.__cause__ is not None else err
    kind = type(cause)
    name = kind.__name__ if kind.__module__ in ("builtins", "hepdask.errors") else f"{kind.__module__}.{kind.__name__}"
    return {"exception": name, "message": str(err)}
