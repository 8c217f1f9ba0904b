"""KM3NeT: detx geometry of every version, the calibration join, time handling, MC truth,
labels, and builds of configs/km3net-mu-vs-nu.yaml, on the real files of km3net-testdata."""

from __future__ import annotations

import shutil
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml

import hepdask
from hepdask import geometry, store, truth
from hepdask.cli import main as cli
from hepdask.config import load
from hepdask.errors import ConfigError, GeometryError

kd = pytest.importorskip("km3net_testdata")
REPO = Path(__file__).resolve().parents[1]
ZT_CONFIG = REPO / "configs" / "km3net-mu-vs-nu.yaml"
NU_FILE = "offline/mcv6.0.gsg_muon_highE-CC_50-500GeV.km3sim.jterbr00008357.jorcarec.aanet.905.root"
DATA_FILE = "offline/km3net_offline.root"


def detx(name: str) -> str:
    return str(kd.data_path(f"detx/{name}"))


# ------------------------------------------------------------------------------------------
# detx files


@pytest.mark.parametrize("name", ["detx_v1.detx", "detx_v2.detx", "detx_v3.detx", "detx_v3_whitespace.detx"])
def test_small_detx_files_of_versions_1_to_3(name):
    det = geometry.read_detx(detx(name))
    assert det.version == int(name[6]) and det.det_id == (1 if name == "detx_v1.detx" else 23)
    assert det.keys == ("dom_id", "channel_id") and det.n_rows == 18
    c = det.columns
    # lines ' 1 1.1 1.2 1.3 -1.1 0.2 0.3 10.0' and ' 11 21.4 21.5 21.6 20.1 -21.2 20.3 220.1'
    first = [c[k][0] for k in ("dom_id", "channel_id", "pmt_id", "pos_x", "pos_y", "pos_z", "dir_x", "dir_y", "dir_z", "t0", "du", "floor")]
    assert first == [1, 0, 1, 1.1, 1.2, 1.3, -1.1, 0.2, 0.3, 10.0, 1, 1]
    row = int(np.flatnonzero(c["pmt_id"] == 11)[0])
    assert (c["dom_id"][row], c["channel_id"][row], c["du"][row], c["floor"][row]) == (4, 1, 2, 1)
    assert (c["pos_x"][row], c["t0"][row]) == (21.4, 220.1)
    if det.version == 3:  # v3 adds a PMT status column
        assert c["status"][:3].tolist() == [0, 0, 1]


@pytest.mark.parametrize(("name", "det_id", "version", "n_doms", "n_pmts"), [
    ("detx_v4.detx", 44, 4, 90, 2790),
    ("detx_v5.detx", 49, 5, 114, 3348),
    ("km3net_offline.detx", 44, 2, 90, 2790),
    ("D_ORCA006_t.A02181836.p.A02181837.r.A02182001.detx", 49, 3, 108, 3348),
    ("KM3NeT_00000133_20221025.detx", 133, 5, 399, 11718),
    ("orca_115strings_av23min20mhorizontal_18OMs_alt9mvertical_v1.detx", -1, 1, 2070, 64170),
])
def test_real_detx_files(name, det_id, version, n_doms, n_pmts):
    det = geometry.read_detx(detx(name))
    assert (det.det_id, det.version, len(det.module_positions), det.n_rows) == (det_id, version, n_doms, n_pmts)
    assert np.isfinite(det.centre()).all()
    assert set(np.unique(det.columns["channel_id"])) <= set(range(31))


def test_detx_v5_values_are_read_from_the_right_columns():
    det = geometry.read_detx(detx("detx_v5.detx"))
    # ' 808987107   11  1  +484.600  +564.650   +26.694 (q0 qx qy qz) +37694.902 0 31'
    # '    10057  +484.761  +564.607   +26.805 +0.803578 -0.215292 +0.554898 +207699.045 0'
    row = int(np.flatnonzero(det.columns["pmt_id"] == 10057)[0])
    c = det.columns
    assert (c["dom_id"][row], c["channel_id"][row], c["du"][row], c["floor"][row]) == (808987107, 0, 11, 1)
    assert (c["pos_x"][row], c["pos_z"][row], c["dir_z"][row], c["t0"][row]) == (484.761, 26.805, 0.554898, 207699.045)
    assert det.module_positions[0].tolist() == [484.6, 564.65, 26.694]


