"""Detector geometry: tables keyed by hit ids, and the per-hit calibration join.

A :class:`Detector` is a table with one row per readout channel: integer key columns (for
KM3NeT ``dom_id`` and ``channel_id``, the PMT's index inside its DOM) and float value
columns (position, direction, time offset, string and floor). It comes from a KM3NeT ``.detx``
file of any format version (v1 to v5) or from a plain CSV table, so a LArTPC wire map or a
calorimeter cell map uses the same mechanism.

:func:`calibrate` is the kernel: flat hit arrays in, the same hits with the table's columns
joined on (and ``t + t0``, corrected for time slewing) out. It knows nothing of files or Dask;
:func:`load` reads (and caches, per process) the tables the workers need.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from .errors import GeometryError, did_you_mean
from .jit import fast_start

fast_start()

#: Columns a ``.detx`` file gives every PMT (``channel_id`` is its index within the DOM).
DETX_KEYS = ("dom_id", "channel_id")
DETX_FIELDS = ("pmt_id", "pos_x", "pos_y", "pos_z", "dir_x", "dir_y", "dir_z", "t0", "du", "floor", "status")
#: Every column of a detx table, keys first.
DETX_COLUMNS = (*DETX_KEYS, *DETX_FIELDS)
#: The newest ``.detx`` format version this reader knows.
DETX_MAX_VERSION = 5

#: PMT time slewing in ns by time over threshold (ns, 0..255): the lab-measured lookup table
#: KM3NeT's km3pipe applies by default (``km3pipe.calib.slew(tot, variant=3)``, MIT licence,
#: copied verbatim). The calibrated time is ``t + t0 - SLEWING_NS[tot]``.
SLEWING_NS = np.array([
    8.01, 7.52, 7.05, 6.59, 6.15, 5.74, 5.33, 4.95, 4.58, 4.22, 3.89, 3.56, 3.25, 2.95, 2.66, 2.39,
    2.12, 1.87, 1.63, 1.40, 1.19, 0.98, 0.78, 0.60, 0.41, 0.24, 0.07, -0.10, -0.27, -0.43, -0.59, -0.75,
    -0.91, -1.08, -1.24, -1.41, -1.56, -1.71, -1.85, -1.98, -2.11, -2.23, -2.35, -2.47, -2.58, -2.69, -2.79, -2.89,
    -2.99, -3.09, -3.19, -3.28, -3.37, -3.46, -3.55, -3.64, -3.72, -3.80, -3.88, -3.96, -4.04, -4.12, -4.20, -4.27,
    -4.35, -4.42, -4.49, -4.56, -4.63, -4.70, -4.77, -4.84, -4.90, -4.97, -5.03, -5.10, -5.16, -5.22, -5.28, -5.34,
    -5.40, -5.46, -5.52, -5.58, -5.63, -5.69, -5.74, -5.80, -5.85, -5.91, -5.96, -6.01, -6.06, -6.11, -6.16, -6.21,
    -6.26, -6.31, -6.36, -6.41, -6.45, -6.50, -6.55, -6.59, -6.64, -6.68, -6.72, -6.77, -6.81, -6.85, -6.89, -6.93,
    -6.98, -7.02, -7.06, -7.09, -7.13, -7.17, -7.21, -7.25, -7.28, -7.32, -7.36, -7.39, -7.43, -7.46, -7.50, -7.53,
    -7.57, -7.60, -7.63, -7.66, -7.70, -7.73, -7.76, -7.79, -7.82, -7.85, -7.88, -7.91, -7.94, -7.97, -7.99, -8.02,
    -8.05, -8.07, -8.10, -8.13, -8.15, -8.18, -8.20, -8.23, -8.25, -8.28, -8.30, -8.32, -8.34, -8.37, -8.39, -8.41,
    -8.43, -8.45, -8.47, -8.49, -8.51, -8.53, -8.55, -8.57, -8.59, -8.61, -8.62, -8.64, -8.66, -8.67, -8.69, -8.70,
    -8.72, -8.74, -8.75, -8.76, -8.78, -8.79, -8.81, -8.82, -8.83, -8.84, -8.86, -8.87, -8.88, -8.89, -8.90, -8.92,
    -8.93, -8.94, -8.95, -8.96, -8.97, -8.98, -9.00, -9.01, -9.02, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04,
    -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04,
    -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04,
    -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04, -9.04,], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Detector:
    """One row per readout channel: integer ``keys`` columns and float value columns."""

    path: str
    keys: tuple[str, ...]
    columns: dict[str, np.ndarray]
    det_id: int | None = None
    version: int | None = None
    #: Position of every DOM/module (rows of x, y, z; from the DOM lines of detx v4+, else where
    #: its PMTs' axes cross); the detector centre is their mean, as in km3pipe's ``dom_table``.
    module_positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    @property
    def fields(self) -> tuple[str, ...]:
        """The value columns a join adds to every hit."""
        return tuple(c for c in self.columns if c not in self.keys)

    @property
    def n_rows(self) -> int:
        return int(next(iter(self.columns.values())).size)

    @functools.cached_property
    def _lookup(self) -> tuple[int, np.ndarray, np.ndarray, np.uint64, np.ndarray]:
        """``(stride, hash keys, hash rows, hash shift, values)``: an open-addressing hash
        table of the combined keys, and the value columns row by row (one row per channel)."""
        key_arrays = [self.columns[k] for k in self.keys]
        stride = _stride(self.path, self.keys, key_arrays)
        combined = _combine(key_arrays, stride)
        order = np.argsort(combined, kind="stable")
        dup = np.flatnonzero(combined[order][1:] == combined[order][:-1])
        if dup.size:
            row = int(order[dup[0]])
            where = ", ".join(f"{k}={int(self.columns[k][row])}" for k in self.keys)
            msg = f"{self.path}: the channel {where} appears more than once"
            raise GeometryError(msg)
        bits = max(4, int(np.ceil(np.log2(max(1, combined.size) * 2))))
        table_keys = np.zeros(2**bits, np.int64)
        table_rows = np.full(2**bits, -1, np.int64)
        shift = np.uint64(64 - bits)
        _hash_insert(combined, table_keys, table_rows, shift)
        values = np.ascontiguousarray(np.stack([self.columns[f].astype(np.float64) for f in self.fields], axis=1))
        return stride, table_keys, table_rows, shift, values

    def centre(self) -> np.ndarray:
        """Mean position of the detector's modules (DOMs), as OrcaSong centres detectors."""
        return self.module_positions.mean(axis=0)

    def shifted(self, target: tuple[float | None, float | None, float | None]) -> Detector:
        """The detector translated so that its centre lies at *target* (None: axis untouched)."""
        columns = dict(self.columns)
        for name in ("pos_x", "pos_y", "pos_z"):
            if name not in columns:
                msg = f"{self.path}: cannot centre the detector: it has no {name!r} column"
                raise GeometryError(msg)
        centre = self.centre()
        shift = np.array([0.0 if t is None else t - c for t, c in zip(target, centre)])
        for i, name in enumerate(("pos_x", "pos_y", "pos_z")):
            columns[name] = columns[name] + shift[i]
        return Detector(self.path, self.keys, columns, self.det_id, self.version, self.module_positions + shift)


