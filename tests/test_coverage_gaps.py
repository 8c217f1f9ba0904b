"""Checks that the other test files leave out: KM3NeT MC truth per event against uproot,
planning that never opens a file, the ``generate:`` example-data path (build and CLI), and
the near-match hint of a missing branch."""

from __future__ import annotations

import builtins
import io
import re
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml

import hepdask
from hepdask import examples, sources, store
from hepdask.cli import main as cli
from hepdask.config import from_dict, load
from hepdask.errors import ConfigError

from .data_generation import demo_config, write_config

REPO = Path(__file__).resolve().parents[1]
ZT_CONFIG = REPO / "configs" / "km3net-mu-vs-nu.yaml"


# ------------------------------------------------------------------------------------------
# 1. KM3NeT MC truth, event by event


@pytest.fixture(scope="module")
def neutrino_store(tmp_path_factory):
    """configs/km3net-mu-vs-nu.yaml restricted to its neutrino sample, one split, unshuffled,
    built in this process."""
    pytest.importorskip("km3net_testdata")
    directory = tmp_path_factory.mktemp("km3-truth")
    raw = yaml.safe_load(ZT_CONFIG.read_text())
    raw["samples"] = [s for s in raw["samples"] if s["name"] == "neutrino"]
    assert len(raw["samples"]) == 1
    raw.pop("images", None)  # the truth does not depend on the images; one is enough
    raw["output"].update(path=str(directory / "nu.zarr"), split={"train": 1.0}, shuffle={"enabled": False})
    raw["cluster"] = {"processes": False}
    path = directory / "nu.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load(path)
    report = hepdask.build_dataset(config, progress=False)
    return config, report, directory / "nu.zarr"


def _source_truth(path: str) -> dict[str, np.ndarray]:
    """Track 0 of every event, read with uproot alone."""
    tree = uproot.open(path)["E"]
    names = {"dir_x": "dir.x", "dir_y": "dir.y", "dir_z": "dir.z",
             "vertex_x": "pos.x", "vertex_y": "pos.y", "vertex_z": "pos.z", "energy": "E", "pdgid": "type"}
    out = {}
    for field, leaf in names.items():
        array = tree[f"Evt/mc_trks/mc_trks.{leaf}"].array(library="ak")
        assert ak.min(ak.num(array, axis=1)) >= 1  # every event of these files has an MC track
        out[field] = ak.to_numpy(array[:, 0]).astype(np.float64)
    return out