def test_floor_minus_one_is_numbered_within_its_string():
    det = geometry.read_detx(detx("orca_115strings_av23min20mhorizontal_18OMs_alt9mvertical_v1.detx"))
    du1 = det.columns["du"] == 1
    assert sorted(set(det.columns["floor"][du1].astype(int))) == list(range(1, 19))


def test_bad_detector_files_name_file_and_line(tmp_path):
    with pytest.raises(GeometryError, match=r"detx_v5_invalid_multiline_comments\.detx: line \d+"):
        geometry.read_detx(detx("detx_v5_invalid_multiline_comments.detx"))
    text = Path(detx("detx_v2.detx")).read_text()
    truncated = tmp_path / "truncated.detx"
    truncated.write_text("\n".join(text.splitlines()[:14]))
    with pytest.raises(GeometryError, match=r"truncated\.detx: the file ends before PMT \d of DOM 3 \(truncated\?\)"):
        geometry.read_detx(truncated)
    unknown = tmp_path / "v9.detx"
    unknown.write_text(text.replace("23 v2", "23 v9", 1))
    with pytest.raises(GeometryError, match=r"v9\.detx: line 1: detx version 9 is not supported"):
        geometry.read_detx(unknown)
    with pytest.raises(GeometryError, match="does not exist"):
        geometry.load(tmp_path / "missing.detx")
    (tmp_path / "x.txt").write_text("1 2")
    with pytest.raises(GeometryError, match=r"unknown detector file type '\.txt'"):
        geometry.load(tmp_path / "x.txt")


def test_csv_table_gives_the_same_join_as_the_detx(tmp_path):
    det = geometry.read_detx(detx("km3net_offline.detx"))
    names = ["dom_id", "channel_id", *det.fields]
    table = np.stack([det.columns[n] for n in names], axis=1)
    path = tmp_path / "orca4.csv"
    path.write_text("# exported from km3net_offline.detx\n" + ",".join(names) + "\n"
                    + "\n".join(",".join(repr(float(v)) for v in row) for row in table))
    from_csv = geometry.load(path, ("dom_id", "channel_id"))
    keys = [det.columns["dom_id"][::7], det.columns["channel_id"][::7]]
    a, _ = geometry.join(det, keys)
    b, _ = geometry.join(from_csv, keys)
    for name in det.fields:
        np.testing.assert_array_equal(a[name], b[name])
    bad = tmp_path / "bad.csv"
    bad.write_text("wire,x\n1,0.5\n2,abc\n")
    with pytest.raises(GeometryError, match=r"bad\.csv: row 3, column 'x': 'abc' is not a number"):
        geometry.read_csv(bad, ("wire",))
    with pytest.raises(GeometryError, match=r"key column 'wires' not in the header; did you mean 'wire'"):
        geometry.read_csv(bad, ("wires",))


# ------------------------------------------------------------------------------------------
# kernels


def _hits(name: str):
    tree = uproot.open(kd.data_path(name))["E"]
    arrays = tree.arrays(["Evt/hits/hits.dom_id", "Evt/hits/hits.channel_id", "Evt/hits/hits.t",
                          "Evt/hits/hits.tot", "Evt/hits/hits.trig"], library="ak", how=dict)
    flat = {k.split(".")[-1]: ak.to_numpy(ak.flatten(v)) for k, v in arrays.items()}
    counts = ak.to_numpy(ak.num(arrays["Evt/hits/hits.t"]))
    return flat, np.concatenate([[0], np.cumsum(counts)])