def _stride(path: str, keys: tuple[str, ...], key_arrays: list[np.ndarray]) -> int:
    if len(keys) == 1:
        return 0
    if len(keys) != 2:
        msg = f"{path}: a detector table is keyed by one or two columns, got {list(keys)}"
        raise GeometryError(msg)
    second = key_arrays[1]
    if second.size and second.min() < 0:
        msg = f"{path}: key column {keys[1]!r} must not be negative (got {int(second.min())})"
        raise GeometryError(msg)
    return int(second.max()) + 1 if second.size else 1


def _combine(key_arrays: list[np.ndarray], stride: int) -> np.ndarray:
    first = key_arrays[0].astype(np.int64)
    if stride == 0:
        return first
    return first * stride + key_arrays[1].astype(np.int64)


# --------------------------------------------------------------------------------------------
# kernels


#: Fibonacci hashing: multiply by 2**64 / golden ratio, keep the top bits.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True)
def _slot(key, shift):  # pragma: no cover - numba
    return np.int64((np.uint64(key) * _GOLDEN) >> shift)


@numba.njit(cache=True)
def _hash_insert(keys, table_keys, table_rows, shift):  # pragma: no cover - numba
    mask = table_keys.size - 1
    for row in range(keys.size):
        s = _slot(keys[row], shift)
        while table_rows[s] >= 0:
            s = (s + 1) & mask
        table_keys[s] = keys[row]
        table_rows[s] = row


