"""The binning kernels against numpy.histogramdd, event by event."""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from hepdask import binning
from hepdask.binning import (
    BinAxis,
    bin_events,
    downsample,
    histogram_layout,
    nonzero_elements,
    xyz_layout,
)


def _events(rng, n_events, n_axes, mean_hits=30, spread=1.3):
    counts = rng.poisson(mean_hits, n_events)
    counts[::7] = 0  # empty events
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    coords = rng.uniform(-spread, spread, (n_axes, offsets[-1])).astype(np.float32)
    return coords, offsets


def _reference(coords, offsets, axes, weights=None):
    out = []
    for e in range(offsets.size - 1):
        sl = slice(offsets[e], offsets[e + 1])
        h, _ = np.histogramdd(
            coords[:, sl].T.astype(np.float64),
            bins=[a.edges for a in axes],
            weights=None if weights is None else weights[sl],
        )
        out.append(h)
    return np.array(out)


AXIS_KINDS = {
    "uniform": lambda name: BinAxis.uniform(name, 7, -1.0, 1.0),
    "log": lambda name: BinAxis.log(name, 5, 0.05, 1.0),
    "explicit": lambda name: BinAxis.explicit(name, [-1.0, -0.5, -0.1, 0.0, 0.3, 1.0]),
}


@pytest.mark.parametrize("n_axes", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", sorted(AXIS_KINDS))
def test_counts_equal_histogramdd(n_axes, kind):
    rng = np.random.default_rng(n_axes)
    coords, offsets = _events(rng, 60, n_axes)
    axes = [AXIS_KINDS[kind](f"a{i}") for i in range(n_axes)]
    images, stats = bin_events(coords, offsets, histogram_layout(axes), dtype="uint32")
    expected = _reference(coords, offsets, axes)
    np.testing.assert_array_equal(images, expected)
    assert images.shape == (60, *(a.nbins for a in axes))
    assert stats.in_image == expected.sum()
    assert stats.hits == coords.shape[1]


def test_weighted_float_images_equal_histogramdd():
    rng = np.random.default_rng(3)
    coords, offsets = _events(rng, 40, 2)
    weights = rng.exponential(2.0, coords.shape[1])
    axes = [AXIS_KINDS["uniform"]("x"), AXIS_KINDS["explicit"]("y")]
    images, _ = bin_events(coords, offsets, histogram_layout(axes), weights=weights, dtype="float32")
    expected = _reference(coords, offsets, axes, weights).astype(np.float32)
    np.testing.assert_array_equal(images, expected)
    assert images.dtype == np.float32


def test_values_on_edges_follow_histogramdd():
    axis = BinAxis.uniform("x", 4, 0.0, 1.0)
    values = np.concatenate([axis.edges, np.nextafter(axis.edges, -np.inf), [1.0000001]])
    coords = values[None, :]
    offsets = np.array([0, values.size])
    images, stats = bin_events(coords, offsets, histogram_layout([axis]), dtype="uint16")
    expected, _ = np.histogramdd(values[:, None], bins=[axis.edges])
    np.testing.assert_array_equal(images[0], expected)
    assert images[0, -1] >= 1  # the last edge belongs to the last bin
    assert stats.underflow.tolist() == [1]  # nextafter(0, -inf)
    assert stats.overflow.tolist() == [1]


@pytest.mark.parametrize(
    ("lo", "hi", "bins"),
    [
        (0.1, 0.7, 7),  # bounds and widths that float32 cannot represent
        (-250.0, 500.0, 100),  # a time window
        (1000.0, 1750.0, 300),  # far from 0 in bins: float32 guess, larger bound
        (1.0e6, 1.0e6 + 10.0, 10),  # float32 cannot resolve a bin: the guess is made in float64
    ],
)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_float32_values_at_every_edge_follow_histogramdd(lo, hi, bins, dtype):
    """float32 hits are first placed in float32 arithmetic; at and next to every (float32-
    rounded) edge, and at random, the images and statistics still equal histogramdd's.
    uint8 images of this many hits take the saturation-checked path, float32 the weighted one."""
    axis = BinAxis.uniform("t", bins, lo, hi)
    other = BinAxis.uniform("z", 3, 0.0, 3.0)
    edges32 = axis.edges.astype(np.float32)
    rng = np.random.default_rng(bins)
    t = np.concatenate([
        edges32, np.nextafter(edges32, np.float32(-np.inf)), np.nextafter(edges32, np.float32(np.inf)),
        rng.uniform(lo - (hi - lo) * 0.1, hi + (hi - lo) * 0.1, 4000).astype(np.float32),
    ])  # fmt: skip
    z = rng.uniform(-0.2, 3.2, t.size).astype(np.float32)
    coords = np.stack([z, t])
    offsets = np.array([0, t.size // 3, t.size], np.int64)
    layout = histogram_layout([other, axis])
    weights = rng.exponential(1.0, t.size).astype(np.float32) if dtype == "float32" else None
    images, stats = bin_events(coords, offsets, layout, weights=weights, dtype=dtype)
    expected = _reference(coords, offsets, [other, axis], weights)
    if dtype == "float32":
        np.testing.assert_array_equal(images, expected.astype(np.float32))
    else:
        np.testing.assert_array_equal(images, np.minimum(expected, np.iinfo(dtype).max))
    t64, z64 = t.astype(np.float64), z.astype(np.float64)
    assert stats.underflow.tolist() == [int((z64 < 0).sum()), int((t64 < axis.edges[0]).sum())]
    assert stats.overflow.tolist() == [int((z64 > 3).sum()), int((t64 > axis.edges[-1]).sum())]
    assert stats.in_image == _reference(coords, offsets, [other, axis]).sum()


@pytest.mark.parametrize(
    "axis",
    [
        BinAxis.uniform("t", 100, 1e12, 1e12 + 1),  # far from 0 compared with a bin
        BinAxis.uniform("t", 1000, 1.7e18, 1.7e18 + 1e9),  # absolute ns timestamps
        BinAxis.log("E", 1000, 1e8, 1e8 + 1),  # a narrow log range
        BinAxis.log("E", 100_000, 1e6, 1e6 + 10),
    ],
    ids=["uniform-1e12", "uniform-ns-timestamps", "log-narrow", "log-fine"],
)
def test_axes_far_from_zero_compared_with_their_bins_follow_histogramdd(axis):
    """Where the arithmetic guess of a bin is off by more than a millionth of a bin (its
    rounding grows with |origin| / bin width), every hit still lands in histogramdd's bin."""
    rng = np.random.default_rng(axis.nbins)
    lo, hi = axis.edges[0], axis.edges[-1]
    values = np.concatenate([
        axis.edges, np.nextafter(axis.edges, -np.inf), np.nextafter(axis.edges, np.inf),
        lo + (hi - lo) * rng.random(200_000),
    ])  # fmt: skip
    images, stats = bin_events(values[None], np.array([0, values.size]), histogram_layout([axis]), dtype="uint32")
    np.testing.assert_array_equal(images[0], np.histogram(values, axis.edges)[0])
    assert stats.in_image == int(((values >= lo) & (values <= hi)).sum())


def test_nan_and_inf_are_defined():
    axis_x = BinAxis.uniform("x", 2, 0.0, 1.0)
    axis_y = BinAxis.uniform("y", 2, 0.0, 1.0)
    x = np.array([0.1, np.nan, np.inf, -np.inf, 0.6, 0.2])
    y = np.array([0.1, 0.5, 0.5, 0.5, np.nan, 0.7])
    images, stats = bin_events(np.stack([x, y]), np.array([0, 6]), histogram_layout([axis_x, axis_y]))
    assert images[0].tolist() == [[1, 1], [0, 0]]
    assert stats.nan == 2
    assert stats.overflow.tolist() == [1, 0]
    assert stats.underflow.tolist() == [1, 0]
    assert stats.in_image == 2


def test_empty_input_and_empty_events():
    layout = histogram_layout([BinAxis.uniform("x", 3, 0, 1)])
    images, stats = bin_events(np.zeros((1, 0)), np.array([0, 0, 0]), layout)
    assert images.shape == (2, 3)
    assert not images.any()
    assert stats.hits == 0
    images, _ = bin_events(np.zeros((1, 0)), np.array([0]), layout)
    assert images.shape == (0, 3)


def test_integer_images_saturate_and_count_clipped_hits():
    axis = BinAxis.uniform("x", 2, 0.0, 1.0)
    x = np.full(300, 0.25)
    images, stats = bin_events(x[None], np.array([0, 300]), histogram_layout([axis]), dtype="uint8")
    assert images[0].tolist() == [255, 0]
    assert stats.clipped == 300 - 255


def test_adding_stats_adds_each_field_to_the_same_field():
    stats = binning.BinStats(("x", "y"), 1, np.array([2, 3]), np.array([5, 7]), 11, 13, 17)
    stats += binning.BinStats(("x", "y"), 100, np.array([200, 300]), np.array([500, 700]), 1100, 1300, 1700)
    assert stats.to_dict() == {"hits": 101, "in_image": 1717, "nan": 1111, "clipped": 1313,
                               "underflow": {"x": 202, "y": 303}, "overflow": {"x": 505, "y": 707}}


def test_stats_of_two_calls_add_up_to_the_stats_of_one_call_on_both():
    """What a build reports: the sum of its steps' statistics."""
    layout = histogram_layout([BinAxis.uniform("x", 2, 0.0, 1.0), BinAxis.uniform("y", 2, 0.0, 1.0)])
    a = np.array([[0.25] * 300 + [-1.0, -2.0, 5.0, np.nan], [0.25] * 300 + [0.5] * 4])  # x out, clipped, NaN
    b = np.array([[0.75, 0.75, 0.5, 0.5], [2.0, -1.0, 3.0, 0.5]])  # y out
    _, first = bin_events(a, np.array([0, 304]), layout, dtype="uint8")
    _, second = bin_events(b, np.array([0, 4]), layout, dtype="uint8")
    _, both = bin_events(np.concatenate([a, b], axis=1), np.array([0, 304, 308]), layout, dtype="uint8")
    first += second
    assert first.to_dict() == both.to_dict() == {
        "hits": 308, "in_image": 301, "nan": 1, "clipped": 45,
        "underflow": {"x": 2, "y": 1}, "overflow": {"x": 1, "y": 2},
    }


def test_xyz_projections_equal_histogramdd_sums():
    rng = np.random.default_rng(5)
    coords, offsets = _events(rng, 30, 3)
    axes = [BinAxis.uniform(n, 6, -1.0, 1.0) for n in "xyz"]
    layout = xyz_layout(axes)
    images, _ = bin_events(coords, offsets, layout, dtype="uint16")
    full = _reference(coords, offsets, axes)
    assert images.shape == (30, 6, 6, 3)
    assert layout.channel_names == ("xy", "xz", "yz")
    np.testing.assert_array_equal(images[..., 0], full.sum(axis=3))
    np.testing.assert_array_equal(images[..., 1], full.sum(axis=2))
    np.testing.assert_array_equal(images[..., 2], full.sum(axis=1))


def test_z_split_log_slices_equal_histogramdd():
    rng = np.random.default_rng(6)
    coords, offsets = _events(rng, 30, 3)
    coords[2] = np.abs(coords[2]) + 0.01
    axes = [
        BinAxis.uniform("x", 8, -1, 1), BinAxis.uniform("y", 8, -1, 1), BinAxis.log("z", 4, 0.01, 1.5),
    ]
    images, _ = bin_events(coords, offsets, histogram_layout(axes), dtype="uint16")
    np.testing.assert_array_equal(images, _reference(coords, offsets, axes))


def test_downsampled_axis_equals_block_sum():
    rng = np.random.default_rng(7)
    coords, offsets = _events(rng, 25, 3)
    axes = [BinAxis.uniform(n, 8, -1.0, 1.0) for n in "xyz"]
    fine, _ = bin_events(coords, offsets, histogram_layout(axes), dtype="uint32")
    coarse_axes = [a.downsampled(f) for a, f in zip(axes, (4, 2, 1))]
    coarse, _ = bin_events(coords, offsets, histogram_layout(coarse_axes), dtype="uint32")
    np.testing.assert_array_equal(coarse, downsample(fine, (4, 2, 1)))
    assert coarse.shape == (25, 2, 4, 8)


def test_downsampling_saturated_images_saturates_as_binning_does():
    axis = BinAxis.uniform("x", 4, 0.0, 4.0)
    values = np.repeat([0.5, 1.5, 2.5], [200, 200, 10])
    coords, offsets = values[None], np.array([0, values.size])
    fine, _ = bin_events(coords, offsets, histogram_layout([axis]), dtype="uint8")
    coarse, stats = bin_events(coords, offsets, histogram_layout([axis.downsampled(2)]), dtype="uint8")
    assert coarse.tolist() == [[255, 10]] and stats.clipped == 145
    np.testing.assert_array_equal(downsample(fine, (2,)), coarse)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"coords": np.zeros((2, 3))}, "n_axes=1"),
        ({"offsets": np.array([0, 2])}, "offsets"),
        ({"weights": np.ones(2)}, "one value per hit"),
        ({"weights": np.ones(3), "dtype": "uint8"}, "float dtype"),
    ],
)
def test_bad_arguments_are_refused(bad, match):
    args = {"coords": np.zeros((1, 3)), "offsets": np.array([0, 3]), "weights": None, "dtype": "uint16"}
    args.update(bad)
    layout = histogram_layout([BinAxis.uniform("x", 2, 0, 1)])
    with pytest.raises(ValueError, match=match):
        bin_events(args["coords"], args["offsets"], layout, weights=args["weights"], dtype=args["dtype"])