def _reference_join(det: geometry.Detector, dom_id, channel_id, t, tot):
    """A plain-Python join: what the numba kernel must reproduce."""
    rows = {(int(d), int(c)): i for i, (d, c) in enumerate(zip(det.columns["dom_id"], det.columns["channel_id"]))}
    index = np.array([rows[(int(d), int(c))] for d, c in zip(dom_id, channel_id)])
    values = {k: det.columns[k][index] for k in det.fields}
    values["time"] = (t + values["t0"]) - geometry.SLEWING_NS[tot.astype(int)]
    return values


def test_join_and_calibrated_time_equal_a_plain_lookup():
    det = geometry.read_detx(detx("detx_v5.detx"))
    hits, _ = _hits(NU_FILE)
    joined, rows = geometry.join(det, [hits["dom_id"], hits["channel_id"]])
    assert (rows >= 0).all()
    time = geometry.calibrated_time(hits["t"], joined["t0"], hits["tot"])
    expected = _reference_join(det, hits["dom_id"], hits["channel_id"], hits["t"], hits["tot"])
    for name in det.fields:
        np.testing.assert_array_equal(joined[name], expected[name])
    np.testing.assert_array_equal(time, expected["time"])
    np.testing.assert_array_equal(geometry.calibrated_time(hits["t"], joined["t0"]), hits["t"] + joined["t0"])


def test_unknown_channels_are_marked():
    det = geometry.read_detx(detx("km3net_offline.detx"))
    joined, rows = geometry.join(det, [np.array([806451572, 123, 806451572]), np.array([8, 0, 31])])
    assert rows.tolist()[1:] == [-1, -1] and rows[0] >= 0
    assert np.isnan(joined["pos_x"][1:]).all()


def test_channel_beyond_the_table_does_not_alias_the_next_dom():
    # detx_v1: DOMs 1..6 with channels 0..2; (dom 1, channel 3) must not be read as (dom 2, channel 0)
    det = geometry.read_detx(detx("detx_v1.detx"))
    joined, rows = geometry.join(det, [np.array([1, 1, 2, 2]), np.array([3, -1, 0, 2])])
    assert rows.tolist()[:2] == [-1, -1] and (rows[2:] >= 0).all()
    assert np.isnan(joined["pos_x"][:2]).all() and joined["pmt_id"][2:].tolist() == [4.0, 6.0]


def test_first_triggered_time():
    offsets = np.array([0, 3, 3, 5])
    time = np.array([5.0, 2.0, 1.0, 7.0, 9.0])
    trig = np.array([1, 1, 0, 0, 0], np.uint32)
    ref = geometry.first_triggered_time(offsets, time, trig)
    assert ref[0] == 2.0 and np.isnan(ref[1]) and np.isnan(ref[2])


def test_centring_moves_the_mean_dom_position():
    det = geometry.load(detx("detx_v5.detx"), centre=(0.0, 0.0, None))
    original = geometry.read_detx(detx("detx_v5.detx"))
    np.testing.assert_allclose(det.centre()[:2], 0, atol=1e-9)
    assert det.centre()[2] == original.centre()[2]
    np.testing.assert_allclose(det.columns["pos_x"] - original.columns["pos_x"], -original.centre()[0])