@numba.njit(cache=True)
def _join(k0, k1, stride, table_keys, table_rows, shift, values, out, rows):  # pragma: no cover - numba
    mask = table_keys.size - 1
    n_cols = values.shape[1]
    previous_key, previous_row = 0, -2
    for i in range(k0.size):
        if stride > 0 and (k1[i] < 0 or k1[i] >= stride):
            # A second key outside the table's range would alias another channel's
            # combined key (dom * stride + stride == (dom + 1) * stride): not in the table.
            rows[i] = -1
            for c in range(n_cols):
                out[c, i] = np.nan
            continue
        key = k0[i] * stride + k1[i]
        if previous_row != -2 and key == previous_key:
            r = previous_row
        else:
            s = _slot(key, shift)
            r = -1
            while table_rows[s] >= 0:
                if table_keys[s] == key:
                    r = table_rows[s]
                    break
                s = (s + 1) & mask
            previous_key, previous_row = key, r
        rows[i] = r
        if r >= 0:
            for c in range(n_cols):
                out[c, i] = values[r, c]
        else:
            for c in range(n_cols):
                out[c, i] = np.nan


@numba.njit(cache=True)
def _calibrated_time(t, t0, tot, slewing, out):  # pragma: no cover - numba
    last = slewing.size - 1
    for i in range(t.size):
        k = tot[i]
        if k < 0:
            k = 0
        elif k > last:
            k = last
        out[i] = (t[i] + t0[i]) - slewing[k]


@numba.njit(cache=True)
def _first_triggered(offsets, time, triggered, out):  # pragma: no cover - numba
    for e in range(offsets.size - 1):
        best = np.inf
        for i in range(offsets[e], offsets[e + 1]):
            if triggered[i] != 0 and time[i] < best:
                best = time[i]
        out[e] = best if best < np.inf else np.nan


