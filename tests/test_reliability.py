"""Bad files, resumed builds, dying workers and damaged stores."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import dask
import pytest
import zarr
from rich.console import Console

import hepdask
from hepdask import build, store
from hepdask.cli import main as cli
from hepdask.cli import print_build
from hepdask.config import from_dict
from hepdask.errors import BuildError, StoreError

from .data_generation import (
    PoisonFiles,
    chunk_file,
    chunk_files,
    corrupted_basket_file,
    demo_config,
    ldmx_files,
    not_root_file,
    tree_missing_file,
    truncated_file,
    write_config,
)
from .test_build import chunk_hashes


def _config(files: dict[str, list[str]], out: Path, **changes) -> dict:
    raw = demo_config(Path("unused"), out, **changes)
    raw["samples"][0]["files"] = files["signal"]
    raw["samples"][1]["files"] = files["background"]
    return raw


def _staged_count(staging: Path) -> int:
    return sum(1 for p in staging.glob(f"p*{store.PART_SUFFIX}") if store.load_staged(staging, p.stem) is not None)


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """200 small files, 100 per sample."""
    return ldmx_files(tmp_path_factory.mktemp("many"), n_files=100, events=12, seed=5)


@pytest.fixture(scope="module")
def bad_inputs(many_files, tmp_path_factory):
    """The 200 files with 6 of them replaced by bad ones of every kind; and the 194 good ones."""
    directory = tmp_path_factory.mktemp("bad")
    signal, background = list(many_files["signal"]), list(many_files["background"])
    replacements = {
        ("signal", 3): truncated_file(signal[3], directory / "truncated.root"),
        ("signal", 40): not_root_file(directory / "text.root"),
        ("signal", 77): corrupted_basket_file(signal[77], directory / "corrupt.root"),
        ("background", 10): tree_missing_file(directory / "notree.root"),
        ("background", 55): str(directory / "vanished.root"),
        ("background", 90): truncated_file(background[90], directory / "truncated2.root"),
    }
    with_bad = {"signal": list(signal), "background": list(background)}
    good = {"signal": list(signal), "background": list(background)}
    for (sample, i), path in replacements.items():
        with_bad[sample][i] = path
    for sample, i in sorted(replacements, reverse=True):
        del good[sample][i]
    return with_bad, good, sorted(replacements.values())


@pytest.mark.slow
def test_bad_files_are_skipped_and_reported(bad_inputs, client, tmp_path):
    with_bad, good, bad_paths = bad_inputs
    skip = from_dict(_config(with_bad, tmp_path / "skip.zarr", **{"read.on_bad_file": "skip"}))
    report = hepdask.build_dataset(skip, client=client, progress=False)
    clean = from_dict(_config(good, tmp_path / "clean.zarr"))
    hepdask.build_dataset(clean, client=client, progress=False)

    assert chunk_hashes(tmp_path / "skip.zarr") == chunk_hashes(tmp_path / "clean.zarr")
    reported = {b["path"]: b for b in report.bad_files}
    assert sorted(reported) == bad_paths
    causes = {Path(p).name: b["exception"] for p, b in reported.items()}
    assert causes["truncated.root"] == "OSError"
    assert causes["text.root"] == "ValueError"
    assert causes["corrupt.root"] in {"zlib.error", "uproot.deserialization.DeserializationError"}
    assert causes["notree.root"] == "BranchError"
    assert causes["vanished.root"] == "FileNotFoundError"
    assert all(b["message"].startswith(b["path"]) for b in reported.values())
    # A truncated file says so, not uproot's "expected Chunk of length 14991,".
    messages = {Path(p).name: b["message"] for p, b in reported.items()}
    assert re.search(r"truncated\.root: truncated: [\d,]+ of the [\d,]+ bytes its ROOT header says it holds",
                     messages["truncated.root"]), messages["truncated.root"]
    manifest = zarr.open_group(str(tmp_path / "skip.zarr"), mode="r").attrs["hepdask:manifest"]
    assert sorted(m["path"] for m in manifest if m["status"] == "bad") == bad_paths
    # The summary and `hepdask info` count the bad files apart from the files read.
    assert {name: (s["files"], s["bad_files"]) for name, s in report.samples.items()} == {
        "signal": (97, 3), "background": (97, 3)}
    info = store.store_info(tmp_path / "skip.zarr")["samples"]
    assert {name: (s["files"], s["bad_files"]) for name, s in info.items()} == {
        "signal": (97, 3), "background": (97, 3)}
    console = Console(width=200, record=True)
    print_build(report, console)
    shown = console.export_text()
    assert "bad files (skipped)" in shown and "bad files skipped (read.on_bad_file: skip)" in shown
    assert all(Path(p).name in shown for p in bad_paths) and "BranchError" in shown


@pytest.mark.slow
def test_too_many_bad_files_stop_before_finalising(bad_inputs, tmp_path, capsys):
    with_bad, _, _ = bad_inputs
    raw = _config(with_bad, tmp_path / "o.zarr", **{"read.on_bad_file": "skip", "read.max_bad_fraction": 0.02})
    path = write_config(tmp_path / "c.yaml", raw)
    assert cli(["build-dataset", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "6 of 200 input files are bad" in err
    assert "max_bad_fraction=0.02" in err
    assert not store.is_complete(tmp_path / "o.zarr")


@pytest.fixture(scope="module")
def bigger_files(tmp_path_factory):
    """Enough work that a build takes a few seconds on 2 workers."""
    return ldmx_files(tmp_path_factory.mktemp("bigger"), n_files=30, events=800, seed=8)


@pytest.fixture(scope="module")
def bigger_clean(bigger_files, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("bigclean") / "clean.zarr"
    hepdask.build_dataset(from_dict(_config(bigger_files, out, **{"output.chunk_events": 256})), client=client,
                          progress=False)
    return out


def _kill_workers_at(client, staging: Path, total: int, fractions: list[float], killed: list) -> None:
    for fraction in fractions:
        deadline = time.monotonic() + 120
        while _staged_count(staging) < fraction * total and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = client.run(os.getpid)
        victim = min(pids.values())
        os.kill(victim, signal.SIGKILL)
        killed.append((fraction, _staged_count(staging), victim))


@pytest.mark.slow
def test_killed_workers_do_not_change_the_store(bigger_files, bigger_clean, tmp_path):
    from distributed import Client, LocalCluster

    out = tmp_path / "killed.zarr"
    config = from_dict(_config(bigger_files, out, **{"output.chunk_events": 256}))
    killed: list = []
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(lambda: __import__("hepdask.build"))
        killer = threading.Thread(target=_kill_workers_at,
                                  args=(client, store.staging_path(out), 60, [0.3, 0.6], killed))
        killer.start()
        hepdask.build_dataset(config, client=client, progress=False)
        killer.join()
    assert len(killed) == 2, killed
    assert all(staged < 60 for _, staged, _ in killed), f"the kills came after staging ended: {killed}"
    assert chunk_hashes(out) == chunk_hashes(bigger_clean)
    assert store.verify(out) == []
    assert not store.staging_path(out).exists()


@pytest.mark.slow
@pytest.mark.parametrize("per_task", [1, 3])
def test_poison_file_is_reported_after_its_retries(ldmx_data, tmp_path, per_task):
    """Alone in its task or staged with others (then the group is retried file by file),
    only the poison file is reported bad, and every other file is in the store."""
    from distributed import Client, LocalCluster

    data, files = ldmx_data
    poison = tmp_path / "poison.root"
    poison.write_bytes(Path(files["signal"][0]).read_bytes())
    raw = demo_config(data, tmp_path / "p.zarr", **{"read.on_bad_file": "skip", "read.max_bad_fraction": 0.5,
                                                    "read.partitions_per_task": per_task})
    # The poison file sits in the middle of a group of 3: one good file staged before it,
    # one after.
    raw["samples"][0]["files"] = [*files["signal"][:1], str(poison), *files["signal"][1:]]
    settings = {"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(settings), \
            LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(PoisonFiles())
        report = hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    assert [b["path"] for b in report.bad_files] == [str(poison)]
    assert report.bad_files[0]["exception"] == "KilledWorker"
    assert store.is_complete(tmp_path / "p.zarr")
    assert report.samples["signal"]["selected"] > 0
    manifest = store.open_root(tmp_path / "p.zarr").attrs[store.PREFIX + "manifest"]
    assert [m["path"] for m in manifest if m["status"] == "ok"] == [*files["signal"], *files["background"]]


@pytest.mark.slow
def test_sigkilled_build_resumes_to_an_identical_store(bigger_files, bigger_clean, tmp_path):
    out = tmp_path / "resumed.zarr"
    path = write_config(tmp_path / "c.yaml", _config(bigger_files, out, **{"output.chunk_events": 256}))
    command = [sys.executable, "-m", "hepdask.cli", "build-dataset", str(path), "--no-progress", "--workers", "2"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging = store.staging_path(out)
    deadline = time.monotonic() + 180
    while _staged_count(staging) < 30 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    staged_before = _staged_count(staging)
    assert 0 < staged_before < 60
    assert not store.is_complete(out)

    rerun = subprocess.run(command, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert chunk_hashes(out) == chunk_hashes(bigger_clean)
    assert store.verify(out) == []


def test_resume_refuses_another_config_and_rebuilds_changed_files(ldmx_data, client, tmp_path):
    data, files = ldmx_data
    late_bad = tmp_path / "late.root"
    late_bad.write_text("not root")
    raw = demo_config(data, tmp_path / "r.zarr")
    raw["samples"][0]["files"] = [*files["signal"], str(late_bad)]
    with pytest.raises(hepdask.HepdaskError, match=r"late\.root"):
        hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    staging = store.staging_path(tmp_path / "r.zarr")
    assert _staged_count(staging) > 0

    changed = json.loads(json.dumps(raw))
    changed["output"]["chunk_events"] = 5
    with pytest.raises(StoreError, match="different config") as refused:
        hepdask.build_dataset(from_dict(changed), client=client, progress=False)

    def planned(config: dict) -> str:
        return hepdask.build_dataset(from_dict(config), dry_run=True, progress=False).plan["output_plan"]

    # The dry run foresees both: the refusal word for word, and the resume.
    assert planned(changed) == f"the build will refuse: {refused.value}"
    assert planned(raw) == f"the build will resume the interrupted build in {staging}"
    overwritten = json.loads(json.dumps(changed))
    overwritten["output"]["overwrite"] = True
    assert planned(overwritten) == ("the build will discard the staging area an interrupted build left, "
                                    "which cannot be resumed")

    touched = files["background"][1]
    os.utime(touched, (time.time() + 60, time.time() + 60))
    raw["read"]["on_bad_file"] = "skip"
    raw["read"]["max_bad_fraction"] = 0.5
    report = hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    assert [b["path"] for b in report.bad_files] == [str(late_bad)]
    manifest = {m["path"]: m for m in zarr.open_group(str(tmp_path / "r.zarr"), mode="r").attrs["hepdask:manifest"]}
    assert manifest[touched]["mtime"] == os.stat(touched).st_mtime
    assert store.verify(tmp_path / "r.zarr") == []


#: Seconds an injected write failure waits before it fails the build.
WRITE_FAILURE_DELAY = 1.5


def _fail_writes_of(split):
    """On a worker: make write tasks of *split* fail, after leaving a half-written chunk
    behind as a killed writer would."""
    from hepdask import store as worker_store

    original = getattr(worker_store.write_chunks, "original", worker_store.write_chunks)
    if split is None:
        worker_store.write_chunks = original
        return

    def failing(path, this_split, ranges, *args, **kwargs):
        if this_split == split:
            (Path(path) / this_split / "image" / f"c.{ranges[0][0]}.0.0.dead.partial").write_bytes(b"half")
            # The failure cancels the build's other write tasks: let those submitted before
            # this one (the train split's, a few ms each here) finish first, as a build
            # stopped late in its write phase would have them.
            time.sleep(WRITE_FAILURE_DELAY)
            msg = f"injected failure writing {this_split}"
            raise RuntimeError(msg)
        return original(path, this_split, ranges, *args, **kwargs)

    failing.original = original
    worker_store.write_chunks = failing


def _build_failing_in_write_phase(raw: dict, client) -> None:
    """Build *raw* with the test split's write tasks failing: it stops in its write phase."""
    client.run(_fail_writes_of, "test")
    try:
        with pytest.raises(BuildError, match="injected failure writing test"):
            hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    finally:
        client.run(_fail_writes_of, None)