def test_zenith_and_azimuth_follow_km3pipe():
    zen, azi = truth.zenith_azimuth(np.array([0.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]),
                                    np.array([-1.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(zen, [0, np.pi, np.pi / 2, np.pi / 2])  # down-going: zenith 0
    np.testing.assert_allclose(azi[2:], [np.pi, 3 * np.pi / 2])  # comes from -x, from -y


def test_label_map_refuses_unmapped_values():
    assert truth.map_labels(np.array([14.0, -14.0, 12.0]), {14: 1, -14: 1}, 0, where="f").tolist() == [1, 1, 0]
    with pytest.raises(ConfigError, match=r"f: 1 events have label values \[12.0\]"):
        truth.map_labels(np.array([14.0, 12.0]), {14: 1}, None, where="f")


# ------------------------------------------------------------------------------------------
# builds of the real configs


def _config(path: Path, out: Path, *overrides: str):
    return load(path, [f"output.path={out}", *overrides])


@pytest.fixture(scope="module")
def zt_store(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("km3") / "zt.zarr"
    config = _config(ZT_CONFIG, out, "output.shuffle.enabled=false")
    report = hepdask.build_dataset(config, client=client, progress=False)
    return config, report, out


def _expected_images(image, sample_file: str, detector_file: str, du: int | None, centre=None):
    """Images made the OrcaSong way: plain-Python calibration, time centring on the first
    triggered hit, then numpy.histogramdd per event."""
    det = geometry.read_detx(detector_file)
    hits, offsets = _hits(sample_file)
    cal = _reference_join(det, hits["dom_id"], hits["channel_id"], hits["t"], hits["tot"])
    if centre is not None:
        for i, axis in enumerate("xyz"):
            if centre[i] is not None:
                cal[f"pos_{axis}"] = cal[f"pos_{axis}"] + (centre[i] - det.centre()[i])
    edges = [np.linspace(*a.range, a.bins + 1) for a in image.axes]
    images = []
    for e in range(offsets.size - 1):
        sl = slice(offsets[e], offsets[e + 1])
        time = cal["time"][sl]
        time = time - time[hits["trig"][sl] != 0].min()
        keep = np.ones(time.size, bool) if du is None else cal["du"][sl] == du
        values = {**{k: v[sl] for k, v in cal.items()}, "time": time}
        sample = [values[a.field][keep] for a in image.axes]
        images.append(np.histogramdd(sample, bins=edges)[0])
    return np.array(images)


def test_zt_images_equal_orcasong_style_histograms(zt_store):
    config, report, out = zt_store
    ds = {s: hepdask.open_dataset(out, s) for s in ("train", "val", "test")}
    checked = 0
    for sample in config.samples:
        for file in sample.files:
            expected = _expected_images(config.image, file, sample.geometry, du=2)
            assert 0 < expected.max() < 255  # hits on the string, no saturation: uint8 equals histogramdd
            for split in ds.values():
                mine = (split.source_file.values == file)
                for image, entry, label in zip(split.image.values[mine], split.entry.values[mine], split.label.values[mine]):
                    np.testing.assert_array_equal(image, expected[entry])
                    assert label == sample.label
                    checked += 1
    assert checked == report.events_written == 180


def test_truth_fields_are_stored(zt_store):
    _, _, out = zt_store
    events = {}
    keys = ("mc_energy", "mc_pdgid", "mc_zenith", "mc_dir_z", "mc_bjorken_y", "det_id")
    for split in ("train", "val", "test"):
        ds = hepdask.open_dataset(out, split)
        # Each array read once (.values of a lazily opened variable reads it again every time).
        columns = {k: ds[k].values for k in (*keys, "source_file", "entry")}
        for i in range(ds.sizes["event"]):
            events[(str(columns["source_file"][i]), int(columns["entry"][i]))] = {
                k: float(columns[k][i]) for k in keys}
    path = str(kd.data_path(NU_FILE))
    tree = uproot.open(path)["E"]
    energy = tree["Evt/mc_trks/mc_trks.E"].array()[:, 0]
    pdg = tree["Evt/mc_trks/mc_trks.type"].array()[:, 0]
    by = tree["Evt/w2list"].array()[:, 8]
    for entry in (0, 7, 139):
        got = events[(path, entry)]
        assert got["mc_energy"] == energy[entry] and got["mc_pdgid"] == pdg[entry] and got["mc_bjorken_y"] == by[entry]
        assert got["mc_zenith"] == pytest.approx(np.arccos(-got["mc_dir_z"]))
        assert got["det_id"] == 49
    data = events[(str(kd.data_path(DATA_FILE)), 0)]
    assert np.isnan(data["mc_energy"]) and data["det_id"] == 44  # real data: no MC truth


def test_xyzt_images_centre_both_detectors(zt_store):
    config, report, out = zt_store
    assert report.images["image_xyzt"]["hits"]["underflow"]["pos_x"] == 0
    assert report.images["image_xyzt"]["hits"]["overflow"]["pos_y"] == 0
    checked = 0
    for split in ("train", "val", "test"):
        ds = hepdask.open_dataset(out, split)
        assert ds.image_xyzt.dims[1:] == ("xyzt_pos_x", "xyzt_pos_y", "xyzt_pos_z", "xyzt_time")
        for sample in config.samples:
            for file in sample.files:
                expected = _expected_images(config.images["xyzt"], file, sample.geometry, du=None, centre=(0.0, 0.0, None))
                mine = ds.source_file.values == file
                for image, entry in zip(ds.image_xyzt.values[mine], ds.entry.values[mine]):
                    np.testing.assert_array_equal(image, expected[entry])
                    checked += 1
    assert checked == 180


def test_labels_from_a_truth_field(client, tmp_path):
    out = tmp_path / "pdg.zarr"
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"] = raw["samples"][1:]
    raw["labels"] = {"field": "mc_pdgid", "map": {14: 1, -14: 1, 12: 2, -12: 2}, "default": 0}
    raw["output"].update(path=str(out), split={"train": 1.0})
    path = tmp_path / "pdg.yaml"
    path.write_text(yaml.safe_dump(raw))
    hepdask.build_dataset(load(path), client=client, progress=False)
    ds = hepdask.open_dataset(out, "train")
    pdg = np.abs(ds.mc_pdgid.values)
    expected = np.where(pdg == 14, 1, np.where(pdg == 12, 2, 0))
    np.testing.assert_array_equal(ds.label.values, expected)
    assert set(expected) >= {1, 2}
    # The label array lists every class it can hold, the default one too.
    assert ds.label.attrs["flag_values"] == [0, 1, 2] and ds.label.attrs["source_field"] == "mc_pdgid"


def test_unknown_channel_policy(client, tmp_path):
    # The ORCA6 neutrino file read with the ORCA4 detector: a third of its hits are on DOMs
    # ORCA4 does not have. det_id is not checked here, so the channel check is what fires.
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"] = [{"name": "nu", "label": 1, "files": f"km3net-testdata:{NU_FILE}",
                       "geometry": "km3net-testdata:detx/km3net_offline.detx"}]
    raw["geometry"].pop("det_id")
    raw["output"]["path"] = str(tmp_path / "unknown.zarr")
    path = tmp_path / "unknown.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(GeometryError) as caught:
        hepdask.build_dataset(load(path), client=client, progress=False)
    err = str(caught.value)
    assert "mcv6.0.gsg_muon_highE-CC" in err and "a hit's channel (dom_id=" in err and "km3net_offline.detx" in err
    assert not store.is_complete(tmp_path / "unknown.zarr")
    config = load(path, ["geometry.on_unknown=drop", "output.overwrite=true"])
    report = hepdask.build_dataset(config, client=client, progress=False)
    assert report.hit_counts["unknown_channel"] == 5486  # hits on ORCA6-only DOMs


def test_det_id_mismatch_names_file_and_ids(client, tmp_path):
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"][1]["geometry"] = "km3net-testdata:detx/km3net_offline.detx"
    raw["output"]["path"] = str(tmp_path / "mismatch.zarr")
    path = tmp_path / "mismatch.yaml"
    path.write_text(yaml.safe_dump(raw))
    # Both neutrino files mismatch; whichever a worker reads first is reported.
    with pytest.raises(GeometryError, match=r"(aanet\.905|v9\.2\.sample)\.root: entry 0: det_id 49 does not match the detector file .*km3net_offline\.detx \(det_id 44\)"):
        hepdask.build_dataset(load(path), client=client, progress=False)
    assert not store.is_complete(tmp_path / "mismatch.zarr")


def test_bad_detector_file_fails_before_any_task(tmp_path, capsys):
    bad = tmp_path / "bad.detx"
    shutil.copy(detx("km3net_offline.detx"), bad)
    bad.write_text("\n".join(bad.read_text().splitlines()[:40]))
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"][0]["geometry"] = str(bad)
    raw["output"]["path"] = str(tmp_path / "o.zarr")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli(["build-dataset", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "bad.detx: the file ends before" in err


def test_config_checks_geometry_fields(tmp_path):
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["geometry"]["tot"] = "totx"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="hit field 'totx' is not read; did you mean 'tot'"):
        load(path)
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["image"]["axes"][0]["field"] = "pos_zz"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="image axis field 'pos_zz' is not a hit field; did you mean 'pos_z'"):
        load(path)


def test_event_values_pick_one_element_per_event():
    from hepdask.sources import _event_values

    lists = ak.Array([[1, 2, 3], [], [4]])
    np.testing.assert_array_equal(_event_values(lists, 0), [1, np.nan, 4])
    np.testing.assert_array_equal(_event_values(lists, -1), [3, np.nan, 4])
    np.testing.assert_array_equal(_event_values(lists, 1), [2, np.nan, np.nan])


def test_time_centring_triggered_only_and_window():
    from hepdask.build import HIT_COUNTERS, _time
    from hepdask.config import Time

    offsets = np.array([0, 4, 6, 6])
    hits = {"time": np.array([80.0, 90.0, 400.0, 95.0, 5.0, 7.0]), "trig": np.array([0, 1, 1, 1, 0, 0])}
    counts = dict.fromkeys(HIT_COUNTERS, 0)
    spec = Time(field="time", triggered="trig", reference="first_triggered", triggered_only=True, window=(0, 200))
    new_offsets, new_hits = _time(spec, offsets, hits, counts)
    # event 0: reference 90, the earliest triggered hit (not 80, which is untriggered) -> times
    # -10, 0, 310, 5: -10 is dropped as untriggered, 310 is outside [0, 200]. Event 1 has no
    # triggered hit, event 2 no hit at all: neither has a time reference.
    assert new_offsets.tolist() == [0, 2, 2, 2]
    assert new_hits["time"].tolist() == [0.0, 5.0]
    assert counts == {"unknown_channel": 0, "no_trigger_events": 2, "not_triggered": 3, "outside_time_window": 1}
    centred_only = Time(field="time", triggered="trig", reference="first_triggered")
    _, kept = _time(centred_only, offsets, hits, dict.fromkeys(HIT_COUNTERS, 0))
    assert kept["time"][:4].tolist() == [-10.0, 0.0, 310.0, 5.0] and np.isnan(kept["time"][4:]).all()


def test_images_section_is_validated(tmp_path, capsys):
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["images"]["x-y"] = raw["images"].pop("xyzt")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="images: name 'x-y' must be a plain identifier"):
        load(path)
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["images"]["xyzt"]["axes"][0]["field"] = "pos_xx"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"images\.xyzt axis field 'pos_xx' is not a hit field; did you mean 'pos_x'"):
        load(path)
    assert cli(["build-dataset", str(ZT_CONFIG), "--dry-run", "--output", str(tmp_path / "o.zarr")]) == 0
    out = capsys.readouterr().out
    assert "image: shape (18, 100) uint8" in out and "image_xyzt: shape (12, 6, 18, 50) uint8" in out