def join(detector: Detector, key_values: list[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Look every hit up in *detector* by its key values (one array per key column).

    Returns the detector's value columns per hit (NaN for a hit whose channel is not in the
    table) and the row of each hit (-1 where unknown).
    """
    if len(key_values) != len(detector.keys):
        msg = f"{detector.path}: the table is keyed by {list(detector.keys)}, got {len(key_values)} key arrays"
        raise GeometryError(msg)
    stride, table_keys, table_rows, shift, values = detector._lookup
    k0 = np.ascontiguousarray(key_values[0], dtype=np.int64)
    k1 = np.ascontiguousarray(key_values[-1], dtype=np.int64)
    out = np.empty((values.shape[1], k0.size), np.float64)
    rows = np.empty(k0.size, np.int64)
    _join(k0, k1, stride, table_keys, table_rows, shift, values, out, rows)
    return dict(zip(detector.fields, out)), rows


def calibrated_time(t: np.ndarray, t0: np.ndarray, tot: np.ndarray | None = None) -> np.ndarray:
    """``t + t0``, minus the PMT time slewing of each hit's time over threshold when *tot* is
    given (the same float64 operations, in the same order, as km3pipe's calibration)."""
    t = np.ascontiguousarray(t, dtype=np.float64)
    t0 = np.ascontiguousarray(t0, dtype=np.float64)
    if tot is None:
        tot_values, table = np.zeros(t.size, np.int64), np.zeros(1, np.float64)
    else:
        tot_values, table = np.ascontiguousarray(tot, dtype=np.int64), SLEWING_NS
    out = np.empty(t.size, np.float64)
    _calibrated_time(t, t0, tot_values, table, out)
    return out


def first_triggered_time(offsets: np.ndarray, time: np.ndarray, triggered: np.ndarray) -> np.ndarray:
    """Per event, the earliest time among its triggered hits (``triggered != 0``); NaN for
    an event without a triggered hit. This is the hit OrcaSong centres time on."""
    out = np.empty(offsets.size - 1, np.float64)
    _first_triggered(np.ascontiguousarray(offsets, dtype=np.int64), np.ascontiguousarray(time, dtype=np.float64),
                     np.ascontiguousarray(triggered), out)
    return out


# --------------------------------------------------------------------------------------------
# files


class _Lines:
    """The non-empty, non-comment lines of a text file, with their line numbers."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                raw = handle.read().splitlines()
        except FileNotFoundError:
            msg = f"detector file {path!r} does not exist"
            raise GeometryError(msg) from None
        except OSError as err:
            msg = f"detector file {path!r} cannot be read: {err}"
            raise GeometryError(msg) from None
        self.lines = [(n + 1, s.strip()) for n, s in enumerate(raw) if s.strip() and not s.lstrip().startswith("#")]
        self.position = 0

    def next(self, what: str) -> tuple[int, list[str]]:
        if self.position >= len(self.lines):
            msg = f"{self.path}: the file ends before {what} (truncated?)"
            raise GeometryError(msg)
        number, text = self.lines[self.position]
        self.position += 1
        return number, text.split()

    def numbers(self, what: str, count: int, kinds: str) -> tuple[int, list]:
        """The next line as numbers: ``kinds`` says ``i`` (int) or ``f`` (float) per column;
        the line must hold at least ``count`` of them."""
        number, tokens = self.next(what)
        if len(tokens) < count:
            msg = f"{self.path}: line {number}: {what} needs {count} values, got {len(tokens)}: {' '.join(tokens)!r}"
            raise GeometryError(msg)
        try:
            values = [int(tok) if kind == "i" else float(tok) for tok, kind in zip(tokens, kinds)]
        except ValueError:
            msg = f"{self.path}: line {number}: {what} is not numeric: {' '.join(tokens)!r}"
            raise GeometryError(msg) from None
        return number, values + tokens[len(kinds):]


def _detx_header(lines: _Lines) -> tuple[int, int, int]:
    """``(det_id, version, n_doms)``; v1 files start ``det_id n_doms``."""
    number, tokens = lines.next("the header")
    if len(tokens) != 2:
        msg = f"{lines.path}: line {number}: expected 'DET_ID VERSION' (e.g. '49 v5'), got {' '.join(tokens)!r}"
        raise GeometryError(msg)
    try:
        det_id = int(tokens[0])
    except ValueError:
        msg = f"{lines.path}: line {number}: detector id {tokens[0]!r} is not an integer"
        raise GeometryError(msg) from None
    if tokens[1].lstrip("-").isdigit():
        return det_id, 1, int(tokens[1])
    tag = tokens[1].lower()
    if not (tag.startswith("v") and tag[1:].isdigit()):
        msg = f"{lines.path}: line {number}: unknown detx version tag {tokens[1]!r} (expected v1 to v{DETX_MAX_VERSION})"
        raise GeometryError(msg)
    version = int(tag[1:])
    if not 2 <= version <= DETX_MAX_VERSION:
        msg = f"{lines.path}: line {number}: detx version {version} is not supported (this reader knows v1 to v{DETX_MAX_VERSION})"
        raise GeometryError(msg)
    lines.numbers("the validity period", 2, "ff")
    lines.next("the UTM reference")
    _, (n_doms, *_) = lines.numbers("the number of DOMs", 1, "i")
    return det_id, version, n_doms


def _axes_crossing(points: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """The point nearest (least squares) to the lines through *points* along *directions*:
    a DOM's centre from its PMTs' axes, as km3pipe computes DOM positions before detx v4."""
    if len(points) < 2:
        return points.mean(axis=0) if len(points) else np.full(3, np.nan)
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    projectors = np.eye(3)[None] - unit[:, :, None] * unit[:, None, :]
    lhs = projectors.sum(axis=0)
    rhs = np.einsum("nij,nj->i", projectors, points)
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return points.mean(axis=0)


def read_detx(path: str | os.PathLike) -> Detector:
    """Read a KM3NeT ``.detx`` file of format version 1 to 5 into a Detector keyed by
    ``(dom_id, channel_id)``."""
    path = str(path)
    lines = _Lines(path)
    det_id, version, n_doms = _detx_header(lines)
    if n_doms <= 0:
        msg = f"{path}: the header announces {n_doms} DOMs"
        raise GeometryError(msg)
    rows: list[tuple] = []
    modules = np.zeros((n_doms, 3))
    current_du, current_floor = None, 0
    for d in range(n_doms):
        what = f"DOM {d + 1} of {n_doms}"
        if version <= 3:
            _, (dom_id, du, floor, n_pmts, *_) = lines.numbers(what, 4, "iiii")
        else:
            # dom_id du floor, x y z, quaternion (4), t0, [status,] n_pmts
            kinds = "iii" + "f" * 8 + ("ii" if version == 5 else "i")
            _, values = lines.numbers(what, len(kinds), kinds)
            dom_id, du, floor = values[:3]
            modules[d] = values[3:6]
            n_pmts = values[len(kinds) - 1]
        # Jpp once wrote floor -1; km3pipe (and so OrcaSong) then numbers the DOMs of a DU 1, 2, ...
        current_floor = 1 if du != current_du else current_floor + 1
        current_du = du
        if floor == -1:
            floor = current_floor
        start = len(rows)
        for channel in range(n_pmts):
            _, values = lines.numbers(f"PMT {channel} of DOM {dom_id}", 8, "iffffffff")
            status = int(values[8]) if version >= 3 and len(values) > 8 else 0
            rows.append((dom_id, channel, values[0], *values[1:8], du, floor, status))
        if version <= 3:
            pmts = np.array([r[3:9] for r in rows[start:]], np.float64).reshape(-1, 6)
            modules[d] = _axes_crossing(pmts[:, :3], pmts[:, 3:])
    if lines.position != len(lines.lines):
        number, text = lines.lines[lines.position]
        msg = f"{path}: line {number}: unexpected content after the {n_doms} DOMs the header announces: {text[:60]!r}"
        raise GeometryError(msg)
    table = np.array(rows, dtype=np.float64) if rows else np.zeros((0, 13))
    columns = {name: table[:, i] for i, name in enumerate(DETX_COLUMNS)}
    for name in ("dom_id", "channel_id"):
        columns[name] = columns[name].astype(np.int64)
    return Detector(path, DETX_KEYS, columns, det_id, version, modules)


def read_csv(path: str | os.PathLike, keys: tuple[str, ...]) -> Detector:
    """Read a CSV table with a header row: integer *keys* columns, every other column numeric.

    Positions named ``pos_x``, ``pos_y``, ``pos_z`` also give the detector centre.
    """
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(line for line in handle if line.strip() and not line.lstrip().startswith("#"))
            header = [h.strip() for h in next(reader, [])]
            body = list(reader)
    except FileNotFoundError:
        msg = f"detector table {path!r} does not exist"
        raise GeometryError(msg) from None
    if not header:
        msg = f"{path}: empty detector table (a header row naming the columns is needed)"
        raise GeometryError(msg)
    for key in keys:
        if key not in header:
            msg = f"{path}: key column {key!r} not in the header{did_you_mean(key, header)} (columns: {header})"
            raise GeometryError(msg)
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        values = []
        for i, row in enumerate(body):
            if len(row) != len(header):
                msg = f"{path}: row {i + 2} has {len(row)} values, the header {len(header)}"
                raise GeometryError(msg)
            try:
                values.append(float(row[j]))
            except ValueError:
                msg = f"{path}: row {i + 2}, column {name!r}: {row[j]!r} is not a number"
                raise GeometryError(msg) from None
        columns[name] = np.array(values, dtype=np.float64)
    for key in keys:
        as_int = columns[key].astype(np.int64)
        if not np.array_equal(as_int, columns[key]):
            msg = f"{path}: key column {key!r} holds non-integer values"
            raise GeometryError(msg)
        columns[key] = as_int
    positions = [columns[c] for c in ("pos_x", "pos_y", "pos_z") if c in columns]
    modules = np.stack(positions, axis=1) if len(positions) == 3 else np.zeros((0, 3))
    return Detector(path, tuple(keys), columns, None, None, modules)


def load(path: str | os.PathLike, keys: tuple[str, ...] | None = None,
         centre: tuple[float | None, float | None, float | None] | None = None) -> Detector:
    """Read a ``.detx`` file or a CSV table (by suffix), cached per process while the file
    is unchanged; ``centre`` translates the detector as OrcaSong's ``center_hits_to``."""
    path = str(path)
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        msg = f"detector file {path!r} does not exist"
        raise GeometryError(msg) from None
    return _load(path, stat.st_size, stat.st_mtime_ns, tuple(keys) if keys else None, centre)


@functools.lru_cache(maxsize=16)
def _load(path: str, size: int, mtime: int, keys: tuple[str, ...] | None, centre) -> Detector:
    suffix = Path(path).suffix.lower()
    if suffix == ".detx":
        detector = read_detx(path)
        if keys is not None and tuple(keys) != DETX_KEYS:
            detector = Detector(path, tuple(keys), detector.columns, detector.det_id, detector.version,
                                detector.module_positions)
            detector._lookup  # noqa: B018 - validates the keys (unique) now, on load
    elif suffix == ".csv":
        detector = read_csv(path, keys or DETX_KEYS)
    else:
        msg = f"{path}: unknown detector file type {suffix!r} (expected .detx or .csv)"
        raise GeometryError(msg)
    return detector.shifted(centre) if centre is not None else detector
