"""Numba kernels that bin each event's hits into a dense image.

Pure functions on numpy arrays: no Dask, no files, no config objects. Hits arrive flat, as a
``(n_axes, n_hits)`` coordinate array plus per-event ``offsets`` (``n_events + 1`` entries, as
awkward's ListOffsetArray has them), and leave as ``(n_events, *shape)`` images.

Bin membership follows ``numpy.histogramdd`` exactly: every bin is half-open ``[lo, hi)``
except the last, which also holds a value equal to the last edge. A hit below the first edge
of an axis counts as that axis' underflow, above the last edge as overflow; a NaN coordinate
drops the hit and counts it as ``nan`` (``-inf``/``+inf`` are under/overflow). A hit outside
the range of any axis is not in the image (as in ``histogramdd``); under/overflow is counted
per axis, so one hit may count on several axes. Integer images saturate at their dtype's
maximum and count the hits that did not fit as ``clipped``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from .jit import fast_start

fast_start()

UNIFORM, LOG, EXPLICIT = 0, 1, 2
_NAN, _UNDER, _OVER = -3, -1, -2
#: A first guess this close to a bin boundary is checked against the edges themselves.
_NEAR_EDGE = 1e-6


@dataclass(frozen=True)
class BinAxis:
    """Edges of one image axis, and how to find a value's bin quickly."""

    name: str
    edges: np.ndarray
    kind: int = EXPLICIT
    units: str = ""

    @classmethod
    def uniform(cls, name: str, bins: int, lo: float, hi: float, units: str = "") -> BinAxis:
        return cls(name, np.linspace(lo, hi, bins + 1), UNIFORM, units)

    @classmethod
    def log(cls, name: str, bins: int, lo: float, hi: float, units: str = "") -> BinAxis:
        return cls(name, np.geomspace(lo, hi, bins + 1), LOG, units)

    @classmethod
    def explicit(cls, name: str, edges, units: str = "") -> BinAxis:
        edges = np.asarray(edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            msg = f"axis {name!r}: edges must be at least two strictly increasing numbers"
            raise ValueError(msg)
        return cls(name, edges, EXPLICIT, units)

    @property
    def nbins(self) -> int:
        return self.edges.size - 1

    @property
    def centers(self) -> np.ndarray:
        if self.kind == LOG:
            return np.sqrt(self.edges[:-1] * self.edges[1:])
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    def downsampled(self, factor: int) -> BinAxis:
        """The same axis with every *factor* neighbouring bins merged (edges decimated)."""
        if factor < 1 or self.nbins % factor:
            msg = f"axis {self.name!r}: {self.nbins} bins are not divisible by {factor}"
            raise ValueError(msg)
        return BinAxis(self.name, self.edges[::factor].copy(), self.kind, self.units)

    def lookup(self) -> tuple[float, float]:
        """(origin, scale) of the arithmetic first guess of a bin index."""
        if self.kind == UNIFORM:
            return self.edges[0], self.nbins / (self.edges[-1] - self.edges[0])
        if self.kind == LOG:
            lo, hi = math.log(self.edges[0]), math.log(self.edges[-1])
            return lo, self.nbins / (hi - lo)
        return 0.0, 0.0


@dataclass(frozen=True)
class ImageLayout:
    """Where a hit with bin indices ``b`` lands in the flat image: one stride row per output.

    A plain histogram has one output with C-order strides. The LDMX ``xyz`` format has three
    outputs (the x-y, x-z and y-z projections) interleaved as the channels of one square image.
    """

    axes: tuple[BinAxis, ...]
    shape: tuple[int, ...]
    strides: np.ndarray
    offsets: np.ndarray
    dims: tuple[str, ...]
    channel_names: tuple[str, ...] = field(default=())

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def histogram_layout(axes: list[BinAxis] | tuple[BinAxis, ...]) -> ImageLayout:
    """An N-D histogram image, ``shape = (n_0, n_1, ...)`` in axis order."""
    axes = tuple(axes)
    if not 1 <= len(axes) <= 4:
        msg = f"an image has 1 to 4 axes, got {len(axes)}"
        raise ValueError(msg)
    shape = tuple(a.nbins for a in axes)
    strides = np.array([[int(np.prod(shape[i + 1 :])) for i in range(len(shape))]], np.int64)
    return ImageLayout(axes, shape, strides, np.zeros(1, np.int64), tuple(a.name for a in axes))


def xyz_layout(axes: list[BinAxis] | tuple[BinAxis, ...]) -> ImageLayout:
    """The LDMX ``xyz`` image: x-y, x-z and y-z projections as 3 channels of an n x n image.

    Channel ``xy`` has rows x and columns y, ``xz`` rows x and columns z, ``yz`` rows y and
    columns z; each equals the sum of the 3-D ``histogramdd`` over the axis left out.
    """
    axes = tuple(axes)
    if len(axes) != 3 or len({a.nbins for a in axes}) != 1:
        msg = "the xyz format needs three axes with the same number of bins"
        raise ValueError(msg)
    n = axes[0].nbins
    channels = 3
    row, col = n * channels, channels
    strides = np.array([[row, col, 0], [row, 0, col], [0, row, col]], np.int64)
    names = tuple(f"{axes[i].name}{axes[j].name}" for i, j in ((0, 1), (0, 2), (1, 2)))
    return ImageLayout(
        axes, (n, n, channels), strides, np.arange(channels, dtype=np.int64),
        ("u", "v", "projection"), names,
    )


@numba.njit(inline="always")
def _locate(x, lo, hi, n, kind, origin, scale, near, edges, a):
    """Bin of *x* on axis *a* (row *a* of the padded ``edges``), or a negative code.

    The arithmetic guess is exact except within *near* (its rounding bound, in bins: see
    ``_rounding_bound``) of a bin boundary, where the guess is checked against the real
    edges, so the result equals ``searchsorted``.
    """
    if not x >= lo:
        return _NAN if x != x else _UNDER
    if x >= hi:
        return n - 1 if x == hi else _OVER
    if kind == EXPLICIT:
        left, right = 0, n
        while right - left > 1:
            mid = (left + right) >> 1
            if x >= edges[a, mid]:
                left = mid
            else:
                right = mid
        return left
    g = (x - origin) * scale if kind == UNIFORM else (math.log(x) - origin) * scale
    b = int(g)
    frac = g - b
    if frac < near or frac > 1.0 - near or b >= n:
        b = min(max(b, 0), n - 1)
        while b > 0 and x < edges[a, b]:
            b -= 1
        while b < n - 1 and x >= edges[a, b + 1]:
            b += 1
    return b


#: Hits handled per block: the block's bin indices stay in L1 between the two passes.
#: Each block is binned in two passes: a branch-free (vectorised) guess of every hit's flat
#: index, axis by axis, then a tight scatter-add; hits the guess is not sure of (outside the
#: range, NaN, within rounding of an edge, explicit edges) are located exactly in between
#: (for plain count images, after the sure hits are counted: the order of counts is free).
_BLOCK = 512

#: The first guess is not trusted this close (in bins) to a boundary: past it, the float32
#: arithmetic of the guess would have to be wrong by more than its error bound allows, so
#: float32 coordinates are guessed in float32 (twice the SIMD lanes) unless an axis is so far
#: from 0, in bins, that its bound exceeds this; then the guess is made in float64.
_FLOAT32_MAX_NEAR = 1e-3


def _rounding_bound(axis: BinAxis, origin: float, scale: float, dtype) -> float:
    """How close (in bins) to a bin boundary the arithmetic guess of *axis* computed in
    *dtype* may land on the wrong side of it: past this, the guess is the bin.

    The guess ``g = (x - origin) * scale`` of a uniform axis rounds the origin, the scale, the
    difference and the product once each, and the edges themselves are rounded by about
    ``|edge|`` units of roundoff; with ``e`` the dtype's unit roundoff the error is below
    ``e * (|origin| * scale + 3 * (bins + 1))`` bins. A log axis's ``log(x)`` adds about ``e``
    times ``|log x|`` before scaling, and its edges (``geomspace``) are exact to a few units
    of roundoff times ``|log x|``, relative. The bound is four times that, plus
    ``_NEAR_EDGE``: it stays that small for ordinary axes, and grows for an axis far from 0
    compared with its bins (100 bins over ``[1e12, 1e12 + 1]``: 0.044 bins), whose hits
    near a boundary are then located exactly.
    """
    roundoff = np.finfo(dtype).eps / 2
    if axis.kind == LOG:
        logs = max(abs(math.log(axis.edges[0])), abs(math.log(axis.edges[-1])))
        return _NEAR_EDGE + 4 * roundoff * (8 * logs * scale + scale + 3 * (axis.nbins + 1))
    if axis.kind == UNIFORM:
        return _NEAR_EDGE + 4 * roundoff * (abs(origin) * scale + 3 * (axis.nbins + 1))
    return _NEAR_EDGE


def _exact_nears(axes, lookups: np.ndarray) -> np.ndarray:
    """Each axis's ``_rounding_bound`` in float64, where ``_locate`` guesses."""
    return np.array([_rounding_bound(a, o, s, np.float64) for a, (o, s) in zip(axes, lookups)], np.float64)


def _first_guess(axes, lookups: np.ndarray, coords_dtype: np.dtype):
    """Per-axis ``(lows, highs, origins, scales, nears, 1 - nears)`` of the first guess, in
    the dtype it is computed in: float32 when the coordinates are float32, no axis is
    logarithmic and the rounding bound (``_rounding_bound``) allows it; else float64. A hit
    closer than ``nears`` to a boundary (or outside, NaN, or on an explicit axis) is located
    exactly against the float64 edges. *lookups* holds each axis' ``BinAxis.lookup()`` as a row.
    """

    def nears(dtype) -> np.ndarray:
        return np.array([_rounding_bound(a, o, s, dtype) for a, (o, s) in zip(axes, lookups)])

    dtype = np.float64
    if coords_dtype == np.float32 and all(a.kind != LOG for a in axes):
        near32 = nears(np.float32)
        if near32.max() <= _FLOAT32_MAX_NEAR:
            dtype = np.float32
    near = nears(dtype)
    return (
        np.array([a.edges[0] for a in axes], dtype), np.array([a.edges[-1] for a in axes], dtype),
        lookups[:, 0].astype(dtype), lookups[:, 1].astype(dtype),
        near.astype(dtype), (1.0 - near).astype(dtype),
    )  # fmt: skip


@numba.njit(nogil=True)
def _exact_bins(coords, h, edges, nbins, kinds, origins, scales, exact_near, bins, i, under, over):
    """Exact bins of hit *h* into column *i* of ``bins``; 0 if the hit is in the image,
    else ``_NAN`` or ``_UNDER`` (per-axis under/overflow is counted here)."""
    code = 0
    for a in range(coords.shape[0]):
        n = nbins[a]
        b = _locate(np.float64(coords[a, h]), edges[a, 0], edges[a, n], n, kinds[a], origins[a],
                    scales[a], exact_near[a], edges, a)  # fmt: skip
        if b >= 0:
            bins[a, i] = b
        elif b == _UNDER:
            under[a] += 1
            code = min(code, _UNDER)  # outside the image; NaN (-3) wins
        elif b == _OVER:
            over[a] += 1
            code = min(code, _UNDER)  # outside the image; NaN (-3) wins
        else:
            code = _NAN
    return code


@numba.njit(inline="always")
def _flat(bins, i, k, key, strides, chan_offsets):
    """Flat index of hit *i* in output *k*: its *key* when the image has one output."""
    if strides.shape[0] == 1:
        return key
    idx = chan_offsets[k]
    for a in range(bins.shape[0]):
        idx += bins[a, i] * strides[k, a]
    return idx


@numba.njit(inline="always")
def _count(img, bins, i, key, strides, chan_offsets, check, maxval):
    """Count hit *i* in every output of ``img``; return how many counts did not fit."""
    n_clipped = 0
    for k in range(strides.shape[0]):
        idx = _flat(bins, i, k, key, strides, chan_offsets)
        if not check or img[idx] < maxval:
            img[idx] += 1
        else:
            n_clipped += 1
    return n_clipped


def _make_fill(index, parallel: bool):
    """The binning kernel computing flat bin indices as *index* (np.int32 when the image is
    small enough: twice the SIMD lanes of int64), its events split among numba's threads if
    *parallel*. ``events`` is a closure variable so that the two compilations get different
    keys in numba's on-disk cache (whose key holds the signature, the code and the closure,
    not the ``parallel`` flag)."""
    zero = index(0)
    bad = index(np.iinfo(index).min)
    events = numba.prange if parallel else range

    @numba.njit(parallel=parallel, cache=True, nogil=True)
    def fill(coords, offsets, edges, nbins, kinds, origins, scales, exact_near, guess, strides, key_strides,
             chan_offsets, weights, weighted, maxval, saturate, out, under, over, nans,
             clipped, inside):  # fmt: skip
        g_lows, g_highs, g_origins, g_scales, g_nears, g_fars = guess
        n_axes = coords.shape[0]
        n_out = strides.shape[0]
        size = out.shape[1]
        for ev in events(offsets.size - 1):
            first, last = offsets[ev], offsets[ev + 1]
            block = min(_BLOCK, last - first)
            # keys[i]: the flat index of hit i (of output 0), negative when the first pass
            # could not place the hit for certain; bins[a, i]: its bin on axis a.
            keys = np.empty(block, index)
            unsure = np.empty(block, np.int64)
            bins = np.empty((n_axes, block), index)
            # A bin gets at most one count per hit and output: with no more counts than
            # maxval none can saturate, and the check is skipped.
            check = saturate and (last - first) * n_out > maxval
            # Plain counts are added as soon as the first pass is sure of them.
            counts_first = not weighted and n_out == 1 and not check
            n_nan = 0
            n_clipped = 0
            n_inside = 0
            acc = np.zeros(size if weighted else 0, np.float64)
            img = out[ev]
            for start in range(first, last, _BLOCK):
                m = min(_BLOCK, last - start)
                keys[:m] = chan_offsets[0] if n_out == 1 else 0
                # First pass, one axis at a time over the block: branch-free for uniform
                # and log axes, so that LLVM vectorises it.
                for a in range(n_axes):
                    x = coords[a, start : start + m]
                    row = bins[a]
                    n = nbins[a]
                    lo, hi = edges[a, 0], edges[a, n]
                    kind, origin, scale = kinds[a], origins[a], scales[a]
                    stride = index(key_strides[a])
                    if kind == EXPLICIT:
                        for i in range(m):
                            b_exact = _locate(np.float64(x[i]), lo, hi, n, kind, origin, scale, 0.0, edges, a)
                            row[i] = index(max(b_exact, 0))
                            keys[i] = (keys[i] + row[i] * stride) | (zero if b_exact >= 0 else bad)
                        continue
                    # Each loop has its own variable names: numba gives a name one type in the
                    # whole function, and a `b` shared with _locate's int64 result widened
                    # every lane of the loops below (1.4x slower).
                    if kind == UNIFORM:
                        # In the guess's dtype (float32 or float64; see _first_guess).
                        g_lo, g_hi, g_origin, g_scale = g_lows[a], g_highs[a], g_origins[a], g_scales[a]
                        g_near, g_far = g_nears[a], g_fars[a]
                        n_bins = index(n)  # compared in the index dtype, lane for lane
                        for i in range(m):
                            u = x[i]
                            inside_u = (u >= g_lo) & (u < g_hi)
                            gu = ((u if inside_u else g_lo) - g_origin) * g_scale
                            fu = np.floor(gu)
                            bu = index(fu)
                            frac_u = gu - fu
                            # Within rounding of an edge (or past the last bin): not certain.
                            inside_u &= (frac_u >= g_near) & (frac_u <= g_far) & (bu < n_bins)
                            row[i] = bu
                            keys[i] = (keys[i] + bu * stride) | (zero if inside_u else bad)
                        continue
                    near_log = exact_near[a]
                    for i in range(m):  # LOG
                        v = np.float64(x[i])
                        ok = (v >= lo) & (v < hi)
                        g = (math.log(v if ok else lo) - origin) * scale
                        b_log = index(g)
                        frac = g - b_log
                        ok &= (frac >= near_log) & (frac <= 1.0 - near_log) & (b_log < n)
                        row[i] = b_log
                        keys[i] = (keys[i] + b_log * stride) | (zero if ok else bad)
                # The few hits the first pass was not sure of: their exact bins, or their
                # statistics if they are not in the image (the key stays negative).
                n_unsure = 0
                if counts_first:
                    for i in range(m):
                        key = keys[i]
                        if key >= 0:
                            img[key] += 1
                        else:
                            unsure[n_unsure] = i
                            n_unsure += 1
                else:
                    for i in range(m):
                        unsure[n_unsure] = i
                        n_unsure += keys[i] < 0
                n_inside += m
                for j in range(n_unsure):
                    i = unsure[j]
                    code = _exact_bins(coords, start + i, edges, nbins, kinds, origins, scales, exact_near,
                                       bins, i, under[ev], over[ev])  # fmt: skip
                    if code < 0:
                        n_inside -= 1
                        n_nan += code == _NAN
                        continue
                    key = chan_offsets[0] if n_out == 1 else 0
                    if n_out == 1:
                        for a in range(n_axes):
                            key += bins[a, i] * strides[0, a]
                    keys[i] = key
                    if counts_first:
                        img[key] += 1
                if counts_first:
                    continue  # every count of the block is in
                # Second pass, in the hits' order (weighted sums must be histogramdd's).
                if weighted:
                    for i in range(m):
                        if keys[i] >= 0:
                            for k in range(n_out):
                                idx = _flat(bins, i, k, keys[i], strides, chan_offsets)
                                acc[idx] += weights[start + i]
                else:
                    for i in range(m):
                        if keys[i] >= 0:
                            n_clipped += _count(img, bins, i, keys[i], strides, chan_offsets,
                                                check, maxval)  # fmt: skip
            if weighted:
                for i in range(size):
                    img[i] = acc[i]
            nans[ev] = n_nan
            clipped[ev] = n_clipped
            inside[ev] = n_inside

    return fill


# All four share one on-disk cache index; the int32 and int64 kernels' signatures differ
# (the strides' dtype is *index*), the serial and parallel ones' closures.
_FILLS = {(index, parallel): _make_fill(index, parallel) for index in (np.int32, np.int64) for parallel in (False, True)}
#: Fewer hits than this in one call are binned on one thread: splitting them among threads
#: gains nothing, and the serial kernel compiles in 2.5-4 s against 7-9 s for the parallel
#: one (2 cores), which every fresh install and test run pays once per dtype combination.
#: Workers (one numba thread) always use the serial kernel.
PARALLEL_MIN_HITS = 2**16


@dataclass
class BinStats:
    """Per-axis hit statistics of a binning call, summed over its events."""

    axis_names: tuple[str, ...]
    hits: int = 0
    underflow: np.ndarray = None  # type: ignore[assignment]
    overflow: np.ndarray = None  # type: ignore[assignment]
    nan: int = 0
    clipped: int = 0
    in_image: int = 0

    def __post_init__(self) -> None:
        n = len(self.axis_names)
        if self.underflow is None:
            self.underflow = np.zeros(n, np.int64)
        if self.overflow is None:
            self.overflow = np.zeros(n, np.int64)

    def __iadd__(self, other: BinStats) -> BinStats:
        self.hits += other.hits
        self.underflow = self.underflow + other.underflow
        self.overflow = self.overflow + other.overflow
        self.nan += other.nan
        self.clipped += other.clipped
        self.in_image += other.in_image
        return self

    def to_dict(self) -> dict:
        return {
            "hits": int(self.hits),
            "in_image": int(self.in_image),
            "nan": int(self.nan),
            "clipped": int(self.clipped),
            "underflow": dict(zip(self.axis_names, map(int, self.underflow))),
            "overflow": dict(zip(self.axis_names, map(int, self.overflow))),
        }

    @classmethod
    def from_dict(cls, data: dict) -> BinStats:
        names = tuple(data["underflow"])
        return cls(
            names, data["hits"], np.array([data["underflow"][n] for n in names], np.int64),
            np.array([data["overflow"][n] for n in names], np.int64),
            data["nan"], data["clipped"], data["in_image"],
        )


def bin_events(
    coords: np.ndarray,
    offsets: np.ndarray,
    layout: ImageLayout,
    *,
    weights: np.ndarray | None = None,
    dtype: str | np.dtype = "uint16",
) -> tuple[np.ndarray, BinStats]:
    """Bin every event's hits into an image of ``layout``; return ``(images, stats)``.

    ``coords`` is ``(n_axes, n_hits)`` in axis order, ``offsets`` the ``n_events + 1`` hit
    offsets. ``weights`` (one per hit) makes a weighted image, which needs a float dtype.
    """
    dtype = np.dtype(dtype)
    coords = np.asarray(coords)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    n_axes = len(layout.axes)
    if coords.ndim != 2 or coords.shape[0] != n_axes:
        msg = f"coords must be (n_axes={n_axes}, n_hits), got shape {coords.shape}"
        raise ValueError(msg)
    n_hits = coords.shape[1]
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != n_hits:
        msg = f"offsets must start at 0 and end at n_hits={n_hits}"
        raise ValueError(msg)
    weighted = weights is not None
    if weighted:
        weights = np.ascontiguousarray(weights)
        if weights.shape != (n_hits,):
            msg = f"weights must have one value per hit ({n_hits}), got shape {weights.shape}"
            raise ValueError(msg)
        if dtype.kind != "f":
            msg = f"a weighted image needs a float dtype, not {dtype}"
            raise ValueError(msg)
    else:
        weights = np.zeros(0, np.float64)
    saturate = dtype.kind in "ui"
    maxval = int(np.iinfo(dtype).max) if saturate else 0

    width = max(a.nbins for a in layout.axes) + 1
    edges = np.zeros((n_axes, width), np.float64)
    for i, axis in enumerate(layout.axes):
        edges[i, : axis.edges.size] = axis.edges
    lookups = np.array([a.lookup() for a in layout.axes], np.float64).reshape(n_axes, 2)

    n_events = offsets.size - 1
    out = np.zeros((n_events, layout.size), dtype)
    under = np.zeros((n_events, n_axes), np.int64)
    over = np.zeros((n_events, n_axes), np.int64)
    nans = np.zeros(n_events, np.int64)
    clipped = np.zeros(n_events, np.int64)
    inside = np.zeros(n_events, np.int64)
    small = layout.size < 2**31 and max(a.nbins for a in layout.axes) < 2**31
    index = np.int32 if small else np.int64
    parallel = n_hits >= PARALLEL_MIN_HITS and numba.get_num_threads() > 1
    fill = _FILLS[index, parallel]
    strides = layout.strides.astype(index)
    # The first pass accumulates output 0's flat index when there is one output, else
    # only whether the hit was placed (the outputs are summed from the bins in the second).
    key_strides = strides[0] if strides.shape[0] == 1 else np.zeros(n_axes, index)
    fill(
        coords, offsets, edges, np.array([a.nbins for a in layout.axes], np.int64),
        np.array([a.kind for a in layout.axes], np.int64),
        np.ascontiguousarray(lookups[:, 0]), np.ascontiguousarray(lookups[:, 1]),
        _exact_nears(layout.axes, lookups), _first_guess(layout.axes, lookups, coords.dtype), strides, key_strides, layout.offsets.astype(index),
        weights, weighted, maxval, saturate, out, under, over, nans, clipped, inside,
    )
    stats = BinStats(
        tuple(a.name for a in layout.axes), int(n_hits), under.sum(axis=0), over.sum(axis=0),
        int(nans.sum()), int(clipped.sum()), int(inside.sum()),
    )
    return out.reshape((n_events, *layout.shape)), stats


@numba.njit(cache=True, nogil=True)
def _nonzero_elements(bits, values, counts, positions, out):
    k = 0
    for i in range(bits.shape[0]):
        c = 0
        for j in range(bits.shape[1]):
            if bits[i, j] != 0:
                positions[k] = j
                out[k] = values[i, j]
                k += 1
                c += 1
        counts[i] = c


def nonzero_elements(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero elements of ``(n_events, ...)`` images, event by event (a sparse image).

    Returns ``(counts, positions, values)``: each event's number of non-zero elements
    (int32), their flat positions within the event (int32, ascending) and the elements, in
    that order. "Zero" means all bits zero: -0.0 and NaN are kept, so ``densify`` gives back
    the same bytes. One pass, about 5 times faster than ``np.nonzero`` + a boolean gather.
    """
    flat = np.ascontiguousarray(images).reshape(images.shape[0], int(np.prod(images.shape[1:], dtype=np.int64)))
    if flat.shape[1] >= 2**31:
        msg = f"images of {flat.shape[1]} elements are too large for int32 positions"
        raise ValueError(msg)
    bits = flat.view(f"u{flat.dtype.itemsize}")
    n = int(np.count_nonzero(bits))
    counts = np.empty(flat.shape[0], np.int32)
    positions = np.empty(n, np.int32)
    values = np.empty(n, flat.dtype)
    _nonzero_elements(bits, flat, counts, positions, values)
    return counts, positions, values


def downsample(images: np.ndarray, factors: tuple[int, ...], *, dtype=None) -> np.ndarray:
    """Sum blocks of ``factors`` neighbouring bins of ``(n_events, *shape)`` images.

    Equal to binning with the axis' edges decimated (``BinAxis.downsampled``), which is how a
    build applies ``downsample``; this function serves images that are already binned. An
    integer sum saturates at the dtype's maximum, as binning does (a bin that saturated
    before holds at least that many hits); how many hits were clipped is not known here.
    """
    shape = images.shape[1:]
    if len(factors) != len(shape):
        msg = f"need one factor per image axis ({len(shape)}), got {factors}"
        raise ValueError(msg)
    new_shape = [images.shape[0]]
    for n, f in zip(shape, factors):
        if f < 1 or n % f:
            msg = f"axis of {n} bins is not divisible by {f}"
            raise ValueError(msg)
        new_shape += [n // f, f]
    summed = images.reshape(new_shape).sum(axis=tuple(range(2, 2 * len(shape) + 1, 2)))
    out = np.dtype(dtype or images.dtype)
    if out.kind in "ui":
        summed = np.clip(summed, np.iinfo(out).min, np.iinfo(out).max)
    return summed.astype(out)