def test_resume_refuses_a_changed_detector_file(tmp_path):
    from hepdask.build import _prepare_output

    detector = tmp_path / "orca4.detx"
    shutil.copy(detx("km3net_offline.detx"), detector)
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"] = raw["samples"][:1]
    raw["samples"][0]["geometry"] = str(detector)
    raw["output"]["path"] = str(tmp_path / "o.zarr")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load(path)
    assert _prepare_output(config) is False  # a fresh staging area
    writer = store.PartitionWriter(store.staging_path(tmp_path / "o.zarr"), "p0")  # a killed build staged a partition
    writer.append({"entry": np.arange(3)})
    writer.close({})
    assert _prepare_output(config) is True  # same config and detector: resumes
    detector.write_text(detector.read_text().replace("207261.022", "207262.022", 1))
    with pytest.raises(hepdask.errors.StoreError, match=r"other contents of the detector file\(s\) \[.*orca4\.detx"):
        _prepare_output(config)


def test_mc_hits_joined_by_pmt_id(client, tmp_path):
    # The MUPAGE file holds MC hits only (no dom_id/channel_id): they are joined by pmt_id on
    # the ARCA21 detector they were simulated in. MC hit times get no t0 (as in km3pipe).
    mupage = "mupage/mcv8.1.mupage_tuned_100G.sirene.jterbr00013288.10.root"
    raw = {
        "name": "mupage-mc-hits", "tree": "E",
        "samples": [{"name": "mupage", "label": 0, "files": f"km3net-testdata:{mupage}"}],
        "hits": {"pmt_id": "Evt/mc_hits/mc_hits.pmt_id", "t": "Evt/mc_hits/mc_hits.t"},
        "geometry": {"file": "km3net-testdata:detx/KM3NeT_00000133_20221025.detx", "keys": {"pmt_id": "pmt_id"}},
        "image": {"axes": [{"field": "pos_z", "bins": 20, "range": [0, 800]}, {"field": "t", "bins": 50, "range": [0, 5000]}]},
        "output": {"path": str(tmp_path / "mc.zarr"), "split": {"train": 1.0}, "shuffle": False},
    }
    path = tmp_path / "mc.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load(path)
    hepdask.build_dataset(config, client=client, progress=False)
    ds = hepdask.open_dataset(tmp_path / "mc.zarr", "train")
    det = geometry.read_detx(detx("KM3NeT_00000133_20221025.detx"))
    z_of = dict(zip(det.columns["pmt_id"].astype(int), det.columns["pos_z"]))
    tree = uproot.open(kd.data_path(mupage))["E"]
    pmt, t = tree["Evt/mc_hits/mc_hits.pmt_id"].array(), tree["Evt/mc_hits/mc_hits.t"].array()
    edges = [np.linspace(0, 800, 21), np.linspace(0, 5000, 51)]
    assert ds.sizes["event"] == 10
    for image, entry in zip(ds.image.values, ds.entry.values):
        z = np.array([z_of[int(p)] for p in pmt[entry]])
        np.testing.assert_array_equal(image, np.histogramdd([z, ak.to_numpy(t[entry])], bins=edges)[0])
    assert ds.image.values.sum() > 0