def test_a_build_stopped_in_its_write_phase_resumes_without_rewriting_finished_chunks(ldmx_data, client, tmp_path):
    data, _ = ldmx_data
    raw = demo_config(data, tmp_path / "w.zarr", **{"output.chunk_events": 64})
    clean = tmp_path / "clean.zarr"
    clean_report = hepdask.build_dataset(from_dict(demo_config(data, clean, **{"output.chunk_events": 64})),
                                         client=client, progress=False)
    _build_failing_in_write_phase(raw, client)
    out = tmp_path / "w.zarr"
    assert not store.is_complete(out)
    train_chunks = chunk_files(out / "train" / "image")
    assert train_chunks, "the train split's write tasks finished before the failure"
    before = {p: p.stat().st_mtime_ns for p in train_chunks}

    report = hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    assert report.events_written == clean_report.events_written > 0
    assert {p: p.stat().st_mtime_ns for p in train_chunks} == before  # kept, not written again
    assert chunk_hashes(out) == chunk_hashes(clean)
    assert store.verify(out) == []  # the dead writer's .partial file is gone


def test_a_resumed_build_whose_plan_changed_rewrites_the_store(ldmx_data, client, tmp_path):
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "p.zarr", **{"output.chunk_events": 64})
    _build_failing_in_write_phase(raw, client)
    touched = files["signal"][0]
    os.utime(touched, (time.time() + 120, time.time() + 120))  # restaged: another write plan
    hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    clean = tmp_path / "clean.zarr"
    hepdask.build_dataset(from_dict(demo_config(data, clean, **{"output.chunk_events": 64})), client=client,
                          progress=False)
    assert chunk_hashes(tmp_path / "p.zarr") == chunk_hashes(clean)
    attrs = zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs
    assert attrs[store.PLAN] != zarr.open_group(str(clean), mode="r").attrs[store.PLAN]


