"""The LDMX image formats (``xyz``, ``z_split``) and per-axis ``downsample``, event by event.

Every stored event's image is recomputed here with plain numpy from its source hits (found
through the stored ``source_file`` and ``entry``), following the documented layout rather than
the binning code: ``xyz`` stacks the x-y, x-z and y-z projections as channels (rows the first
axis of the pair, columns the second), ``z_split`` holds the x-y image of the hits in each z
slice as its last axis, and a downsampled axis equals the full-resolution histogram with every
``downsample`` neighbouring bins summed. A hit outside the range of any axis is in no channel
(each projection is the 3-D ``histogramdd`` summed over the axis it leaves out).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import uproot
import yaml
import zarr

import hepdask
from hepdask import plots
from hepdask.config import from_dict

from .data_generation import demo_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAIRS = {"xy": (0, 1), "xz": (0, 2), "yz": (1, 2)}


# --------------------------------------------------------------------------------------------
# the expected images, from the hits alone


@functools.cache
def source_hits(path: str) -> dict[str, np.ndarray]:
    return uproot.open(path)["ecalHits"].arrays(["x", "y", "z", "E", "eventNumber"], library="np")


def full_edges(axis: dict) -> np.ndarray:
    """The axis' edges before downsampling, as the config describes them."""
    if axis.get("edges") is not None:
        return np.asarray(axis["edges"], np.float64)
    lo, hi = axis["range"]
    space = np.geomspace if axis.get("scale") == "log" else np.linspace
    return space(lo, hi, axis["bins"] + 1)