def test_kernels_run_without_jit():
    """The kernels are plain Python too: the same results with NUMBA_DISABLE_JIT=1."""
    code = (
        "import numpy as np\n"
        "from hepdask.binning import BinAxis, bin_events, histogram_layout\n"
        "rng = np.random.default_rng(0)\n"
        "c = rng.uniform(-1.2, 1.2, (2, 200)); off = np.array([0, 50, 50, 200])\n"
        "axes = [BinAxis.uniform('x', 5, -1, 1), BinAxis.log('y', 3, 0.1, 1)]\n"
        "img, st = bin_events(c, off, histogram_layout(axes), dtype='uint8')\n"
        "for e in range(3):\n"
        "    h, _ = np.histogramdd(c[:, off[e]:off[e + 1]].T, bins=[a.edges for a in axes])\n"
        "    assert (h == img[e]).all()\n"
        "print('ok', st.in_image)\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8", "uint16"])
def test_nonzero_elements_are_every_nonzero_bit_pattern_in_order(dtype):
    rng = np.random.default_rng(5)
    images = (rng.random((7, 4, 5)) < 0.2) * rng.integers(1, 9, (7, 4, 5))
    images = images.astype(dtype)
    images[2] = 0
    images[3] = 1
    if dtype.startswith("float"):
        images[4, 0, 0], images[4, 1, 1], images[5, 3, 4] = -0.0, np.nan, -np.inf
    counts, positions, values = nonzero_elements(images)
    flat = images.reshape(7, -1)
    nonzero = flat.view(f"u{flat.dtype.itemsize}") != 0
    np.testing.assert_array_equal(counts, nonzero.sum(axis=1))
    np.testing.assert_array_equal(positions, np.nonzero(nonzero)[1])
    assert values.tobytes() == flat[nonzero].tobytes()
    assert counts.dtype == positions.dtype == np.int32 and values.dtype == images.dtype
    dense = np.zeros_like(flat)
    dense[np.repeat(np.arange(7), counts), positions] = values
    assert dense.tobytes() == flat.tobytes()