def _angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| on the circle."""
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def test_km3net_truth_per_event_equals_track_zero(neutrino_store):
    config, report, out = neutrino_store
    assert config.truth is not None and config.truth.prefix == "mc_"
    ds = hepdask.open_dataset(out, "train")
    files = np.array([str(f) for f in ds.source_file.values])
    entries = ds.entry.values.astype(np.int64)
    sample_files = config.samples[0].files
    assert set(files) == set(sample_files)
    checked = 0
    for path in sample_files:
        source = _source_truth(path)
        n = source["dir_x"].size
        mine = np.flatnonzero(files == path)
        # every entry of the file is stored once (the config selects no events)
        assert sorted(entries[mine].tolist()) == list(range(n))
        entry = entries[mine]
        for field in ("dir_x", "dir_y", "dir_z", "vertex_x", "vertex_y", "vertex_z", "energy", "pdgid"):
            stored = ds[f"mc_{field}"].values[mine]
            np.testing.assert_array_equal(stored, source[field][entry], err_msg=f"{path}: mc_{field}")
        dx, dy, dz = (source[f"dir_{a}"][entry] for a in "xyz")
        assert np.abs(np.sqrt(dx**2 + dy**2 + dz**2) - 1).max() < 1e-6  # unit directions
        assert not np.allclose(dx, 0) and not np.allclose(dy, 0)  # azimuths are not trivially 0
        # The direction the particle comes from is -dir. Zenith: its angle to +z (the downward
        # vertical's opposite: a down-going track, dir_z = -1, comes from zenith 0). Azimuth:
        # the angle of its (x, y) projection, in [0, 2 pi).
        zenith = np.arctan2(np.hypot(dx, dy), -dz)
        azimuth = np.mod(np.arctan2(-dy, -dx), 2 * np.pi)
        stored_zenith = ds.mc_zenith.values[mine]
        stored_azimuth = ds.mc_azimuth.values[mine]
        np.testing.assert_allclose(stored_zenith, zenith, rtol=0, atol=1e-9)
        assert (_angle_difference(stored_azimuth, azimuth) < 1e-9).all()
        assert ((stored_zenith >= 0) & (stored_zenith <= np.pi)).all()
        assert ((stored_azimuth >= 0) & (stored_azimuth < 2 * np.pi)).all()
        checked += mine.size
    assert checked == report.events_written == ds.sizes["event"] == 170


def test_km3net_zenith_of_up_and_down_going_events(neutrino_store):
    """Spot checks with the sign spelt out: an up-going track (dir_z > 0) comes from below."""
    _, _, out = neutrino_store
    ds = hepdask.open_dataset(out, "train")
    dir_z = ds.mc_dir_z.values
    zenith = ds.mc_zenith.values
    up, down = dir_z > 0, dir_z < 0
    assert up.any() and down.any()
    assert (zenith[up] > np.pi / 2).all() and (zenith[down] < np.pi / 2).all()


# ------------------------------------------------------------------------------------------
# 2. planning 10,000 files opens none of them


def _refusing(directory: Path, plain):
    """*plain* (an open function) that refuses the files under *directory*: other threads of
    the test process (Dask's, reading /proc) go on opening their own files."""

    def refuse(file, *args, **kwargs):
        if str(file).startswith(str(directory)):
            msg = f"opened during planning: {file}"
            raise AssertionError(msg)
        return plain(file, *args, **kwargs)

    return refuse


@pytest.mark.parametrize("by", ["glob", "list"])
def test_plan_of_10000_files_opens_none(tmp_path, monkeypatch, by):
    n = 10_000
    directory = tmp_path / "many"
    directory.mkdir()
    names = [directory / f"f{i:05d}.root" for i in range(n)]
    for path in names:
        path.touch()
    patterns = [str(directory / "f*.root")] if by == "glob" else [str(p) for p in reversed(names)]
    with monkeypatch.context() as patch:
        patch.setattr(uproot, "open", _refusing(directory, uproot.open))
        patch.setattr(builtins, "open", _refusing(directory, builtins.open))
        patch.setattr(io, "open", _refusing(directory, io.open))
        patch.setattr(sources, "open_tree", _refusing(directory, sources.open_tree))
        partitions = sources.plan([("many", 3, patterns)])
    assert len(partitions) == n
    assert [p.index for p in partitions] == list(range(n))
    assert {(p.sample, p.label, p.entry_start, p.entry_stop) for p in partitions} == {("many", 3, 0, None)}
    expected = sorted(str(p) for p in names) if by == "glob" else patterns  # a list keeps its order
    assert [p.file for p in partitions] == expected
    assert partitions[-1].key == "p0009999"


def test_plan_of_missing_stub_paths_opens_none(tmp_path, monkeypatch):
    """With must_exist=False (on_bad_file: skip) paths that do not exist are planned too."""
    stubs = [str(tmp_path / f"stub{i:05d}.root") for i in range(10_000)]
    with monkeypatch.context() as patch:
        patch.setattr(uproot, "open", _refusing(tmp_path, uproot.open))
        patch.setattr(builtins, "open", _refusing(tmp_path, builtins.open))
        partitions = sources.plan([("stub", 0, stubs)], must_exist=False)
    assert [p.file for p in partitions] == stubs
    with pytest.raises(hepdask.errors.MissingInputError, match=r"stub00000\.root' does not exist"):
        sources.plan([("stub", 0, stubs)])


# ------------------------------------------------------------------------------------------
# 3. example data: the generate: block and make-example-data


def _generate_config(tmp_path: Path) -> dict:
    data = tmp_path / "data"
    config = demo_config(data, tmp_path / "gen.zarr", selection={}, cluster={"processes": False})
    config["samples"][0]["generate"] = {"signal": True, "n_files": 2, "events_per_file": 20, "seed": 5,
                                        "directory": str(data)}
    config["samples"][1]["generate"] = {"signal": False, "n_files": 2, "events_per_file": 20, "seed": 6,
                                        "directory": str(data)}
    config["output"]["shuffle"] = {"enabled": False}
    config["output"]["split"] = {"train": 1.0}
    return config


def _tree_arrays(path: str) -> dict[str, np.ndarray]:
    tree = uproot.open(path)[examples.TREE]
    arrays = tree.arrays(["x", "y", "z", "E", "eventNumber"], library="ak")
    return {k: ak.to_numpy(ak.flatten(arrays[k], axis=None)) for k in arrays.fields} | {
        "counts": ak.to_numpy(ak.num(arrays["x"], axis=1))}


def test_generate_block_dry_run_writes_nothing(tmp_path):
    raw = _generate_config(tmp_path)
    report = hepdask.build_dataset(from_dict(raw), dry_run=True, progress=False)
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())
    for name in ("signal", "background"):
        assert report.samples[name]["files_to_generate"] == 2
        assert report.samples[name]["estimated_events"] == 40
    assert report.plan["estimated_events"] == 80
    assert report.n_partitions == 4 and not report.plan["output_exists"]
    raw["read"] = {**raw.get("read", {}), "entries_per_partition": 8}
    assert hepdask.build_dataset(from_dict(raw), dry_run=True, progress=False).n_partitions == 12  # 3 a file