def test_a_failed_build_is_not_complete(ldmx_data, client, tmp_path):
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "f.zarr", **{"read.on_bad_file": "skip", "read.max_bad_fraction": 0.0})
    raw["samples"][0]["files"] = [*files["signal"], str(tmp_path / "missing.root")]
    with pytest.raises(BuildError, match="1 of 9 input files are bad"):
        hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    assert not store.is_complete(tmp_path / "f.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        hepdask.open_dataset(tmp_path / "f.zarr", "train")


def test_a_bug_is_never_taken_for_a_bad_file(ldmx_data, tmp_path, monkeypatch):
    """Under on_bad_file: skip only unreadable input is skipped: an error of hepdask itself
    (a TypeError here) fails the build instead of quietly dropping the file."""
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "f.zarr", cluster={"processes": False},  # the patch reaches the tasks
                      **{"read.on_bad_file": "skip", "read.max_bad_fraction": 1.0})
    raw["samples"] = [{**raw["samples"][0], "files": files["signal"][:2]}]
    stage = build._stage

    def buggy(partition, job):
        if partition.file == files["signal"][1]:
            raise TypeError("unsupported operand")
        return stage(partition, job)

    monkeypatch.setattr(build, "_stage", buggy)
    with pytest.raises(BuildError, match="TypeError: unsupported operand"):
        hepdask.build_dataset(from_dict(raw), progress=False)
    assert not store.is_complete(tmp_path / "f.zarr")