def test_info_lists_every_image(zt_store, capsys):
    _, _, out = zt_store
    assert cli(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image_xyzt: 12x6x18x50 uint8 (xyzt_pos_x, xyzt_pos_y, xyzt_pos_z, xyzt_time)" in text
    assert store.store_info(out)["splits"]["train"]["image_shape"] == [18, 100]


def test_show_plots_projections_of_any_image(zt_store, tmp_path, capsys):
    _, _, out = zt_store
    png = tmp_path / "xy.png"
    assert cli(["show", str(out), "--image", "image_xyzt", "--dims", "pos_x,pos_y", "--events", "4", "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 events" in capsys.readouterr().out
    assert cli(["show", str(out), "--image", "image_xyzt", "--dims", "pos_x,pos_w", "--output", str(png)]) == 2
    assert "image_xyzt has no dim 'pos_w'" in capsys.readouterr().err


def test_show_names_the_file_it_wrote_and_refuses_what_it_cannot_write(zt_store, tmp_path, capsys):
    _, _, out = zt_store
    bare = tmp_path / "events"
    assert cli(["show", str(out), "--output", str(bare)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"-> {bare}.png") and (tmp_path / "events.png").is_file()
    assert cli(["show", str(out), "--output", str(tmp_path / "x.txt")]) == 2
    assert "cannot save a plot as" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli(["show", str(out), "--output", str(tmp_path / "a-file" / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hepdask: error: cannot save a plot as") and len(err.splitlines()) == 1


def test_csv_without_t0_is_refused_when_times_are_calibrated(tmp_path, capsys):
    table = tmp_path / "cells.csv"
    det = geometry.read_detx(detx("km3net_offline.detx"))
    rows = zip(det.columns["dom_id"], det.columns["channel_id"], det.columns["pos_z"], det.columns["du"])
    table.write_text("dom_id,channel_id,pos_z,du\n" + "\n".join(f"{a},{b},{c},{d}" for a, b, c, d in rows))
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"] = raw["samples"][:1]
    raw["samples"][0]["geometry"] = str(table)
    raw.pop("images")
    raw["geometry"].pop("det_id")
    raw["output"]["path"] = str(tmp_path / "o.zarr")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli(["build-dataset", str(path), "--dry-run"]) == 2
    assert "cells.csv: cannot centre the detector: it has no 'pos_x' column" in capsys.readouterr().err
    raw["geometry"].pop("centre")
    path.write_text(yaml.safe_dump(raw))
    assert cli(["build-dataset", str(path), "--dry-run"]) == 2
    assert "cells.csv has no 't0' column" in capsys.readouterr().err


def _readme_km3net_block() -> dict:
    """The KM3NeT config of the README's geometry section, as a user would copy it."""
    text = (REPO / "README.md").read_text()
    start = text.index("```yaml\nsamples:                       # each sample may name its own detector file")
    block = text[start + len("```yaml\n") : text.index("```", start + 3)]
    return yaml.safe_load(block)


def test_the_readme_km3net_config_plans(tmp_path, capsys):
    raw = _readme_km3net_block()
    assert raw["geometry"]["keys"] == {"dom_id": "dom_id", "channel_id": "channel_id"}
    # detector.detx stands for the user's file; the sample names its own, a real one.
    raw["geometry"].pop("file")
    raw.update(name="readme", tree="E", output={"path": str(tmp_path / "o.zarr")})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli(["build-dataset", str(path), "--dry-run"]) == 0
    assert "image_xyzt: shape (12, 6, 18, 50)" in capsys.readouterr().out


def _csv_table_config(tmp_path, **image) -> Path:
    """A config joining a CSV table keyed by (dom_id, channel_id) with a column ``height``."""
    table = tmp_path / "cells.csv"
    det = geometry.read_detx(detx("km3net_offline.detx"))
    rows = zip(det.columns["dom_id"], det.columns["channel_id"], det.columns["pos_z"], strict=True)
    table.write_text("dom_id,channel_id,height\n" + "\n".join(f"{a},{b},{c}" for a, b, c in rows))
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"] = raw["samples"][:1]
    raw["samples"][0].pop("geometry", None)
    raw.pop("images")
    raw["geometry"] = {"file": str(table), "keys": {"dom_id": "dom_id", "channel_id": "channel_id"}}
    raw.pop("time")
    raw["image"] = {"axes": [{"field": "height", "bins": 18, "range": [24, 198]}], **image}
    raw["output"]["path"] = str(tmp_path / "o.zarr")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_csv_table_columns_are_hit_fields(tmp_path, capsys):
    path = _csv_table_config(tmp_path, hits="height > 50")
    assert cli(["build-dataset", str(path), "--no-progress"]) == 0
    # The same images from the detx's own column: the CSV column is joined like it.
    detx_path = tmp_path / "detx.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["geometry"]["file"] = detx("km3net_offline.detx")
    raw["image"] = {"axes": [{"field": "pos_z", "bins": 18, "range": [24, 198]}], "hits": "pos_z > 50"}
    raw["output"]["path"] = str(tmp_path / "detx.zarr")
    detx_path.write_text(yaml.safe_dump(raw))
    assert cli(["build-dataset", str(detx_path), "--no-progress"]) == 0
    from_csv = hepdask.open_dataset(tmp_path / "o.zarr", "train")
    from_detx = hepdask.open_dataset(tmp_path / "detx.zarr", "train")
    assert from_csv.image.dims[1:] == ("height",)
    assert int(from_csv.image.values.sum()) > 0
    np.testing.assert_array_equal(from_csv.image.values, from_detx.image.values)
    # A misspelt column fails when the table's header is read, naming the table.
    for override, message in [
        ("image.axes.0.field=heigth", "hit field 'heigth' (named by the image or time section) is neither"),
        ("image.hits=heigth > 50", "image.hits (sample 'atm_muon', detector file"),
    ]:
        assert cli(["build-dataset", str(path), "--dry-run", "--set", override]) == 2
        err = capsys.readouterr().err
        assert message in err and "cells.csv" in err and "did you mean 'height'" in err