def test_generate_block_writes_the_files_then_builds(tmp_path):
    raw = _generate_config(tmp_path)
    data = tmp_path / "data"
    assert not data.exists()
    report = hepdask.build_dataset(from_dict(raw), progress=False)
    written = sorted(p.name for p in data.glob("*.root"))
    assert written == ["background_00000.root", "background_00001.root", "signal_00000.root", "signal_00001.root"]
    assert report.events_written == 80
    assert store.is_complete(tmp_path / "gen.zarr")
    ds = hepdask.open_dataset(tmp_path / "gen.zarr", "train")
    assert ds.sizes["event"] == 80
    files = np.array([str(f) for f in ds.source_file.values])
    assert set(files) == {str(data / name) for name in written}
    for name in written:
        mine = files == str(data / name)
        arrays = _tree_arrays(str(data / name))
        assert arrays["counts"].size == 20
        # eventNumber continues from file to file (first_event = i * events_per_file)
        first = 20 * int(name[-10:-5])
        assert sorted(ds.eventNumber.values[mine].tolist()) == list(range(first, first + 20))
        assert set(ds.label.values[mine].tolist()) == {1 if name.startswith("signal") else 0}
    # a second build finds the files and generates nothing more
    before = {p.name: p.stat().st_mtime_ns for p in data.glob("*.root")}
    raw["output"]["overwrite"] = True
    assert hepdask.build_dataset(from_dict(raw), progress=False).events_written == 80
    assert {p.name: p.stat().st_mtime_ns for p in data.glob("*.root")} == before


def test_generate_block_tops_up_missing_files(tmp_path):
    raw = _generate_config(tmp_path)
    raw["samples"] = raw["samples"][:1]
    data = tmp_path / "data"
    examples.generate(data, signal=True, n_files=1, events_per_file=20, seed=5)
    first = (data / "signal_00000.root").stat().st_mtime_ns
    report = hepdask.build_dataset(from_dict(raw), progress=False)
    assert report.events_written == 40
    assert (data / "signal_00000.root").stat().st_mtime_ns == first
    assert (data / "signal_00001.root").exists()