def test_a_build_that_fails_while_finalising_is_not_complete(ldmx_data, tmp_path, monkeypatch):
    """The completion marker is written last: a failure in the finalising steps before it
    (here consolidating the metadata) leaves a store that nothing reads as complete."""
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "f.zarr")
    raw["samples"] = [{**raw["samples"][0], "files": files["signal"][:1]}]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store.zarr, "consolidate_metadata", fail)
    with pytest.raises(OSError, match="disk full"):
        hepdask.build_dataset(from_dict(raw), progress=False)
    out = tmp_path / "f.zarr"
    assert store.is_hepdask_store(out) and not store.is_complete(out)
    assert any("complete" in problem for problem in store.verify(out))


# ------------------------------------------------------------------------------------------
# hepdask verify on deliberately damaged stores


@pytest.fixture
def sound_store(ldmx_data, client, tmp_path):
    data, _ = ldmx_data
    out = tmp_path / "v.zarr"
    hepdask.build_dataset(from_dict(demo_config(data, out)), client=client, progress=False)
    assert store.verify(out) == []
    return out


def _edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _verify_cli(path: Path, capsys) -> str:
    code = cli(["verify", str(path)])
    out = capsys.readouterr().out
    assert code == 1, out
    return out


def test_verify_catches_a_missing_marker(sound_store, capsys):
    _edit_json(sound_store / "zarr.json", lambda m: m["attributes"].pop("hepdask:complete"))
    assert "no 'hepdask:complete' marker" in _verify_cli(sound_store, capsys)
    with pytest.raises(StoreError, match="incomplete"):
        hepdask.open_dataset(sound_store, "train")
    assert cli(["info", str(sound_store)]) == 2