def block_sum(h: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Sum every ``factors[a]`` neighbouring bins along each axis ``a`` of *h*."""
    shape = []
    for n, f in zip(h.shape, factors):
        assert n % f == 0
        shape += [n // f, f]
    return h.reshape(shape).sum(axis=tuple(range(1, 2 * h.ndim, 2)))


def in_range(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Inside ``[first edge, last edge]``: the last edge itself belongs to the last bin."""
    return (values >= edges[0]) & (values <= edges[-1])


def hist2d(a, b, edges_a, edges_b, weights):
    h, _, _ = np.histogram2d(a, b, bins=[edges_a, edges_b], weights=weights)
    return h


def expected_image(image: dict, hits: dict[str, np.ndarray], keep: np.ndarray) -> np.ndarray:
    """One event's image (float64) from its hits ``hits[field][keep]``."""
    axes = image["axes"]
    fmt = image.get("format", "histogram")
    coords = [np.asarray(hits[a["field"]][keep], np.float64) for a in axes]
    weights = None if image.get("weight") is None else np.asarray(hits[image["weight"]][keep], np.float64)
    edges = [full_edges(a) for a in axes]
    factors = tuple(a.get("downsample", 1) for a in axes)
    if fmt == "histogram":
        h, _ = np.histogramdd(np.stack(coords, axis=1), bins=edges, weights=weights)
        return block_sum(h, factors)
    inside = np.logical_and.reduce([in_range(c, e) for c, e in zip(coords, edges)])
    x, y, z = (c[inside] for c in coords)
    w = None if weights is None else weights[inside]
    if fmt == "xyz":
        channels = []
        for i, j in PAIRS.values():
            h = hist2d((x, y, z)[i], (x, y, z)[j], edges[i], edges[j], w)
            channels.append(block_sum(h, (factors[i], factors[j])))
        return np.stack(channels, axis=-1)  # channels last: (u, v, projection)
    assert fmt == "z_split"
    ez = edges[2]
    slices = []
    for k in range(ez.size - 1):
        last = k == ez.size - 2
        sel = (z >= ez[k]) & ((z < ez[k + 1]) | (last & (z == ez[k + 1])))
        slices.append(hist2d(x[sel], y[sel], edges[0], edges[1], None if w is None else w[sel]))
    return block_sum(np.stack(slices, axis=-1), factors)  # (x, y, z slice)


def selected(raw: dict, hits: dict[str, np.ndarray], entry: int) -> tuple[bool, np.ndarray]:
    """Whether the event passes the config's selection, and its kept hits.

    Only the cuts these tests use: ``E > value`` on hits and ``nhits >= value`` on events.
    """
    selection = raw.get("selection") or {}
    energy = hits["E"][entry]
    keep = np.ones(energy.size, bool)
    if selection.get("hits"):
        field, op, value = selection["hits"].split()
        assert (field, op) == ("E", ">")
        keep = energy > float(value)
    passes = True
    if selection.get("events"):
        field, op, value = selection["events"].split()
        assert (field, op) == ("nhits", ">=")
        passes = int(keep.sum()) >= int(value)
    return passes, keep


# --------------------------------------------------------------------------------------------
# building and checking a store


def build_and_check(raw: dict, client, *, exact: bool):
    """Build *raw*; compare every stored image with :func:`expected_image` of its hits
    (bit for bit when *exact*, else within about one float32 ulp), check that exactly the
    selected events are stored, and the axes' coordinates.

    Returns the first split (an ``xarray.Dataset``) and every stored image.
    """
    out = Path(raw["output"]["path"])
    report = hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    image = raw["image"]
    splits = list(zarr.open_group(str(out), mode="r").attrs["hepdask:splits"])
    stored_keys = []
    first = None
    images = []
    for split in splits:
        ds = hepdask.open_dataset(out, split).load()
        first = first if first is not None else ds
        assert str(ds.image.dtype) == (image.get("dtype") or ("float32" if image.get("weight") else "uint16"))
        for i in range(ds.sizes["event"]):
            path, entry = str(ds.source_file.values[i]), int(ds.entry.values[i])
            hits = source_hits(path)
            passes, keep = selected(raw, hits, entry)
            assert passes, f"{path}:{entry} is stored but fails the event selection"
            assert int(ds.eventNumber.values[i]) == int(hits["eventNumber"][entry])
            expected = expected_image(image, {k: hits[k][entry] for k in ("x", "y", "z", "E")}, keep)
            got = ds.image.values[i]
            assert got.shape == expected.shape, f"{path}:{entry}"
            if exact:
                np.testing.assert_array_equal(got, expected.astype(got.dtype), err_msg=f"{path}:{entry}")
            else:
                np.testing.assert_allclose(got, expected.astype(np.float32), rtol=2e-7, atol=0,
                                           err_msg=f"{path}:{entry}")
            images.append(got)
            stored_keys.append((path, entry))
    # Every selected event of every input file is stored, once.
    wanted = []
    for sample in raw["samples"]:
        files = sample["files"] if isinstance(sample["files"], list) else [sample["files"]]
        for pattern in files:
            for path in sorted(Path(pattern).parent.glob(Path(pattern).name)):
                hits = source_hits(str(path))
                wanted += [(str(path), e) for e in range(hits["E"].size) if selected(raw, hits, e)[0]]
    assert sorted(stored_keys) == sorted(wanted)
    assert report.events_written == len(wanted)
    assert len(images) == len(wanted)
    check_coordinates(first, image)
    return first, images


def check_coordinates(ds, image: dict) -> None:
    """Each axis is described with its stored (downsampled) edges, its scale and, for the
    ``histogram`` and ``z_split`` formats, a coordinate of bin centres."""
    fmt = image.get("format", "histogram")
    if fmt == "xyz":
        assert ds.image.dims == ("event", "u", "v", "projection")
        assert ds.projection.values.tolist() == list(PAIRS)
        described = ds.projection.attrs["axes"]
    else:
        assert ds.image.dims == ("event", *(a["field"] for a in image["axes"]))
        described = {a["field"]: ds[a["field"]].attrs for a in image["axes"]}
    for axis in image["axes"]:
        edges = full_edges(axis)[:: axis.get("downsample", 1)]
        attrs = described[axis["field"]]
        np.testing.assert_allclose(attrs["edges"], edges, rtol=1e-12)
        assert attrs["scale"] == axis.get("scale", "linear")
        if fmt != "xyz":
            log = axis.get("scale") == "log"
            centres = np.sqrt(edges[:-1] * edges[1:]) if log else (edges[:-1] + edges[1:]) / 2
            np.testing.assert_allclose(ds[axis["field"]].values, centres, rtol=1e-12)


def shipped_image(name: str) -> dict:
    """The ``image`` section of a shipped config."""
    return yaml.safe_load((CONFIGS / name).read_text())["image"]


def nonempty(images: list[np.ndarray], index=...) -> int:
    """How many images have a non-zero element (in *index*): the test must see real data."""
    return sum(bool(np.any(img[index])) for img in images)


# --------------------------------------------------------------------------------------------
# xyz


XYZ_COUNTS = {
    # x and y over different ranges, z cutting the deep layers: a hit outside one axis is in no
    # projection, and x/y or row/column swaps change the image.
    "plain": [
        {"field": "x", "bins": 8, "range": [-80, 80]},
        {"field": "y", "bins": 8, "range": [-40, 60]},
        {"field": "z", "bins": 8, "range": [235, 420]},
    ],
    # Different downsample factors per axis, all ending at 8 bins.
    "downsampled": [
        {"field": "x", "bins": 16, "range": [-80, 80], "downsample": 2},
        {"field": "y", "bins": 8, "range": [-40, 60]},
        {"field": "z", "bins": 32, "range": [235, 420], "downsample": 4},
    ],
}


@pytest.mark.parametrize("variant", sorted(XYZ_COUNTS))
def test_xyz_count_images_are_the_three_projections(ldmx_data, client, tmp_path, variant):
    data, _ = ldmx_data
    axes = XYZ_COUNTS[variant]
    image = {"format": "xyz", "axes": axes, "weight": None, "dtype": "uint16"}
    raw = demo_config(data, tmp_path / "xyz.zarr", image=image)
    ds, images = build_and_check(raw, client, exact=True)
    assert ds.image.shape[1:] == (8, 8, 3)
    for channel in range(3):
        assert nonempty(images, (..., channel)) > len(images) // 2
    # Every channel holds the same hits (those inside all three ranges).
    totals = np.array([img.sum(axis=(0, 1)) for img in images])
    assert (totals[:, 0] == totals[:, 1]).all() and (totals[:, 1] == totals[:, 2]).all()
    if variant == "plain":
        _check_show_rows(ds, axes)


def _check_show_rows(ds, axes):
    """`hepdask show` draws each projection as a row of its own, with its axes' edges, never
    their sum."""
    picks = [0, 3, 5]
    rows = plots.store_rows(ds, "image", ["u", "v"], picks)
    assert [row.view for row in rows] == [{"projection": p} for p in ("xy", "xz", "yz")]
    by_field = {a["field"]: a for a in axes}
    for channel, row in enumerate(rows):
        np.testing.assert_array_equal(row.images, ds.image.values[picks][..., channel])
        first, second = (by_field[a] for a in row.view["projection"])
        assert row.extent == [*second["range"], *first["range"]]
        assert row.dims == [first["field"], second["field"]]
    # u or v left out is summed over, within each projection.
    rows = plots.store_rows(ds, "image", ["u", "projection"], picks)
    assert [row.view for row in rows] == [{}]
    np.testing.assert_array_equal(rows[0].images, ds.image.values[picks].sum(axis=2))


def test_xyz_weighted_float32_as_the_shipped_config(ldmx_data, client, tmp_path):
    """configs/ldmx-ecal.yaml's image (32^3, weight E, float32), no selection: every event."""
    data, _ = ldmx_data
    image = shipped_image("ldmx-ecal.yaml")
    assert image["format"] == "xyz" and image["weight"] == "E" and image["dtype"] == "float32"
    raw = demo_config(data, tmp_path / "xyz-e.zarr", image=image, selection={})
    ds, images = build_and_check(raw, client, exact=False)
    assert ds.image.shape[1:] == (32, 32, 3)
    assert len(images) == 320
    assert nonempty(images) == 320


# --------------------------------------------------------------------------------------------
# z_split


Z_SPLIT_COUNTS = {
    # x and y with different bins (a transposed image has another shape) and ranges.
    "uniform": [
        {"field": "x", "bins": 10, "range": [-50, 50]},
        {"field": "y", "bins": 6, "range": [-30, 60]},
        {"field": "z", "bins": 4, "range": [240, 600]},
    ],
    # Log-spaced slices: hits at z = 240 and z = 600 sit on the first and last edge.
    "log": [
        {"field": "x", "bins": 10, "range": [-50, 50]},
        {"field": "y", "bins": 6, "range": [-30, 60]},
        {"field": "z", "bins": 5, "range": [240, 600], "scale": "log"},
    ],
    # Every axis downsampled by its own factor, z slices included.
    "downsampled": [
        {"field": "x", "bins": 20, "range": [-50, 50], "downsample": 2},
        {"field": "y", "bins": 18, "range": [-30, 60], "downsample": 3},
        {"field": "z", "bins": 8, "range": [240, 600], "scale": "log", "downsample": 2},
    ],
}


@pytest.mark.parametrize("variant", sorted(Z_SPLIT_COUNTS))
def test_z_split_count_images_are_x_y_histograms_of_each_slice(ldmx_data, client, tmp_path, variant):
    data, _ = ldmx_data
    axes = Z_SPLIT_COUNTS[variant]
    image = {"format": "z_split", "axes": axes, "weight": None, "dtype": "uint16"}
    raw = demo_config(data, tmp_path / "zsplit.zarr", image=image)
    ds, images = build_and_check(raw, client, exact=True)
    shape = tuple(a["bins"] // a.get("downsample", 1) for a in axes)
    assert ds.image.dims == ("event", "x", "y", "z")
    assert ds.image.shape[1:] == shape
    # Every slice holds hits of some event.
    for k in range(shape[2]):
        assert nonempty(images, (..., k)) > 0


def test_z_split_weighted_downsampled_as_the_shipped_config(ldmx_data, client, tmp_path):
    """configs/ldmx-ecal-zsplit.yaml's image: 64 x-y bins of 5 mm (every hit on an edge)
    downsampled by 2, 5 log-spaced z slices, weight E, float32; no selection."""
    data, _ = ldmx_data
    image = shipped_image("ldmx-ecal-zsplit.yaml")
    assert image["format"] == "z_split" and image["weight"] == "E" and image["dtype"] == "float32"
    assert [a.get("downsample", 1) for a in image["axes"]] == [2, 2, 1]
    raw = demo_config(data, tmp_path / "zsplit-e.zarr", image=image, selection={})
    ds, images = build_and_check(raw, client, exact=False)
    assert ds.image.dims == ("event", "x", "y", "z")
    assert ds.image.shape[1:] == (32, 32, 5)
    assert ds.z.attrs["scale"] == "log"
    assert len(images) == 320
    for k in range(5):
        assert nonempty(images, (..., k)) > 0


# --------------------------------------------------------------------------------------------
# downsample on a plain histogram


@pytest.mark.parametrize(("weight", "dtype"), [(None, "uint16"), ("E", "float32")])
def test_histogram_downsample_sums_blocks_of_the_full_resolution_histogram(ldmx_data, client, tmp_path,
                                                                          weight, dtype):
    data, _ = ldmx_data
    axes = [
        {"field": "z", "bins": 34, "range": [235, 605], "downsample": 2},
        {"field": "x", "bins": 32, "range": [-80, 80], "downsample": 4},
    ]
    image = {"axes": axes, "weight": weight, "dtype": dtype}
    raw = demo_config(data, tmp_path / "ds.zarr", image=image)
    ds, images = build_and_check(raw, client, exact=weight is None)
    assert ds.image.dims == ("event", "z", "x")
    assert ds.image.shape[1:] == (17, 8)
    np.testing.assert_allclose(ds.x.attrs["edges"], np.linspace(-80, 80, 9), rtol=1e-12)
    np.testing.assert_allclose(ds.z.values, np.linspace(235, 605, 18)[:-1] + 370 / 34, rtol=1e-12)
    assert nonempty(images) == len(images)


def test_an_event_cut_on_nhits_counts_the_hits_the_hit_cut_kept(ldmx_data, client, tmp_path):
    """``nhits`` in the event cut counts the hits that passed the hit cut: with a threshold
    at the median of that count, about half the events go, among them events that had
    enough hits before the hit cut; exactly the selected events are stored."""
    data, files = ldmx_data
    energy = np.concatenate([source_hits(p)["E"] for sample in files.values() for p in sample])
    kept = np.array([int((e > 0.3).sum()) for e in energy])
    before = np.array([e.size for e in energy])
    threshold = int(np.median(kept))
    assert np.any((before >= threshold) & (kept < threshold)), "the hit cut must matter to the event cut"
    selection = {"hits": "E > 0.3", "events": f"nhits >= {threshold}"}
    raw = demo_config(data, tmp_path / "cut.zarr", selection=selection, image={
        "axes": [{"field": "z", "bins": 10, "range": [235, 605]}, {"field": "x", "bins": 8, "range": [-80, 80]}],
        "weight": None, "dtype": "uint16"})
    _, images = build_and_check(raw, client, exact=True)
    assert 0.2 * kept.size < len(images) < 0.8 * kept.size
    assert len(images) == int((kept >= threshold).sum())