def test_lowering_n_files_builds_from_that_many_example_files(tmp_path):
    """The pattern still matches the files an earlier run with more generated: the sample holds
    the first n_files, and the build says what it left out; other files it matches stay in."""
    raw = _generate_config(tmp_path)
    raw["samples"] = raw["samples"][:1]
    raw["samples"][0]["generate"]["n_files"] = 3
    assert hepdask.build_dataset(from_dict(raw), progress=False).events_written == 60
    data = tmp_path / "data"
    mine = data / "signal_mine.root"
    mine.write_bytes((data / "signal_00000.root").read_bytes())
    raw["samples"][0]["generate"]["n_files"] = 1
    raw["output"]["overwrite"] = True
    told = io.StringIO()
    from rich.console import Console

    assert hepdask.build_dataset(from_dict(raw), dry_run=True, progress=False).samples["signal"]["files"] == 2
    report = hepdask.build_dataset(from_dict(raw), progress=False, console=Console(file=told, width=200))
    assert report.events_written == 40
    files = {Path(str(f)).name for f in hepdask.open_dataset(tmp_path / "gen.zarr", "train").source_file.values}
    assert files == {"signal_00000.root", "signal_mine.root"}
    assert f"sample 'signal': 2 example file(s) in {data} beyond generate.n_files=1 left out" in told.getvalue()