def test_verify_refuses_what_is_no_store_to_check_as_a_user_error(sound_store, tmp_path, capsys):
    """Exit 1 says a store is damaged; a wrong path is the command's error (2), in one line."""
    for path, says in [(tmp_path / "typo.zarr", "does not exist"),
                       (sound_store / "train", "is the group 'train' inside the store")]:
        assert cli(["verify", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and says in captured.err and len(captured.err.splitlines()) == 1


def test_verify_catches_a_missing_chunk(sound_store, capsys):
    chunk_file(sound_store, "train", "image", 0).unlink()
    assert "train/image: 1 chunk(s) missing" in _verify_cli(sound_store, capsys)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_verify_decodes_every_chunk_and_readers_name_the_damage(sound_store, capsys, damage):
    image, label = chunk_file(sound_store, "train", "image", 0), chunk_file(sound_store, "val", "label", 0)
    for chunk in (image, label):
        raw = chunk.read_bytes()
        chunk.write_bytes(raw[:10] if damage == "truncated" else bytes(reversed(raw)))
    out = _verify_cli(sound_store, capsys)
    assert "train/image: 1 chunk(s) cannot be decoded, e.g. train/image/c." in out
    assert "val/label: 1 chunk(s) cannot be decoded" in out
    assert cli(["verify", "--quick", str(sound_store)]) == 0  # every chunk is there
    capsys.readouterr()
    for command in (["info", str(sound_store)], ["show", str(sound_store), "--split", "val",
                                                 "--output", str(sound_store.parent / "s.png")]):
        assert cli(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith("hepdask: error: store") and "hepdask verify" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(("array", "command"), [("label", "info"), ("label", "show"), ("image", "show")])
def test_info_and_show_refuse_a_missing_chunk_instead_of_reading_fill_values(sound_store, capsys, array, command):
    """zarr reads a missing chunk as its fill value: info counted every train label as 0, and
    show drew blank images, both with exit status 0."""
    chunk_file(sound_store, "train", array, 0).unlink()
    args = [command, str(sound_store)] + (["--output", str(sound_store.parent / "s.png")] if command == "show" else [])
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"1 chunk(s) of 'train/{array}' missing, e.g. train/{array}/c." in err and len(err.splitlines()) == 1, err
    assert not (sound_store.parent / "s.png").exists()


@pytest.mark.parametrize("events", ["0", "65", "many"])
def test_show_takes_a_sane_number_of_events(sound_store, capsys, events):
    """--events 0 showed one event, and 100,000 made a PNG 337,920 pixels high."""
    with pytest.raises(SystemExit) as stop:
        cli(["show", str(sound_store), "--events", events])
    assert stop.value.code == 2
    assert f"takes 1 to 64 events, got '{events}'" in capsys.readouterr().err


def test_verify_recomputes_the_config_hash_but_not_under_rules_the_store_predates(sound_store, capsys):
    _edit_json(sound_store / "zarr.json", lambda m: m["attributes"].update({"hepdask:config_hash": "0" * 64}))
    assert "hepdask:config_hash does not match hepdask:config" in _verify_cli(sound_store, capsys)

    def older_rules(meta):  # a cut that this hepdask refuses (a number, not a condition)
        meta["attributes"]["hepdask:config"] = meta["attributes"]["hepdask:config"].replace("E > 0.5", "E")

    _edit_json(sound_store / "zarr.json", older_rules)
    assert "hits: E\n" in zarr.open_group(str(sound_store), mode="r").attrs["hepdask:config"]
    assert store.verify(sound_store) == []


def test_verify_reports_unreadable_array_metadata(sound_store, capsys):
    meta = sound_store / "train" / "image" / "zarr.json"
    meta.write_text(meta.read_text()[:100])
    assert "split 'train': its metadata cannot be read" in _verify_cli(sound_store, capsys)


def test_show_of_an_empty_split_is_one_line(ldmx_data, client, tmp_path, capsys):
    data, _ = ldmx_data
    out = tmp_path / "e.zarr"
    hepdask.build_dataset(from_dict(demo_config(data, out, **{"output.split": {"train": 1.0, "val": 0.0}})),
                          client=client, progress=False)
    assert cli(["show", str(out), "--split", "val"]) == 2
    assert "split 'val' has no events to show" in capsys.readouterr().err


def test_a_staging_area_beside_a_complete_store_is_a_note_not_a_fault(sound_store, capsys):
    store.staging_path(sound_store).mkdir()
    assert cli(["verify", str(sound_store)]) == 0
    assert "ok; note: an interrupted build's staging area is beside it" in capsys.readouterr().out


def test_verify_catches_leftover_temporary_files(sound_store, capsys):
    (sound_store / "val" / "image" / "c.0.0.0.3f2a.partial").write_bytes(b"half a chunk")
    assert "temporary files left by an interrupted write" in _verify_cli(sound_store, capsys)


def test_verify_catches_stale_metadata(sound_store, capsys):
    _edit_json(sound_store / "test" / "label" / "zarr.json", lambda m: m["attributes"].update(flag_values=[7, 8]))
    _edit_json(sound_store / "zarr.json", lambda m: m["attributes"]["hepdask:statistics"]["splits"]["val"]
               .update(events=1))
    out = _verify_cli(sound_store, capsys)
    assert "stale metadata: test/label attributes differ" in out
    assert "statistics say val has 1 events" in out


def _worker_process(address: str) -> subprocess.Popen:
    """One Dask worker without a nanny (nothing restarts it), like a batch job's worker."""
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                             "--no-nanny", "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def one_worker_build(ldmx_data, tmp_path, monkeypatch, caplog):
    """A scheduler, one worker process that the test may kill, and a slow 8-partition build."""
    from distributed import Client, LocalCluster

    from hepdask import cluster

    from .data_generation import SlowReads

    monkeypatch.setattr(cluster, "POLL_SECONDS", 0.1)
    monkeypatch.setattr(cluster, "NO_WORKER_GRACE_SECONDS", 0.3)
    caplog.set_level("INFO", logger="hepdask.build")
    data, _ = ldmx_data
    out = tmp_path / "store.zarr"
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=":0") as local, Client(local) as client:
        client.register_plugin(SlowReads(0.4))
        workers = [_worker_process(local.scheduler_address)]
        try:
            client.wait_for_workers(1, timeout=60)

            def kill_after_first_partition() -> None:
                while _staged_count(store.staging_path(out)) < 1:
                    time.sleep(0.01)
                workers[0].kill()

            threading.Thread(target=kill_after_first_partition, daemon=True).start()
            yield data, out, client, workers
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()


def test_a_build_without_workers_for_worker_timeout_stops_and_says_why(one_worker_build, client, caplog):
    from hepdask.errors import ClusterError

    data, out, slow_client, _ = one_worker_build
    config = from_dict(demo_config(data, out, **{"cluster.worker_timeout": 2}))
    with pytest.raises(ClusterError, match=r"no Dask worker for 2 s \(cluster.worker_timeout\) during the build"):
        hepdask.build_dataset(config, client=slow_client, progress=False)
    assert "the build waits for workers for up to 2 s (cluster.worker_timeout)" in caplog.text
    assert _staged_count(store.staging_path(out)) >= 1, "the partitions staged before the loss are kept"
    assert not store.is_complete(out)
    hepdask.build_dataset(config, client=client, progress=False)
    assert "resuming the interrupted build" in caplog.text
    assert store.verify(out) == []


def test_a_build_goes_on_when_workers_come_back(one_worker_build, client, caplog, tmp_path):
    data, out, slow_client, workers = one_worker_build
    config = from_dict(demo_config(data, out))

    def restart_when_told() -> None:
        deadline = time.monotonic() + 60
        while "no Dask worker for" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        workers.append(_worker_process(slow_client.scheduler.address))

    threading.Thread(target=restart_when_told, daemon=True).start()
    report = hepdask.build_dataset(config, client=slow_client, progress=False)
    assert "worker(s) joined again; the build goes on" in caplog.text
    assert len(workers) == 2
    clean = tmp_path / "clean.zarr"
    hepdask.build_dataset(from_dict(demo_config(data, clean)), client=client, progress=False)
    assert report.events_written > 0
    assert chunk_hashes(out) == chunk_hashes(clean)
    assert store.verify(out) == []


def test_overwrite_never_deletes_what_hepdask_did_not_make(ldmx_data, tmp_path, capsys):
    """--overwrite replaces a hepdask store; a directory of someone's files, or a plain file,
    at the output path is refused whatever the flags, and left as it was."""
    data, _ = ldmx_data
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("precious")
    afile = tmp_path / "notes.txt"
    afile.write_text("precious")
    for output in (thesis, afile):
        path = write_config(tmp_path / "c.yaml", demo_config(data, output, cluster={"workers": 1}))
        for flags in ([], ["--overwrite"]):
            assert cli(["build-dataset", str(path), "--no-progress", *flags]) == 2
            err = capsys.readouterr().err
            assert f"{str(output)!r} exists and is not a hepdask store" in err, err
    assert (thesis / "chapter1.tex").read_text() == "precious"
    assert afile.read_text() == "precious"


def test_an_unwritable_output_is_one_clear_line(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    (tmp_path / "afile").write_text("")
    path = write_config(tmp_path / "c.yaml", demo_config(data, tmp_path / "afile" / "o.zarr"))
    assert cli(["build-dataset", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hepdask: error: cannot create the output") and "afile' is a file, not a directory" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_build_that_failed_before_finishing_anything_does_not_block_the_fixed_config(ldmx_data, client,
                                                                                   tmp_path, capsys):
    """A build whose cluster never had a worker staged nothing: the corrected config builds
    instead of being refused as 'a different config', and nothing claims to resume."""
    from distributed import Client, LocalCluster

    data, _ = ldmx_data
    out = tmp_path / "o.zarr"
    raw = demo_config(data, out, **{"cluster.worker_timeout": 1})
    raw["output"]["chunk_events"] = 7
    with (LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster) as empty,
          pytest.raises(hepdask.HepdaskError, match="no Dask worker")):
        hepdask.build_dataset(from_dict(raw), client=empty, progress=False)
    assert store.staging_path(out).exists() and not store.has_finished_work(store.staging_path(out))
    raw["output"]["chunk_events"] = 11
    report = hepdask.build_dataset(from_dict(raw), client=client, progress=True)
    assert report.events_written > 0
    assert "resuming" not in capsys.readouterr().out
    assert store.verify(out) == []


CTRL_C_SCRIPT = """
import sys, time
from hepdask import build, cli
plain = build._stage

def slow_stage(*args, **kwargs):
    print("staging", flush=True)
    time.sleep(60)  # a long read that Ctrl-C cannot interrupt on a worker thread
    return plain(*args, **kwargs)

build._stage = slow_stage
sys.argv = ["hepdask", *sys.argv[1:]]
cli.entry()
"""


@pytest.mark.parametrize("dashboard", [None, "127.0.0.1:0"], ids=["inline", "worker-thread"])
def test_ctrl_c_stops_a_build_in_this_process_at_once_with_one_line(ldmx_data, tmp_path, dashboard):
    """A one-partition build runs in the hepdask process: inline (Ctrl-C interrupts the task
    itself), or, with a dashboard, on a worker thread of an in-process LocalCluster, whose
    closing used to wait 30 s for the running task after Ctrl-C."""
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "o.zarr", cluster={"dashboard_address": dashboard})
    raw["samples"] = [{**raw["samples"][0], "files": [files["signal"][0]]}]
    path = write_config(tmp_path / "c.yaml", raw)
    process = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, "build-dataset", str(path), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if dashboard is not None:  # the link comes first, on stderr
        assert process.stderr.readline().startswith("Dask dashboard: http://127.0.0.1:")
    assert process.stdout.readline().strip() == "staging"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert time.monotonic() - started < 10
    assert err.strip() == "hepdask: interrupted; the new store is not finalised: run the same command to resume"


@pytest.mark.parametrize("reached", ["finished", "staging", "nothing"])
def test_ctrl_c_after_the_store_is_finished_does_not_ask_for_a_resume(ldmx_data, client, tmp_path, monkeypatch,
                                                                       capsys, reached):
    """A Ctrl-C while the cluster closed or the summary printed said 'not finalised: run the
    same command to resume' of a complete store, which that command then refused to replace;
    one before the build made its staging area (while the cluster started) has nothing to resume."""
    data, _ = ldmx_data
    out = tmp_path / "o.zarr"
    path = write_config(tmp_path / "c.yaml", demo_config(data, out))
    plain = build.build_dataset

    def interrupted(config, **kwargs):
        if reached == "finished":
            plain(config, client=client, **kwargs)
        elif reached == "staging":
            store.staging_path(out).mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_dataset", interrupted)
    assert cli(["build-dataset", str(path), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the dashboard's link, if any
    assert err == {
        "finished": f"hepdask: interrupted after the build had finished: {out} is complete",
        "staging": "hepdask: interrupted; the new store is not finalised: run the same command to resume",
        "nothing": f"hepdask: interrupted before the build began: {out} is as it was",
    }[reached]


def test_ctrl_c_while_the_command_imports_is_one_line(monkeypatch, capsys):
    """The console script imports the build stack first (seconds on a loaded login node);
    a Ctrl-C there printed a 45-line traceback of importlib and zarr."""
    from hepdask import cli as command

    def interrupted(modules):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "import_frozen", interrupted)
    monkeypatch.setattr(sys, "argv", ["hepdask", "build-dataset", "c.yaml"])
    with pytest.raises(SystemExit) as stop:
        command.entry()
    assert stop.value.code == command.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "hepdask: interrupted\n"


def _sigint_blocked_and_ignored() -> tuple[bool, bool]:
    fields = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    return bool(int(fields["SigBlk"], 16) & bit), bool(int(fields["SigIgn"], 16) & bit)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_worker_processes_leave_ctrl_c_to_the_client():
    """Ctrl-C reaches the whole process group; workers that took it printed their own
    tracebacks. They start with SIGINT blocked, and the client's handler and signal mask
    are as before."""
    from hepdask.cluster import connect
    from hepdask.config import Cluster

    before = signal.getsignal(signal.SIGINT)
    with connect(Cluster(workers=1, dashboard_address=None)) as client:
        workers = client.run(_sigint_blocked_and_ignored)
    assert list(workers.values()) == [(True, False)]
    assert signal.getsignal(signal.SIGINT) is before
    assert _sigint_blocked_and_ignored() == (False, False)


def test_ctrl_c_while_the_workers_start_stops_after_the_start_and_closes_the_cluster(monkeypatch):
    """A Ctrl-C in the start used to be ignored, and the build went on. It now waits for
    the start to finish (no half-started cluster), then closes it and interrupts."""
    import distributed

    from hepdask.cluster import connect
    from hepdask.config import Cluster

    started = []

    class Interrupted(distributed.LocalCluster):
        def __init__(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(distributed, "LocalCluster", Interrupted)
    with pytest.raises(KeyboardInterrupt), connect(Cluster(workers=1, dashboard_address=None)):
        pytest.fail("the build went on after a Ctrl-C")
    assert len(started) == 1 and started[0].status.name == "closed"


def test_a_worker_is_quiet_about_a_heartbeat_its_own_closing_cut_off():
    """After a Ctrl-C, a worker whose heartbeat was in flight logged an error with a 40-line
    traceback (dask/distributed#7192); a heartbeat that failed otherwise is still logged."""
    from distributed.comm.core import CommClosedError

    from hepdask.workers import _UserErrorFilter

    def record(err):
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                                 "Failed to communicate with scheduler during heartbeat.", (),
                                 (type(err), err, None))

    quiet = _UserErrorFilter()
    assert not quiet.filter(record(CommClosedError("ConnectionPool closing.")))
    assert quiet.filter(record(CommClosedError("in <TCP (closed)>: Stream is closed")))
    assert quiet.filter(record(OSError("Timed out trying to connect")))


def test_worker_processes_are_quiet_from_their_start():
    """The filter reaches the workers before a build registers its plugins (a Ctrl-C right
    after the start), through the LocalCluster's preload."""
    from hepdask.cluster import connect
    from hepdask.config import Cluster

    def filtered() -> bool:
        from hepdask.workers import _UserErrorFilter

        return any(isinstance(f, _UserErrorFilter) for f in logging.getLogger("distributed.worker").filters)

    with connect(Cluster(workers=1, dashboard_address=None)) as client:
        assert list(client.run(filtered).values()) == [True]


def test_a_dashboard_port_in_use_gives_no_warning(tmp_path):
    """Two builds on one login node: the second's dashboard takes another port, named in
    its link, without Dask's three-line warning."""
    from hepdask.cluster import connect, dashboard_link
    from hepdask.config import Cluster

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = Cluster(workers=1, dashboard_address=f"127.0.0.1:{port}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with connect(spec) as client:
                link = dashboard_link(client, spec)
    assert [str(w.message) for w in caught if "already in use" in str(w.message)] == []
    assert link.startswith("http://127.0.0.1:") and f":{port}/" not in link


def test_a_second_build_of_an_output_being_built_is_refused(ldmx_data, tmp_path):
    """Two builds of one output used to interleave their staging areas and could leave a
    store that verify passed but whose contents were not those of its config."""
    data, _ = ldmx_data
    out = tmp_path / "o.zarr"
    config = from_dict(demo_config(data, out))
    held = rf"output '.*o\.zarr' is being built by hepdask process {os.getpid()} on"
    with store.output_lock(out), pytest.raises(StoreError, match=held):
        hepdask.build_dataset(config, progress=False)
    assert not out.exists() and not store.staging_path(out).exists()
    hepdask.build_dataset(config, progress=False)
    assert store.is_complete(out) and not store.lock_path(out).exists()


def test_a_lock_left_by_a_killed_build_does_not_hold_the_next(tmp_path):
    out = tmp_path / "o.zarr"
    store.lock_path(out).write_text("hepdask process 1 on a-node\n")  # no flock held on it
    with store.output_lock(out):
        assert "hepdask process" in store.lock_path(out).read_text()
    assert not store.lock_path(out).exists()


def test_an_output_path_that_is_a_link_replaces_the_store_it_points_to(sound_store, ldmx_data, tmp_path):
    data, _ = ldmx_data
    link = tmp_path / "link.zarr"
    link.symlink_to(sound_store)
    raw = demo_config(data, link, **{"output.overwrite": True, "output.shuffle": {"enabled": True, "seed": 5}})
    # The dry run looks where the build will: at the store the link points to.
    store.staging_path(sound_store).mkdir()
    (store.staging_path(sound_store) / "notes.txt").write_text("not hepdask's")
    planned = hepdask.build_dataset(from_dict(raw), dry_run=True, progress=False).plan["output_plan"]
    assert planned.startswith(f"the build will refuse: {str(store.staging_path(sound_store))!r} exists and is not")
    shutil.rmtree(store.staging_path(sound_store))
    hepdask.build_dataset(from_dict(raw), progress=False)
    assert link.is_symlink() and store.is_complete(link) and store.verify(sound_store) == []
    assert "seed: 5" in zarr.open_group(str(link), mode="r").attrs["hepdask:config"]  # the new build's
    assert not store.staging_path(link).exists() and not store.staging_path(sound_store).exists()


def test_a_lock_file_this_user_cannot_write_is_still_locked_and_none_at_all_is_no_error(tmp_path, monkeypatch,
                                                                                        caplog):
    """Another user's lock file in a shared directory: locked read-only (its stale text is
    not taken for the holder). One this user cannot open at all: refused, naming it. No lock
    file and a directory this user cannot write: the build goes on unlocked."""
    out = tmp_path / "o.zarr"
    lock = store.lock_path(out)
    lock.write_text("hepdask process 7 on another-node\n")  # stale: left by a killed build
    real_open = os.open
    unreadable = False

    def no_writing(path, flags, *args):
        if str(path).endswith(store.LOCK_SUFFIX) and (unreadable or flags & (os.O_RDWR | os.O_WRONLY)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_writing)
    held = pytest.raises(StoreError, match=r"being built by another build \(its lock file '.*o\.zarr\.hepdask-lock' is")
    with store.output_lock(out), held, store.output_lock(out):
        pass
    assert not lock.exists()
    with store.output_lock(out):
        assert "without a lock" in caplog.text
    lock.write_text("")
    unreadable = True
    with pytest.raises(StoreError, match="this user cannot open it; if no build of that output is running"):
        store.output_lock(out).__enter__()


def test_a_lock_file_is_readable_by_every_user_whatever_the_umask(tmp_path):
    out = tmp_path / "o.zarr"
    previous = os.umask(0o077)
    try:
        with store.output_lock(out):
            assert store.lock_path(out).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_a_table_on_a_narrow_terminal_folds_file_paths_instead_of_cutting_them():
    """On 80 columns two bad files' paths were both cut to '/tmp/.../signal_0000…'."""
    import io

    from hepdask.cli import _table

    paths = [f"/data/users/physicist/run-2026/a-long-directory-name/signal_{i:04d}.root" for i in (7, 8)]
    out = io.StringIO()
    Console(file=out, width=60).print(_table("bad files", ["sample", "file", "error"],
                                             [("signal", p, "OSError: truncated") for p in paths]))
    text = out.getvalue()
    assert "…" not in text

    def folded_in(path: str, text: str) -> bool:  # every character, in order, across the lines
        rest = iter(text)
        return all(c in rest for c in path)

    assert all(folded_in(p, text) for p in paths)