def test_nonzero_elements_of_no_events():
    counts, positions, values = nonzero_elements(np.zeros((0, 3, 3), np.float32))
    assert counts.shape == positions.shape == values.shape == (0,)



@pytest.mark.skipif(numba.get_num_threads() < 2, reason="one numba thread: the serial kernel only")
def test_the_parallel_kernel_gives_the_serial_kernels_images(monkeypatch):
    """Small calls are binned on one thread, large ones among numba's threads: same images,
    same statistics, each from its own compilation (the cache keeps them apart)."""
    rng = np.random.default_rng(5)
    coords, offsets = _events(rng, 200, 2, spread=1.1)
    axes = [AXIS_KINDS["uniform"]("a0"), AXIS_KINDS["log"]("a1")]
    serial, serial_stats = bin_events(coords, offsets, histogram_layout(axes), dtype="uint32")
    monkeypatch.setattr(binning, "PARALLEL_MIN_HITS", 1)
    parallel, parallel_stats = bin_events(coords, offsets, histogram_layout(axes), dtype="uint32")
    np.testing.assert_array_equal(parallel, serial)
    np.testing.assert_array_equal(serial, _reference(coords, offsets, axes))
    assert parallel_stats.to_dict() == serial_stats.to_dict()
    assert binning._FILLS[np.int32, False].signatures and binning._FILLS[np.int32, True].signatures


FRESH_KERNEL_PROCESS = """
import importlib.util, sys
import numpy as np
from hepdask import binning
import numba.np.arraymath as arraymath, numba.np.linalg as linalg
axis = binning.BinAxis.uniform("x", 4, 0.0, 4.0)
images, _ = binning.bin_events(np.array([[0.5, 3.5]]), np.array([0, 2]), binning.histogram_layout([axis]))
assert images.tolist() == [[1, 0, 0, 1]], images
# the kernels ran without SciPy, and numba's own BLAS answer and check are intact
assert "scipy.linalg" not in sys.modules
assert arraymath._HAVE_BLAS == (importlib.util.find_spec("scipy") is not None)
assert arraymath.ensure_blas is linalg.ensure_blas
print("ok")
"""


def test_kernels_start_without_importing_scipy():
    """hepdask.jit: numba's set-up in a fresh process skips its SciPy import (~0.2 s), the
    kernels run, and numba's BLAS answer and its check for later compilations are unchanged."""
    result = subprocess.run([sys.executable, "-c", FRESH_KERNEL_PROCESS], check=False, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