def test_make_example_data_cli(tmp_path, capsys):
    out = tmp_path / "examples"
    assert cli(["make-example-data", str(out), "--signal", "--files", "3", "--events", "7", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"3 files in {out}" in printed
    files = sorted(out.glob("*.root"))
    assert [f.name for f in files] == ["signal_00000.root", "signal_00001.root", "signal_00002.root"]
    for i, path in enumerate(files):
        tree = uproot.open(path)[examples.TREE]
        assert tree.num_entries == 7
        assert set(tree.keys()) >= {"x", "y", "z", "E", "eventNumber", "nHits"}
        assert tree["eventNumber"].array(library="np").tolist() == list(range(7 * i, 7 * i + 7))
        np.testing.assert_array_equal(tree["nHits"].array(library="np"),
                                      ak.to_numpy(ak.num(tree["x"].array(library="ak"), axis=1)))
    assert cli(["make-example-data", str(tmp_path / "bg"), "--background", "--files", "1", "--events", "4"]) == 0
    assert [f.name for f in (tmp_path / "bg").glob("*.root")] == ["background_00000.root"]


def test_example_files_of_other_settings_are_not_reused(tmp_path, capsys):
    """Existing files are skipped when generating, so files of another events_per_file or seed
    would mix into the new dataset: that is refused, by the build and by the CLI."""
    raw = _generate_config(tmp_path)
    raw["samples"] = raw["samples"][:1]
    assert hepdask.build_dataset(from_dict(raw), progress=False).events_written == 40
    data = tmp_path / "data"
    raw["samples"][0]["generate"].update(n_files=3, events_per_file=50)
    raw["output"]["overwrite"] = True
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=re.escape(
                f"{data}: the signal example files there were generated with events_per_file=20, not events_per_file=50")):
            hepdask.build_dataset(from_dict(raw), dry_run=dry_run, progress=False)
    assert sorted(p.name for p in data.glob("*.root")) == ["signal_00000.root", "signal_00001.root"]
    assert cli(["make-example-data", str(data), "--signal", "--files", "3", "--events", "20", "--seed", "9"]) == 2
    assert "generated with seed=5, not seed=9" in capsys.readouterr().err
    # The same settings top the directory up; the other sample's files are checked apart.
    assert cli(["make-example-data", str(data), "--signal", "--files", "3", "--events", "20", "--seed", "5"]) == 0
    assert cli(["make-example-data", str(data), "--background", "--files", "1", "--events", "3"]) == 0
    for bad in (["--files", "0"], ["--events", "-5"]):
        assert cli(["make-example-data", str(tmp_path / "new"), "--signal", *bad]) == 2
        assert "at least one file of at least one event" in capsys.readouterr().err
    # Files without a record (older ones, or copied): their number of events is checked.
    for record in data.glob(".*.json"):
        record.unlink()
    assert cli(["make-example-data", str(data), "--signal", "--files", "3", "--events", "21"]) == 2
    assert "generated with events_per_file=20, not events_per_file=21" in capsys.readouterr().err
    # A record whose files are gone is stale: the directory can be filled anew.
    assert cli(["make-example-data", str(data), "--background", "--files", "1", "--events", "3"]) == 0
    (data / "background_00000.root").unlink()
    assert cli(["make-example-data", str(data), "--background", "--files", "1", "--events", "4", "--seed", "8"]) == 0


def test_make_example_data_equals_the_generate_block(tmp_path, capsys):
    """The CLI and a sample's generate: block with the same seed write the same events."""
    assert cli(["make-example-data", str(tmp_path / "cli"), "--signal", "--files", "2", "--events", "20",
                "--seed", "5"]) == 0
    capsys.readouterr()
    raw = _generate_config(tmp_path)
    raw["samples"] = raw["samples"][:1]
    hepdask.build_dataset(from_dict(raw), progress=False)
    for i in range(2):
        a = _tree_arrays(str(tmp_path / "cli" / f"signal_{i:05d}.root"))
        b = _tree_arrays(str(tmp_path / "data" / f"signal_{i:05d}.root"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------------------------------
# 4. a missing branch names its closest match


def test_missing_branch_error_says_did_you_mean(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["hits"]["E"] = "Energy"
    path = write_config(tmp_path / "bad.yaml", config)
    code = cli(["build-dataset", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("hepdask: error:")
    assert "hits.E: branch 'Energy' not in tree 'ecalHits'" in err
    assert "did you mean 'E'?" in err
    assert "signal_00000.root" in err
    assert not store.is_complete(tmp_path / "o.zarr")


def test_missing_event_branch_suggests_the_close_spelling(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["event"]["eventNumber"] = "eventNumbr"
    path = write_config(tmp_path / "bad.yaml", config)
    assert cli(["build-dataset", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "event.eventNumber: branch 'eventNumbr' not in tree 'ecalHits'; did you mean 'eventNumber'?" in err


def test_print_job_script_shows_the_log_lines_and_writes_nothing(tmp_path, capsys):
    """The printed script is the one a build submits, log lines included; printing it leaves
    no log directory, and a SLURM build without a profile fails in one line."""
    pytest.importorskip("dask_jobqueue")
    out = tmp_path / "new" / "dir" / "o.zarr"
    path = write_config(tmp_path / "c.yaml", demo_config(tmp_path / "data", out))
    profile = Path(__file__).resolve().parents[1] / "jobqueue" / "slurm.yaml"
    assert cli(["build-dataset", str(path), "--cluster", "slurm", "--profile", str(profile), "--print-job-script"]) == 0
    script = capsys.readouterr().out
    assert f"#SBATCH -o {out}.slurm-logs/hepdask-worker-%J.out" in script
    assert f"#SBATCH -e {out}.slurm-logs/hepdask-worker-%J.err" in script
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    assert cli(["build-dataset", str(path), "--cluster", "slurm", "--print-job-script"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    err = capsys.readouterr().err
    assert err.startswith("hepdask: error: cluster.profile is not set (--profile)") and err.count("\n") == 1


def test_the_launch_script_reads_the_config_cluster_section_and_fails_in_one_line(tmp_path):
    """jobqueue/launch_slurm.py starts from the config's cluster section (here its jobs), puts
    the flags given on top, and a bad combination is one line naming them, exit status 2."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "jobqueue" / "launch_slurm.py"
    path = write_config(tmp_path / "c.yaml", demo_config(tmp_path / "data", tmp_path / "o.zarr",
                                                         cluster={"jobs": 1}))
    done = subprocess.run([sys.executable, str(script), str(path), "--minimum-jobs", "3"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("launch_slurm: error: ")
    assert "--minimum-jobs 3" in done.stderr and "cluster.minimum_jobs (3) exceeds cluster.jobs (1)" in done.stderr
    assert not (tmp_path / "o.zarr.slurm-logs").exists()


def test_a_script_without_a_main_guard_is_told_why_its_workers_failed(monkeypatch):
    """Worker processes are spawned and import the user's script again: without
    `if __name__ == "__main__":` they start a build of their own and die."""
    import distributed

    from hepdask import cluster
    from hepdask.config import Cluster
    from hepdask.errors import ClusterError

    def failing(**_kwargs):
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(distributed, "LocalCluster", failing)
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__file__", "/home/someone/build.py", raising=False)
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.delattr(main, "main", raising=False)
    with pytest.raises(ClusterError, match=r"Nanny failed to start\. \(a script .*if __name__ == \"__main__\""):
        cluster._start_local(Cluster(), None, n_workers=2, threads_per_worker=1, processes=True)
    # The hepdask command gets no such hint: pip's console script imports hepdask.cli.entry.
    from hepdask.cli import entry

    monkeypatch.setattr(main, "entry", entry, raising=False)
    with pytest.raises(ClusterError) as err:
        cluster._start_local(Cluster(), None, n_workers=2, threads_per_worker=1, processes=True)
    assert "__main__" not in str(err.value)


def test_an_address_where_nothing_listens_is_refused_at_once(ldmx_data, tmp_path, capsys):
    """Dask's client retries a refused connection for its whole timeout (30 s): the build
    tries for 5 s (a scheduler the same script starts may not listen yet) and says nothing
    listens there."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = write_config(tmp_path / "c.yaml", demo_config(ldmx_data[0], tmp_path / "a.zarr"))
    assert cli(["build-dataset", str(path), "--address", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"hepdask: error: cannot reach the Dask scheduler at cluster.address='tcp://127.0.0.1:{port}': "
                   "nothing listens there (connection refused for 5 s); is the scheduler running, and is that its port?")


def test_a_scheduler_that_listens_a_moment_later_is_reached():
    import socket
    import threading

    from hepdask.cluster import _refuse_a_refused_address

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = socket.socket()

    def listen_later():
        threading.Event().wait(0.6)
        server.bind(("127.0.0.1", port))
        server.listen()

    later = threading.Thread(target=listen_later)
    later.start()
    try:
        _refuse_a_refused_address(f"tcp://127.0.0.1:{port}")  # refused at first, then it listens
    finally:
        later.join()
        server.close()


def test_the_dry_run_says_what_the_build_will_do_with_its_output(ldmx_data, tmp_path, capsys):
    """A directory that is not a store is refused even with --overwrite: the dry run says so,
    in the words the build then uses."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    path = write_config(tmp_path / "c.yaml", demo_config(ldmx_data[0], out, **{"output.overwrite": True}))
    assert cli(["build-dataset", str(path), "--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert cli(["build-dataset", str(path), "--no-progress"]) == 2
    refusal = capsys.readouterr().err.strip().removeprefix("hepdask: error: ")
    assert "is not a hepdask store" in refusal
    assert f"output plan: the build will refuse: {refusal}" in planned
    assert (out / "notes.txt").read_text() == "keep" and [p.name for p in tmp_path.iterdir() if p.name.startswith("mine")] == ["mine"]
    fresh = write_config(tmp_path / "d.yaml", demo_config(ldmx_data[0], tmp_path / "new.zarr"))
    assert cli(["build-dataset", str(fresh), "--dry-run"]) == 0
    assert "output plan: the build will write a new store" in capsys.readouterr().out


def test_a_config_that_is_not_text_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes("name: x\n".encode("utf-16"))
    assert cli(["build-dataset", str(path), "--dry-run"]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_example_files_that_cannot_be_written_are_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert cli(["make-example-data", str(tmp_path / "a-file" / "data"), "--signal", "--files", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hepdask: error: cannot write example files into") and len(err.splitlines()) == 1


def test_a_full_disk_while_finishing_the_store_is_one_line_and_resumable(ldmx_data, tmp_path, monkeypatch):
    import errno

    from hepdask import build
    from hepdask.errors import StoreError

    data, _ = ldmx_data
    out = tmp_path / "o.zarr"
    config = from_dict(demo_config(data, out))
    finalize = store.finalize

    def full(path, attrs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "zarr.json"))

    monkeypatch.setattr(build.store, "finalize", full)
    with pytest.raises(StoreError, match=r"cannot finish the store .*No space left on device.*run the same command again"):
        hepdask.build_dataset(config, progress=False)
    assert not store.is_complete(out)
    monkeypatch.setattr(build.store, "finalize", finalize)
    hepdask.build_dataset(config, progress=False)
    assert store.is_complete(out) and store.verify(out) == []


def test_samples_sharing_a_label_share_its_flag(ldmx_data, tmp_path):
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "o.zarr")
    raw["samples"] = [{"name": "bkg_a", "label": 0, "files": files["background"][:1]},
                      {"name": "bkg_b", "label": 0, "files": files["background"][1:2]},
                      {"name": "sig", "label": 1, "files": files["signal"][:1]}]
    hepdask.build_dataset(from_dict(raw), progress=False)
    attrs = hepdask.open_dataset(tmp_path / "o.zarr", "train").label.attrs
    assert attrs["flag_values"] == [0, 1] and attrs["flag_meanings"] == "bkg_a+bkg_b sig"


def test_a_sample_whose_files_were_all_skipped_is_not_blamed_on_the_selection(tmp_path):
    from hepdask import build

    printed: list[str] = []
    bar = type("Bar", (), {"print": staticmethod(printed.append)})()
    config = from_dict(demo_config(tmp_path, tmp_path / "o.zarr"))
    counts = {"signal": {"files": 3, "bad_files": 0, "read": 90, "selected": 40},
              "background": {"files": 0, "bad_files": 2, "read": 0, "selected": 0}}
    build._check_selected(config, counts, str(tmp_path / "staging"), bar)
    assert printed == [("warning: sample 'background': all its 2 file(s) were bad and skipped "
                        "(read.on_bad_file: skip); it has no events")]


def test_a_task_that_met_a_full_disk_names_where_it_wrote():
    import errno

    from hepdask import build
    from hepdask.errors import BuildError

    future = type("Future", (), {"key": "write-abc-3"})()
    with pytest.raises(BuildError, match=r"task 'write-abc-3' could not write under '/data/o\.zarr': No space left "
                                         r"on device \(errno 28\); fix that and run the same command again to resume"):
        build._raise_task_error(future, OSError(errno.ENOSPC, "No space left on device"), "/data/o.zarr")
    with pytest.raises(BuildError, match="task 'write-abc-3' failed: ValueError: odd"):
        build._raise_task_error(future, ValueError("odd"), "/data/o.zarr")


def test_workers_leave_full_disk_and_hepdask_errors_to_the_client_and_log_the_rest():
    """A task that met a full disk, or raised a hepdask error, is reported by the client in
    one line; any other exception, a bug, is still logged by the worker with its traceback."""
    import errno
    import logging

    from hepdask.workers import _UserErrorFilter

    def logged(exception: BaseException) -> bool:
        record = logging.LogRecord("distributed.worker", logging.ERROR, "", 0,
                                   "Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %s\nTraceback: %s",
                                   ("k", "executing", "t", repr(exception), "tb"), None)
        return _UserErrorFilter().filter(record)

    assert not logged(OSError(errno.ENOSPC, "No space left on device"))
    assert not logged(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not logged(hepdask.errors.BranchError("late.root: no branch"))
    assert logged(OSError(errno.ENOENT, "No such file"))
    assert logged(ValueError("a bug"))


def test_a_log_file_gets_no_blank_line_from_an_unused_progress_bar_and_unbroken_sentences(capsys):
    """Without a terminal rich prints the final progress display when it stops: a build refused
    before any bar left an empty line before its error. And a sentence in a log stays one line."""
    from rich.console import Console

    from hepdask.build import Bar
    from hepdask.cli import _console

    unused = io.StringIO()
    with Bar(enabled=True, console=Console(file=unused)):
        pass
    assert unused.getvalue() == ""
    used = io.StringIO()
    with Bar(enabled=True, console=Console(file=used)) as bar:
        bar.advance(bar.add("read + bin", 2), 2)
    assert "read + bin" in used.getvalue() and "2/2" in used.getvalue()
    sentence = "wrote 1,000,000 events to " + "/a/long/path" * 8 + "/store.zarr in 12.5 s (80,000 events/s read)"
    _console(Console).print(sentence)
    assert capsys.readouterr().out == sentence + "\n"
