"""End-to-end builds on small generated ROOT files, checked event by event."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import subprocess
import sys
import textwrap
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uproot
import xarray as xr
import zarr

import hepdask
from hepdask import build, sources, store
from hepdask.cli import PRELOAD
from hepdask.cli import main as cli
from hepdask.config import from_dict
from hepdask.errors import StoreError

from .data_generation import (
    chunk_files,
    demo_config,
    flat_branch_file,
    not_root_file,
    write_config,
    wrong_tree_file,
)


def chunk_hashes(path: Path) -> dict[str, str]:
    """sha256 of every chunk file of every split (root metadata holds times, so it is left out);
    never empty, so that two stores without chunks cannot compare equal."""
    hashes = {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in chunk_files(path)
    }
    assert hashes, f"no chunk files under {path}"
    return hashes


@pytest.fixture(scope="module")
def built(ldmx_data, client, tmp_path_factory):
    data, _ = ldmx_data
    out = tmp_path_factory.mktemp("built") / "store.zarr"
    config = from_dict(demo_config(data, out))
    report = hepdask.build_dataset(config, client=client, progress=False)
    return config, report, out


def test_every_image_equals_histogramdd_of_its_source_hits(built):
    config, report, out = built
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["hepdask:complete"] is True
    labels = {s.name: s.label for s in config.samples}
    sources: dict[str, dict] = {}
    checked = 0
    for split in ("train", "val", "test"):
        ds = xr.open_zarr(str(out), group=split).load()
        edges = [np.asarray(ds[dim].attrs["edges"]) for dim in ("z", "x")]
        images = ds.image.values
        for i in range(ds.sizes["event"]):
            path = str(ds.source_file.values[i])
            if path not in sources:
                sources[path] = uproot.open(path)["ecalHits"].arrays(library="np")
            hits = sources[path]
            entry = int(ds.entry.values[i])
            z, x, energy = hits["z"][entry], hits["x"][entry], hits["E"][entry]
            keep = energy > 0.5
            expected, _ = np.histogramdd(
                np.stack([z[keep], x[keep]], axis=1).astype(np.float64), bins=edges, weights=energy[keep]
            )
            np.testing.assert_array_equal(images[i], expected.astype(np.float32))
            assert int(ds.eventNumber.values[i]) == int(hits["eventNumber"][entry])
            sample = str(ds.sample.values[i])
            assert int(ds.label.values[i]) == labels[sample]
            assert Path(path).name.startswith(sample)
            checked += 1
    assert checked == report.events_written
    assert report.events_written == sum(s["selected"] for s in report.samples.values())


def test_selection_and_statistics_are_reported(built):
    _config, report, out = built
    for sample in report.samples.values():
        assert sample["files"] == 4
        assert sample["read"] == 160
        assert 0 < sample["selected"] <= 160
    assert report.hits["in_image"] <= report.hits["hits"]
    assert set(report.hits["underflow"]) == {"z", "x"}
    stats = zarr.open_group(str(out), mode="r").attrs["hepdask:statistics"]
    assert stats["splits"] == report.splits


def test_store_layout_and_provenance(built):
    config, _report, out = built
    root = zarr.open_group(str(out), mode="r")
    attrs = root.attrs
    assert attrs["hepdask:version"] == hepdask.__version__
    assert attrs["hepdask:config_hash"] == config.content_hash()
    assert hepdask.config.Config.model_validate(__import__("yaml").safe_load(attrs["hepdask:config"])) == config
    manifest = attrs["hepdask:manifest"]
    assert len(manifest) == 8
    assert all(m["status"] == "ok" and m["entries"] == 40 and m["size"] > 0 for m in manifest)
    train = xr.open_zarr(str(out), group="train")
    assert train.image.dims == ("event", "z", "x")
    assert train.z.attrs["units"] == "mm"
    assert len(train.z.attrs["edges"]) == 18
    assert train.image.encoding["chunks"] == (16, 17, 16)
    total = sum(xr.open_zarr(str(out), group=s).sizes["event"] for s in ("train", "val", "test"))
    assert train.sizes["event"] == round(0.8 * total)
    assert not store.staging_path(out).exists()


def test_shuffle_mixes_samples_in_every_chunk(built):
    _, _, out = built
    samples = xr.open_zarr(str(out), group="train").sample.values
    chunks = [samples[i : i + 16] for i in range(0, len(samples) - 15, 16)]
    assert all(len(set(chunk)) == 2 for chunk in chunks)


def test_same_inputs_give_identical_chunks_with_one_and_two_workers(built, ldmx_data, tmp_path):
    _, _, out = built
    data, _ = ldmx_data
    one_worker = from_dict(demo_config(data, tmp_path / "one.zarr", **{"cluster.workers": 1}))
    hepdask.build_dataset(one_worker, progress=False)
    first, second = chunk_hashes(out), chunk_hashes(tmp_path / "one.zarr")
    assert len(first) > 20
    assert first == second


def test_auto_count_images_give_identical_stores_with_one_and_two_workers(ldmx_data, client, tmp_path):
    """``auto``'s trial reads staged events in plan order: the same codec and bytes on any
    number of workers."""
    data, _ = ldmx_data
    counts = {"image.weight": None, "image.dtype": "uint8", "output.chunk_events": 64}
    hepdask.build_dataset(from_dict(demo_config(data, tmp_path / "two.zarr", **counts)), client=client, progress=False)
    hepdask.build_dataset(from_dict(demo_config(data, tmp_path / "one.zarr", **counts, **{"cluster.workers": 1})),
                          progress=False)
    labels = [store.compressor_label(zarr.open_group(str(tmp_path / name), mode="r")["train"]["image"])
              for name in ("two.zarr", "one.zarr")]
    assert labels[0] == labels[1]
    assert chunk_hashes(tmp_path / "two.zarr") == chunk_hashes(tmp_path / "one.zarr")


def test_a_build_inside_this_process_writes_the_same_chunks(built, ldmx_data, tmp_path):
    """cluster.processes false: one worker thread in the hepdask process, the same bytes."""
    _, _, out = built
    data, _ = ldmx_data
    here = from_dict(demo_config(data, tmp_path / "here.zarr", cluster={"processes": False, "dashboard_address": None}))
    hepdask.build_dataset(here, progress=False)
    assert chunk_hashes(tmp_path / "here.zarr") == chunk_hashes(out)


@pytest.fixture
def connected(monkeypatch) -> list[bool]:
    """For every cluster a build connects to: whether it runs in this process."""
    from hepdask import cluster

    seen: list[bool] = []
    connect = cluster.connect

    def spy(spec, **kwargs):
        seen.append(kwargs["in_process"])
        return connect(spec, **kwargs)

    monkeypatch.setattr(cluster, "connect", spy)
    return seen


def test_a_plan_of_one_partition_runs_inside_this_process(ldmx_data, tmp_path, connected):
    data, files = ldmx_data
    one_file = demo_config(data, tmp_path / "auto.zarr", **{"read.step_size": 1000})
    one_file["samples"] = [{"name": "signal", "label": 1, "files": [files["signal"][0]]}]
    here = hepdask.build_dataset(from_dict(one_file), progress=False)
    one_file["output"]["path"] = str(tmp_path / "processes.zarr")
    one_file["cluster"].update(processes=True, dashboard_address="127.0.0.1:0")
    processes = hepdask.build_dataset(from_dict(one_file), progress=False)
    assert connected == [True, False]
    # ``dashboard_address: auto``: none for the worker thread in this process.
    assert here.dashboard is None and processes.dashboard.startswith("http://127.0.0.1:")
    assert len(chunk_hashes(tmp_path / "auto.zarr")) > 2
    assert chunk_hashes(tmp_path / "auto.zarr") == chunk_hashes(tmp_path / "processes.zarr")


def test_a_small_build_runs_inline_without_importing_dask(ldmx_data, tmp_path):
    """A one-file build without a dashboard runs its tasks in the calling thread
    (``cluster.InlineClient``): no scheduler, and neither Dask nor distributed is imported."""
    data, files = ldmx_data
    one_file = demo_config(data, tmp_path / "inline.zarr", **{"read.step_size": 1000})
    one_file["samples"] = [{"name": "signal", "label": 1, "files": [files["signal"][0]]}]
    code = textwrap.dedent("""
        import json, sys
        import hepdask
        from hepdask.config import from_dict
        report = hepdask.build_dataset(from_dict(json.loads(sys.argv[1])), progress=False)
        print(report.events_written, "dask" in sys.modules, "distributed" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(one_file)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    n_events = uproot.open(files["signal"][0])["ecalHits"].num_entries
    assert done.stdout.split() == [str(n_events), "False", "False"]
    assert xr.open_zarr(tmp_path / "inline.zarr", group="train").sizes["event"] > 0


def test_an_in_process_build_with_a_dashboard_runs_on_a_dask_worker_thread(ldmx_data, tmp_path, connected):
    """A dashboard needs a scheduler: ``processes: false`` with a dashboard address runs the
    tasks on one worker thread of an in-process LocalCluster, and writes the same chunks; the
    reported link is where that dashboard listens."""
    from hepdask import cluster
    from hepdask.config import Cluster

    data, files = ldmx_data
    one_file = demo_config(data, tmp_path / "inline.zarr", **{"read.step_size": 1000})
    one_file["samples"] = [{"name": "signal", "label": 1, "files": [files["signal"][0]]}]
    inline = hepdask.build_dataset(from_dict(one_file), progress=False)
    one_file["output"]["path"] = str(tmp_path / "dashboard.zarr")
    one_file["cluster"].update(processes=False, workers=None, dashboard_address="127.0.0.1:0")
    shown = hepdask.build_dataset(from_dict(one_file), progress=False)
    assert connected == [True, True]
    assert inline.dashboard is None and shown.dashboard.startswith("http://127.0.0.1:")
    assert chunk_hashes(tmp_path / "inline.zarr") == chunk_hashes(tmp_path / "dashboard.zarr")
    with cluster.connect(Cluster(processes=False, dashboard_address="127.0.0.1:0"), in_process=True) as client:
        link = cluster.dashboard_link(client, Cluster(processes=False, dashboard_address="127.0.0.1:0"))
        with urllib.request.urlopen(link, timeout=10) as page:  # the link leads to the dashboard
            assert page.status == 200


def test_an_in_process_build_with_a_performance_report_runs_on_a_dask_worker_thread(ldmx_data, tmp_path, capsys):
    """Dask's performance report needs a scheduler: a one-file build asking for one runs on an
    in-process LocalCluster, not inline, and saves the report."""
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "p.zarr", cluster={})
    raw["samples"] = [{"name": "signal", "label": 1, "files": [files["signal"][0]]}]
    path = write_config(tmp_path / "c.yaml", raw)
    assert cli(["build-dataset", str(path), "--no-progress", "--performance-report"]) == 0
    assert "Dask Performance Report" in (tmp_path / "p.zarr.performance-report.html").read_text()


def test_a_dashboard_listening_everywhere_keeps_dasks_link():
    """``dashboard_link`` names the listening host of an in-process dashboard, unless it
    listens on every interface: then Dask's link (the machine's address) is the right one."""
    from hepdask import cluster
    from hepdask.config import Cluster

    everywhere = Cluster(processes=False, dashboard_address="0.0.0.0:0")
    with cluster.connect(everywhere, in_process=True) as client:
        assert not isinstance(client, cluster.InlineClient)
        assert cluster.dashboard_link(client, everywhere) == client.dashboard_link
        assert "0.0.0.0" not in client.dashboard_link


def test_a_build_freezes_dask_only_in_a_process_that_froze_its_imports():
    """The console script froze the build stack's imports (``heap.import_frozen``); a build
    there freezes Dask's client side with them. A user's own ``gc.freeze`` does not count:
    their heap is theirs, and garbage made before the build stays collectable."""
    code = textwrap.dedent("""
        import gc, sys
        from hepdask import cluster, heap
        from hepdask.config import Cluster
        if sys.argv[1] == "console":
            heap.import_frozen(heap.BUILD_STACK)
        else:
            import hepdask.build
            gc.freeze()
        before = gc.get_freeze_count()
        with cluster.connect(Cluster(processes=False, dashboard_address="127.0.0.1:0"), in_process=True):
            pass
        print(gc.get_freeze_count() > before + 10_000)
    """)
    for kind, grows in (("console", "True"), ("user", "False")):
        done = subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [grows], kind


def test_inline_tasks_run_when_waited_for_in_submission_order():
    """``cluster.InlineClient``: a task runs when it is waited for, once; a failure is its
    future's (status, exception, ``(type, exception, traceback)`` with the results), a
    cancelled task never runs, and ``gather`` raises a failed task's error."""
    from hepdask.cluster import InlineClient, as_completed

    ran = []

    def task(name):
        ran.append(name)
        if name == "bad":
            raise ValueError(name)
        return name.upper()

    client = InlineClient()
    futures = [client.submit(task, name, key=name) for name in ("a", "bad", "b", "never")]
    assert ran == []
    client.cancel(futures[3:])
    results = []
    waiting = as_completed(client, futures[:3], with_results=True)
    for future, result in waiting:
        results.append((future.key, future.status, result if future.status == "finished" else result[1]))
        if future.key == "a":
            waiting.add(futures[3])
    assert ran == ["a", "bad", "b"]
    assert results[0] == ("a", "finished", "A") and results[2] == ("b", "finished", "B")
    assert results[1][:2] == ("bad", "error") and isinstance(results[1][2], ValueError)
    assert isinstance(futures[1].exception(), ValueError) and futures[1].exception().__traceback__ is not None
    assert [f.key for f in as_completed(client, futures)] == ["a", "bad", "b"] and ran == ["a", "bad", "b"]
    with pytest.raises(ValueError, match="bad"):
        client.gather(futures[:2])
    assert client.gather(futures[:1]) == ["A"] and client.nthreads() == {"inline": 1}
    # Dask's own options are not the task's; Ctrl-C in a task propagates and cancels it.
    assert client.submit(task, "c", key="c", pure=False, retries=2).result() == "C"

    def interrupted():
        raise KeyboardInterrupt

    stopped = client.submit(interrupted, key="stopped")
    with pytest.raises(KeyboardInterrupt):
        stopped.result()
    assert stopped.status == "cancelled" and stopped.run() is stopped


def test_a_plan_of_few_small_files_runs_inside_this_process(ldmx_data, tmp_path, connected, monkeypatch):
    """With cluster.workers unset, a few small files are built on one worker thread here
    (starting worker processes would cost more than the build); past IN_PROCESS_BYTES, or
    past IN_PROCESS_FILES files, on worker processes. The bytes are the same either way."""
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "small.zarr", cluster={"dashboard_address": None})
    small = hepdask.build_dataset(from_dict(raw), progress=False)
    n_files = len(files["signal"]) + len(files["background"])
    assert n_files > 1 and small.n_partitions == n_files
    monkeypatch.setattr(build, "IN_PROCESS_BYTES", 0)
    raw["output"]["path"] = str(tmp_path / "large.zarr")
    hepdask.build_dataset(from_dict(raw), progress=False)
    monkeypatch.setattr(build, "IN_PROCESS_BYTES", 2**40)
    monkeypatch.setattr(build, "IN_PROCESS_FILES", n_files - 1)
    assert not build._small_input(sources.plan([("s", 0, files["signal"] + files["background"])]))
    assert connected == [True, False]
    assert chunk_hashes(tmp_path / "small.zarr") == chunk_hashes(tmp_path / "large.zarr")


def _set_store_constant(name, value):
    from hepdask import store

    previous = getattr(store, name)
    setattr(store, name, value)
    return previous


@contextmanager
def store_constant_on_workers(client, name, value):
    """``hepdask.store.<name> = value`` in every worker (they stage and write) for the block."""
    previous = client.run(_set_store_constant, name, value)
    try:
        yield
    finally:
        for old in set(previous.values()):
            client.run(_set_store_constant, name, old)


def test_write_tasks_gathering_one_chunk_at_a_time_write_the_same_chunks(built, ldmx_data, client, tmp_path):
    _, _, out = built
    data, _ = ldmx_data
    with store_constant_on_workers(client, "GATHER_BYTES", 1):
        hepdask.build_dataset(from_dict(demo_config(data, tmp_path / "small-spans.zarr")), client=client,
                              progress=False)
    assert chunk_hashes(tmp_path / "small-spans.zarr") == chunk_hashes(out)


def test_partitions_grouped_into_tasks_write_the_same_chunks(built, ldmx_data, client, tmp_path):
    """8 files, 3 a stage task (groups of 3, 3, 2): the same bytes as one file a task."""
    config, _, out = built
    data, _ = ldmx_data
    assert build.partitions_per_task(config.read.partitions_per_task, 8, 2) == 1
    grouped = from_dict(demo_config(data, tmp_path / "grouped.zarr", **{"read.partitions_per_task": 3}))
    assert grouped.content_hash() == from_dict(demo_config(data, tmp_path / "grouped.zarr")).content_hash()
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        report = hepdask.build_dataset(grouped, client=client, progress=False)
    assert report.n_partitions == 8
    assert len({t["key"] for t in stream.data if str(t["key"]).startswith("stage-")}) == 3
    assert chunk_hashes(tmp_path / "grouped.zarr") == chunk_hashes(out)


def test_auto_grouping_keeps_every_worker_busy():
    per_task = build.partitions_per_task
    assert per_task("auto", 200, 2) == 12  # 17 tasks: 8 or more a worker
    assert per_task("auto", 10_000, 2) == build.MAX_PARTITIONS_PER_TASK
    assert per_task("auto", 10_000, 100) == 12
    assert per_task("auto", 10, 2) == 1
    assert per_task("auto", 50, 0) == 6  # no worker yet (SLURM jobs pending): as for one
    assert per_task(5, 10, 2) == 5


def test_images_staged_dense_or_sparse_give_the_same_chunks(built, ldmx_data, client, tmp_path):
    config, _, out = built
    data, _ = ldmx_data
    # The demo's energy images are mostly zeros: staged sparse by default.
    partition = sources.plan([(s.name, s.label, s.files) for s in config.samples])[0]
    job = dataclasses.replace(build.Job.from_config(config), staging=str(tmp_path / "staging"))
    record = build.process_partition(partition, job)
    assert record["arrays"]["image"].get("sparse") is True
    assert not record["arrays"]["entry"].get("sparse")

    with store_constant_on_workers(client, "SPARSE_MAX_FRACTION", -1.0):  # nothing pays: all dense
        hepdask.build_dataset(from_dict(demo_config(data, tmp_path / "dense.zarr")), client=client, progress=False)
    assert chunk_hashes(tmp_path / "dense.zarr") == chunk_hashes(out)


def test_unshuffled_split_keeps_source_order(ldmx_data, client, tmp_path):
    data, _ = ldmx_data
    config = from_dict(demo_config(data, tmp_path / "s.zarr", **{"output.shuffle": False}))
    hepdask.build_dataset(config, client=client, progress=False)
    # Source order puts runs of label-0 events into whole chunks: written all the same.
    assert store.verify(tmp_path / "s.zarr") == []
    ds = xr.open_zarr(str(tmp_path / "s.zarr"), group="train")
    keys = list(zip(ds.source_file.values.tolist(), ds.entry.values.tolist()))
    order = {s: i for i, s in enumerate(sorted({k[0] for k in keys}, key=lambda f: ("background" in f, f)))}
    assert keys == sorted(keys, key=lambda k: (order[k[0]], k[1]))


@pytest.mark.parametrize("fmt", ["xyz", "z_split"])
def test_ldmx_formats_build(ldmx_data, client, tmp_path, fmt):
    data, _ = ldmx_data
    axes = [
        {"field": "x", "bins": 8, "range": [-80, 80]},
        {"field": "y", "bins": 8, "range": [-80, 80]},
        {"field": "z", "bins": 8 if fmt == "xyz" else 4, "range": [235, 605] if fmt == "xyz" else [240, 700],
         **({} if fmt == "xyz" else {"scale": "log"})},
    ]
    config = from_dict(demo_config(data, tmp_path / "f.zarr", **{"image.axes": axes, "image.format": fmt,
                                                                 "image.weight": None, "image.dtype": "uint8"}))
    hepdask.build_dataset(config, client=client, progress=False)
    ds = hepdask.open_dataset(tmp_path / "f.zarr", "val")
    if fmt == "xyz":
        assert ds.image.dims == ("event", "u", "v", "projection")
        assert ds.projection.values.tolist() == ["xy", "xz", "yz"]
        assert ds.image.shape[1:] == (8, 8, 3)
        totals = ds.image.values.sum(axis=(1, 2)).astype(int)
        assert (totals[:, 0] == totals[:, 1]).all() and (totals[:, 1] == totals[:, 2]).all()
    else:
        assert ds.image.dims == ("event", "x", "y", "z")
        assert ds.z.attrs["scale"] == "log"


def test_dry_run_writes_nothing(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    path = write_config(tmp_path / "c.yaml", demo_config(data, tmp_path / "out.zarr"))
    assert cli(["build-dataset", str(path), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["partitions"] == 8
    assert plan["estimated_events"] == 320
    assert plan["image_shape"] == [17, 16]
    assert not (tmp_path / "out.zarr").exists()
    assert not store.staging_path(tmp_path / "out.zarr").exists()


def test_dry_run_names_the_compressor_auto_picks_for_each_image(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    counts = {"image.weight": None, "image.dtype": "uint8"}
    rule = "blosc-lz4 or zstd (auto: blosc-lz4 if a trial of the first events stores them at most 1.5x larger than zstd)"
    for changes, codec in (({}, "zstd"), (counts, rule),
                           ({**counts, "output.compressor": {"name": "zstd"}}, "zstd"),
                           ({**counts, "output.compressor": {"name": "blosc-lz4"}}, "blosc-lz4")):
        path = write_config(tmp_path / "c.yaml", demo_config(data, tmp_path / "out.zarr", **changes))
        assert cli(["build-dataset", str(path), "--dry-run"]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("image: shape"))
        assert line.endswith(f"events per chunk, {codec}"), line


def test_auto_chooses_a_count_images_compressor_by_a_trial_of_the_builds_first_chunk(ldmx_data, tmp_path,
                                                                                       monkeypatch):
    import hepdask
    from hepdask import store
    from hepdask.config import from_dict

    data, _ = ldmx_data
    tried = []
    original = store.compressor_name

    def recording(name, dtype, sample=None, level=1):
        chosen = original(name, dtype, sample, level)
        if sample is not None:
            tried.append((sample, chosen))
        return chosen

    monkeypatch.setattr(store, "compressor_name", recording)
    counts = {"image.weight": None, "image.dtype": "uint8", "output.chunk_events": 64}
    hepdask.build_dataset(from_dict(demo_config(data, tmp_path / "out.zarr", **counts)), progress=False)
    ((sample, chosen),) = tried  # the image only: per-event arrays get no trial
    assert sample.dtype == np.uint8 and sample.shape == (64, 17, 16) and sample.any()
    image = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["train"]["image"]
    assert store.compressor_label(image) == f"{chosen}-1"
    assert chosen == "zstd"  # clustered shower hits: LZ4 would store them ~1.8x larger
    # Where the trial finds LZ4 small enough, the build takes it.
    monkeypatch.setattr(store, "AUTO_BLOSC_SIZE_LIMIT", 100.0)
    hepdask.build_dataset(from_dict(demo_config(data, tmp_path / "b.zarr", **counts)), progress=False)
    image = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["train"]["image"]
    assert store.compressor_label(image) == "blosc-lz4-1"
    tried.clear()
    named = {**counts, "output.compressor": {"name": "zstd"}}
    hepdask.build_dataset(from_dict(demo_config(data, tmp_path / "z.zarr", **named)), progress=False)
    assert tried == []  # a named compressor needs no trial


def test_cli_build_and_info(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    path = write_config(tmp_path / "c.yaml", demo_config(data, tmp_path / "out.zarr"))
    assert cli(["build-dataset", str(path), "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "events/s" in out
    assert cli(["info", str(tmp_path / "out.zarr"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["splits"]) == {"train", "val", "test"}
    assert info["samples"]["signal"]["files"] == 4
    assert info["splits"]["train"]["image_shape"] == [17, 16]
    assert info["splits"]["train"]["compressor"] == "zstd-1"  # auto, for float32 images
    assert cli(["info", str(tmp_path / "out.zarr")]) == 0
    assert "image compressor: zstd-1\n" in capsys.readouterr().out


def test_cli_start_up_imports_only_what_the_command_needs():
    """``hepdask --help``, ``hepdask info`` and the tf.data reader start without numba, uproot
    or Dask; the public names and submodules still resolve on first use."""
    code = (
        "import sys, hepdask.cli, hepdask.store, hepdask.tfdata; "
        "print(*[m in sys.modules for m in ('numba', 'uproot', 'awkward', 'distributed', 'pydantic')]); "
        "print(callable(hepdask.store.verify), callable(hepdask.build_dataset), 'numba' in sys.modules)"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["False False False False False", "True True True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = hepdask.nope
    modules = {p.stem for p in Path(hepdask.__file__).parent.glob("*.py")} - {"__init__"}
    assert modules == hepdask._SUBMODULES  # a new module is reachable as hepdask.<name> too


def test_console_script_builds_with_the_start_up_heap_frozen_and_fails_in_one_line(ldmx_data, tmp_path):
    """``hepdask`` (``cli.entry``) imports the build stack with the collector paused and frozen,
    builds as ``main`` does, and reports a hepdask error as one line with status 2."""
    data, files = ldmx_data
    one_file = demo_config(data, tmp_path / "one.zarr", **{"read.step_size": 1000})
    one_file["samples"] = [{"name": "signal", "label": 1, "files": [files["signal"][0]]}]
    # Records, in the console script's process, whether the collector ran while the PRELOAD
    # modules were imported, how much was frozen when the command started, and at exit.
    code = textwrap.dedent("""
        import atexit, gc, importlib, sys
        from hepdask import cli
        import_module, run, seen = importlib.import_module, cli.run, {}
        def spy_import(name, *args, **kwargs):
            seen.setdefault(name, gc.isenabled())
            return import_module(name, *args, **kwargs)
        def spy_run(args):
            seen["frozen before the command"] = gc.get_freeze_count()
            return run(args)
        importlib.import_module, cli.run = spy_import, spy_run
        atexit.register(lambda: print(
            [seen[name] for name in cli.PRELOAD["build-dataset"]],
            seen["frozen before the command"] > 10**5,
            gc.get_freeze_count() > seen["frozen before the command"]))
        sys.argv[0] = "hepdask"
        cli.entry()
    """)
    good = write_config(tmp_path / "good.yaml", one_file)
    done = subprocess.run([sys.executable, "-c", code, "build-dataset", str(good), "--no-progress"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    paused = [False] * len(PRELOAD["build-dataset"])
    assert "wrote" in done.stdout and done.stdout.splitlines()[-1] == f"{paused} True True"
    assert store.is_complete(tmp_path / "one.zarr") and store.verify(tmp_path / "one.zarr") == []
    one_file["samples"][0]["files"] = [str(tmp_path / "missing.root")]
    bad = write_config(tmp_path / "bad.yaml", one_file)
    failed = subprocess.run([sys.executable, "-c", code, "build-dataset", str(bad), "--no-progress"],
                            capture_output=True, text=True, check=False)
    assert failed.returncode == 2
    assert failed.stderr.startswith("hepdask: error:") and "missing.root" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------
# bad input: one clear line, exit status 2, no store that looks complete


def _run_bad(tmp_path, capsys, config: dict, *extra: str) -> str:
    path = write_config(tmp_path / "bad.yaml", config)
    code = cli(["build-dataset", str(path), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    # Messages such as the dashboard link may come first; the error is one line, the last.
    assert err.splitlines()[-1].startswith("hepdask: error:") and err.count("hepdask: error:") == 1, err
    assert not store.is_complete(Path(config["output"]["path"]))
    return err.splitlines()[-1]


def test_glob_matching_nothing(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["samples"][0]["files"] = str(data / "nothing_*.root")
    err = _run_bad(tmp_path, capsys, config)
    assert "sample 'signal'" in err and "nothing_*.root" in err and "matches no file" in err


def test_missing_file(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["samples"][1]["files"] = [str(data / "gone.root")]
    err = _run_bad(tmp_path, capsys, config)
    assert "gone.root" in err and "does not exist" in err


def test_file_that_is_not_root(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    bogus = tmp_path / "bogus.root"
    bogus.write_text("this is not a ROOT file\n" * 50)
    config = demo_config(data, tmp_path / "o.zarr")
    config["samples"][1]["files"] = [str(bogus)]
    err = _run_bad(tmp_path, capsys, config)
    assert "bogus.root: not a ROOT file (it starts with b'this', not b'root')" in err
    small = tmp_path / "README.root"  # short enough that uproot fails on its first chunk
    small.write_text("notes\n")
    config["samples"][1]["files"] = [str(small)]
    assert "README.root: not a ROOT file" in _run_bad(tmp_path, capsys, config)


def test_missing_tree_suggests_close_match(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["samples"][1]["files"] = [wrong_tree_file(tmp_path / "tree.root")]
    err = _run_bad(tmp_path, capsys, config)
    assert "tree.root" in err and "no tree 'ecalHits'" in err and "did you mean 'ecalHitz'" in err


def test_missing_branch_suggests_close_match(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["hits"]["E"] = "Energy"
    err = _run_bad(tmp_path, capsys, config)
    assert "branch 'Energy' not in tree 'ecalHits'" in err and "signal_00000.root" in err


def test_flat_branch_where_jagged_is_needed(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["samples"] = [{"name": "flat", "label": 0, "files": flat_branch_file(tmp_path / "flat.root")}]
    err = _run_bad(tmp_path, capsys, config)
    assert "flat.root" in err and "has one value per event" in err and "needs a jagged branch" in err


def _fixed_array_event_file(path: Path) -> str:
    """LDMX-like hits and an eventNumber of three numbers per event (``int64_t[3]``)."""
    import awkward as ak

    hits = ak.Array([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]])
    branches = {name: ak.values_astype(hits * (k + 1), np.float32) for k, name in enumerate("xyzE")}
    with uproot.recreate(path) as file:
        file.mktree("ecalHits", {**dict.fromkeys("xyzE", "var * float32"), "eventNumber": ("int64", (3,))})
        file["ecalHits"].extend({**branches, "eventNumber": np.arange(9).reshape(3, 3)})
    return str(path)


def test_an_event_branch_of_fixed_arrays_needs_an_index(ldmx_data, tmp_path, capsys):
    """Taken whole, it used to fail in the write phase (after an old store was replaced);
    an element of it is read like an element of a jagged branch."""
    data, files = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr", **{"selection.events": None, "selection.hits": None})
    config["samples"][1]["files"] = [files["background"][0], _fixed_array_event_file(tmp_path / "fixed.root")]
    err = _run_bad(tmp_path, capsys, config, "--workers", "1")
    assert "fixed.root: event.eventNumber: branch 'eventNumber' is an array of [3] per event" in err
    assert "pick one element per event, e.g. 'eventNumber[0]'" in err
    config["samples"] = [{"name": "fixed", "label": 0, "files": str(tmp_path / "fixed.root")}]
    config["event"] = {"eventNumber": "eventNumber[1]"}
    config["output"].update(split={"train": 1.0}, overwrite=True)  # the failed build's staging area is there
    hepdask.build_dataset(from_dict(config), progress=False)
    stored = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["train"]
    assert sorted(stored["eventNumber"][:].tolist()) == [1, 4, 7]


def test_bad_file_found_by_a_worker_fails_the_build(ldmx_data, tmp_path, capsys):
    """The first file of each sample is probed on the client; a bad later one fails on a worker."""
    data, files = ldmx_data
    bogus = tmp_path / "late.root"
    bogus.write_bytes(b"\0" * 4096)
    config = demo_config(data, tmp_path / "o.zarr")
    config["samples"][0]["files"] = [*files["signal"], str(bogus)]
    err = _run_bad(tmp_path, capsys, config, "--workers", "1")
    assert "late.root" in err


def test_config_typo_is_named_with_suggestion(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["output"]["chunk_event"] = 10
    err = _run_bad(tmp_path, capsys, config)
    assert "output.chunk_event" in err and "did you mean 'chunk_events'" in err


def test_existing_output_needs_overwrite(built, ldmx_data, tmp_path, capsys):
    _, _, out = built
    data, _ = ldmx_data
    before = chunk_hashes(out)
    path = write_config(tmp_path / "c.yaml", demo_config(data, out))
    assert cli(["build-dataset", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "a complete store" in err
    assert chunk_hashes(out) == before


def test_overwrite_keeps_the_old_store_until_the_new_one_is_written(ldmx_data, tmp_path, capsys):
    """--overwrite replaces a complete store only once the new build has read its inputs: a
    bad input file found while staging leaves the old store complete and unchanged."""
    data, files = ldmx_data
    out = tmp_path / "o.zarr"
    config = demo_config(data, out)
    config["samples"][0]["files"] = files["signal"][:2]
    config["samples"][1]["files"] = files["background"][:2]
    path = write_config(tmp_path / "c.yaml", config)
    assert cli(["build-dataset", str(path), "--no-progress"]) == 0
    before = chunk_hashes(out)
    assert len(before) > 2
    bogus = tmp_path / "late.root"
    bogus.write_bytes(b"\0" * 4096)
    config["samples"][0]["files"] = [*files["signal"][:2], str(bogus)]
    write_config(path, config)
    assert cli(["build-dataset", str(path), "--no-progress", "--overwrite"]) == 2
    assert "late.root" in capsys.readouterr().err
    assert store.is_complete(out) and chunk_hashes(out) == before
    # The failed build's staged partitions stay for a rerun; the old store is sound, and
    # verify says it is, with a note of the staging area beside it.
    assert store.verify(out) == [] and "staging area is beside it" in store.staging_note(out)
    config["samples"][0]["files"] = files["signal"][:3]
    write_config(path, config)
    assert cli(["build-dataset", str(path), "--no-progress", "--overwrite"]) == 0
    assert store.is_complete(out) and chunk_hashes(out) != before


def test_an_interrupted_overwrite_resumes_and_then_replaces_the_old_store(ldmx_data, tmp_path, monkeypatch):
    """A build allowed to replace a complete store, stopped after staging, resumes when the
    same command runs again (with or without --overwrite given again, as any interrupted
    build): the staged partitions are reused and the old store is replaced once written."""
    data, files = ldmx_data
    out = tmp_path / "o.zarr"
    raw = demo_config(data, out, cluster={"processes": False})  # the patches reach the tasks
    raw["samples"][0]["files"] = files["signal"][:2]
    raw["samples"][1]["files"] = files["background"][:2]
    hepdask.build_dataset(from_dict(raw), progress=False)
    before = chunk_hashes(out)
    raw["samples"][0]["files"] = files["signal"][:3]
    assign = store.assign

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "assign", stop)
    with pytest.raises(KeyboardInterrupt):
        hepdask.build_dataset(from_dict({**raw, "output": {**raw["output"], "overwrite": True}}), progress=False)
    assert store.is_complete(out) and chunk_hashes(out) == before  # the old store, untouched
    monkeypatch.setattr(store, "assign", assign)
    staged = []
    stage = build._stage
    monkeypatch.setattr(build, "_stage", lambda partition, job: staged.append(partition) or stage(partition, job))
    report = hepdask.build_dataset(from_dict(raw), progress=False)
    assert staged == [] and report.samples["signal"]["files"] == 3
    assert store.is_complete(out) and chunk_hashes(out) != before and store.verify(out) == []
    # A complete store with no interrupted build beside it still needs --overwrite.
    with pytest.raises(StoreError, match="a complete store"):
        hepdask.build_dataset(from_dict(raw), progress=False)
    # The same again, the rerun given --overwrite too: it resumes as well.
    before = chunk_hashes(out)
    raw["samples"][1]["files"] = files["background"][:3]
    raw["output"]["overwrite"] = True
    monkeypatch.setattr(store, "assign", stop)
    with pytest.raises(KeyboardInterrupt):
        hepdask.build_dataset(from_dict(raw), progress=False)
    monkeypatch.setattr(store, "assign", assign)
    staged.clear()
    hepdask.build_dataset(from_dict(raw), progress=False)
    assert staged == [] and store.is_complete(out) and chunk_hashes(out) != before


def test_write_tasks_own_disjoint_whole_chunks_that_cover_each_split(ldmx_data, tmp_path, monkeypatch):
    """No two tasks ever write into the same Zarr chunk: the build's write tasks take
    consecutive runs of whole chunks that do not overlap and leave no event out."""
    data, _ = ldmx_data
    raw = demo_config(data, tmp_path / "w.zarr", cluster={"processes": False})  # the patch reaches the tasks
    raw["output"]["chunk_events"] = 4
    calls: dict[str, list[tuple[int, int]]] = {}
    write = store.write_chunks

    def recording(path, split, ranges, *args, **kwargs):
        calls.setdefault(split, []).append((ranges[0][0], ranges[-1][1]))
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges)), "a task's chunks are consecutive"
        return write(path, split, ranges, *args, **kwargs)

    monkeypatch.setattr(store, "write_chunks", recording)
    report = hepdask.build_dataset(from_dict(raw), progress=False)
    per_chunk = 4 * store.EVENT_ARRAY_CHUNKS  # a task owns whole chunks of the coarser per-event arrays
    for split, spans in calls.items():
        size = report.splits[split]["events"]
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(spans))  # no gap, no overlap
        assert all(start % per_chunk == 0 for start, _ in spans)
    assert set(calls) == set(report.splits) and len(calls["train"]) > 1


def test_local_cluster_over_tls_binds_to_loopback(ldmx_data, tmp_path):
    """cluster.tls.temporary encrypts scheduler and worker traffic; everything stays on 127.0.0.1."""
    from hepdask.cluster import connect

    data, _ = ldmx_data
    config = from_dict(demo_config(data, tmp_path / "tls.zarr", cluster={"workers": 1, "tls": {"temporary": True},
                                                                        "dashboard_address": "127.0.0.1:0"}))
    with connect(config.cluster) as client:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert all(addr.startswith("tls://127.0.0.1:") for addr in client.scheduler_info()["workers"])
        report = hepdask.build_dataset(config, client=client, progress=False)
    assert report.events_written > 0


def test_performance_report_is_saved_next_to_the_store(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    path = write_config(tmp_path / "c.yaml", demo_config(data, tmp_path / "p.zarr",
                                                         cluster={"workers": 1, "dashboard_address": "127.0.0.1:0"}))
    assert cli(["build-dataset", str(path), "--json", "--performance-report"]) == 0
    captured = capsys.readouterr()
    # Messages go to stderr: stdout is the report alone, JSON that parses.
    assert "Dask dashboard: http://127.0.0.1:" in captured.err
    written = json.loads(captured.out)["splits"]
    assert sum(n for counts in written.values() for n in counts.values()) > 0
    report = tmp_path / "p.zarr.performance-report.html"
    assert report.stat().st_size > 10_000
    assert "Dask Performance Report" in report.read_text()


def _bogus_stage_result(key: str) -> dict:
    return {"key": key, "bad": {"exception": "Stale", "message": "a result from another build"}}


def test_a_client_that_holds_other_builds_results_does_not_mix_them_in(ldmx_data, client, tmp_path):
    """Task keys are unique per build: results the scheduler still holds under another build's
    keys (here planted under the keys builds used to share) are never handed back."""
    data, _ = ldmx_data
    config = from_dict(demo_config(data, tmp_path / "k.zarr"))
    held = [client.submit(_bogus_stage_result, f"p{i:07d}", key=f"stage-p{i:07d}") for i in range(8)]
    client.gather(held)
    report = hepdask.build_dataset(config, client=client, progress=False)
    assert report.bad_files == []
    assert sum(s["selected"] for s in report.samples.values()) == report.events_written > 0
    del held


def test_local_cluster_leaves_the_client_environment_alone(monkeypatch):
    # distributed's Nanny os.environ.update()s its pre-spawn environment in the client process;
    # a NUMBA_NUM_THREADS left behind there breaks the client's next numba compilation.
    import os

    from hepdask import cluster
    from hepdask.config import Cluster

    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    for name in ("OMP_NUM_THREADS", "PYTHONHASHSEED", "__DASK_PARENT_PID"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    with cluster.connect(Cluster(workers=1, dashboard_address=":0"), say=lambda _: None, log_directory=None) as client:
        assert client.run(lambda: os.environ["NUMBA_NUM_THREADS"]) == dict.fromkeys(client.scheduler_info()["workers"], "1")
        # Nor OMP_NUM_THREADS=1 and the like, which would make a notebook's later work single-threaded.
        assert dict(os.environ) == before
    assert dict(os.environ) == before


def test_workers_get_the_malloc_tuning(built, client):
    """The build registers hepdask.workers.TunedMalloc, so restarted workers get it too."""
    from hepdask import workers

    plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
    assert all(workers.TunedMalloc.name in names for names in plugins.values()), plugins


def test_a_later_build_on_the_same_client_leaves_the_stateless_worker_plugins_set_up(built, client):
    """The stateless plugins are idempotent: a build does not send them to every worker again
    (a scheduler round trip and a setup on each worker per plugin). FrozenImports, which
    names the building client's process, is sent again."""
    from hepdask import cluster, workers
    from hepdask.config import Cluster

    names = (workers.TunedMalloc.name, workers.QuietUserErrors.name)

    def instances(dask_worker):
        return [id(dask_worker.plugins[name]) for name in names]

    def frozen_imports(dask_worker):
        return id(dask_worker.plugins[workers.FrozenImports.name])

    before, sent = client.run(instances), client.run(frozen_imports)
    cluster.setup_workers(client, Cluster())
    assert client.run(instances) == before
    assert all(client.run(frozen_imports)[w] != sent[w] for w in sent)


def test_worker_processes_freeze_their_imports_but_the_client_process_does_not(built, client):
    """The build registers hepdask.workers.FrozenImports: every worker process holds the build
    stack frozen (full collections skip it), and froze again after its first task. Set up in
    the client's own process (a worker thread there), the plugin freezes nothing."""
    import gc

    from hepdask import heap, workers

    def frozen(dask_worker):
        plugin = dask_worker.plugins.get(workers.FrozenImports.name)
        return plugin is not None, gc.get_freeze_count(), heap.frozen(heap.BUILD_STACK), heap._settled

    for registered, count, stack, settled in client.run(frozen).values():
        assert registered and count > 10**5 and stack and settled
    before = gc.get_freeze_count()
    here = workers.FrozenImports()
    here.setup(None)
    here.transition("a-key", "executing", "memory")
    assert gc.get_freeze_count() == before and not heap._settled


def test_build_ignores_a_closed_default_client(ldmx_data, client, tmp_path):
    """Dask's default client is not the build's: here it is a closed one (as a finished test or
    an earlier ``with Client(...)`` in a user's script can leave it). The build still finishes."""
    import threading

    from distributed import Client, LocalCluster

    data, _ = ldmx_data
    config = from_dict(demo_config(data, tmp_path / "store.zarr", **{"cluster.performance_report": True}))
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        stale = Client(cluster)
    stale.close()
    outcome: list = []

    def run() -> None:
        with stale.as_current():
            outcome.append(hepdask.build_dataset(config, client=client, progress=False))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the build hung waiting on the closed default client's event loop"
    assert outcome[0].events_written > 0
    assert "stage-" in (tmp_path / "store.zarr.performance-report.html").read_text()


def test_output_flag_is_relative_to_the_current_directory(ldmx_data, tmp_path, monkeypatch):
    data, _ = ldmx_data
    (tmp_path / "cfg").mkdir()
    (tmp_path / "here").mkdir()
    path = write_config(tmp_path / "cfg" / "c.yaml", demo_config(data, tmp_path / "unused.zarr"))
    monkeypatch.chdir(tmp_path / "here")
    assert cli(["build-dataset", str(path), "--output", "rel.zarr", "--dry-run"]) == 0
    from hepdask.cli import _flag_overrides, _parser

    args = _parser().parse_args(["build-dataset", str(path), "--output", "rel.zarr"])
    assert f"output.path={json.dumps(str(tmp_path / 'here' / 'rel.zarr'))}" in _flag_overrides(args)


def test_a_bad_file_found_by_a_worker_is_one_line_on_stderr(ldmx_data, tmp_path):
    """Workers would log "Compute Failed" with a traceback for each failed task before the
    client's one-line error; hepdask errors are reported once, by the client."""
    data, _ = ldmx_data
    bad = not_root_file(tmp_path / "late.root")
    raw = demo_config(data, tmp_path / "o.zarr", cluster={"workers": 2})
    raw["samples"][1]["files"] = [*raw["samples"][1]["files"], bad]
    raw["read"]["partitions_per_task"] = 1
    path = write_config(tmp_path / "c.yaml", raw)
    done = subprocess.run([sys.executable, "-m", "hepdask.cli", "build-dataset", str(path), "--no-progress"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("Dask dashboard: ")]
    assert len(lines) == 1 and lines[0].startswith("hepdask: error:") and "late.root" in lines[0], done.stderr


def test_a_file_in_two_samples_is_refused(ldmx_data, tmp_path, capsys):
    data, files = ldmx_data
    config = demo_config(data, tmp_path / "o.zarr")
    config["samples"][1]["files"] = [*config["samples"][1]["files"], files["signal"][0]]
    err = _run_bad(tmp_path, capsys, config)
    assert f"file {files['signal'][0]!r} is in samples 'signal' and 'background'" in err


def test_a_selection_that_keeps_no_event_writes_nothing(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    out = tmp_path / "o.zarr"
    config = demo_config(data, out, cluster={"workers": 1})
    config["selection"] = {"events": "nhits >= 100000"}
    err = _run_bad(tmp_path, capsys, config)
    assert "no event to write" in err and "'nhits >= 100000'" in err and "kept none" in err
    assert not out.exists() and not store.staging_path(out).exists()


def test_a_sample_the_selection_empties_is_named(ldmx_data, tmp_path):
    data, _ = ldmx_data
    config = from_dict(demo_config(data, tmp_path / "o.zarr", selection={"events": "nhits > 3"}))
    partitions = [sources.Partition(0, "signal", 1, "a.root"), sources.Partition(1, "background", 0, "b.root")]
    staged = [store.Staged("p0", 7, {}, {"entries": 9}), store.Staged("p1", 0, {}, {"entries": 5})]
    said = []
    bar = type("Bar", (), {"print": lambda self, text: said.append(text)})()
    build._check_selected(config, build._sample_counts(config, partitions, staged, []), str(tmp_path / "staging"), bar)
    assert said == [("warning: sample 'background': the selection (selection.events 'nhits > 3') kept none "
                     "of its 5 events read")]


def test_files_cut_into_entry_ranges_give_the_same_store(built, ldmx_data, client, tmp_path):
    """read.entries_per_partition stages each file in ranges (counted on the workers); events
    keep their global order, so every chunk is byte-identical to the whole-file build, the
    provenance keeps absolute entry numbers, and the manifest has one row per file."""
    _, _, whole = built
    data, files = ldmx_data
    out = tmp_path / "ranges.zarr"
    config = from_dict(demo_config(data, out, read={"entries_per_partition": 15}))
    report = hepdask.build_dataset(config, client=client, progress=False)
    n_files = len(files["signal"]) + len(files["background"])
    assert report.n_partitions == n_files * 3  # 40 entries a file: 15 + 15 + 10
    assert chunk_hashes(out) == chunk_hashes(whole)
    root = zarr.open_group(str(out), mode="r")
    manifest = root.attrs["hepdask:manifest"]
    assert len(manifest) == n_files
    assert manifest == zarr.open_group(str(whole), mode="r").attrs["hepdask:manifest"]
    assert report.samples["signal"]["files"] == len(files["signal"])
    assert store.verify(out) == []


def test_a_single_file_in_entry_ranges_is_staged_by_worker_processes(ldmx_data, tmp_path):
    """A one-file plan would run on one worker thread in this process; cut into ranges (the
    probe knows its entries) it gets worker processes."""
    data, files = ldmx_data
    raw = demo_config(data, tmp_path / "one.zarr", cluster={"workers": 2, "dashboard_address": None},
                      read={"entries_per_partition": 10})
    raw["samples"] = [{**raw["samples"][0], "files": [files["signal"][0]]}]
    config = from_dict(raw)
    plan = hepdask.build_dataset(config, dry_run=True, progress=False)
    assert plan.n_partitions == 4
    report = hepdask.build_dataset(config, progress=False)
    assert report.n_partitions == 4 and report.events_written > 0
    entries = zarr.open_group(str(tmp_path / "one.zarr"), mode="r")["train"]["entry"][:]
    assert entries.max() >= 30  # absolute entry numbers from the later ranges


def test_split_entries_cuts_ranges_in_order():
    parts = [sources.Partition(0, "a", 1, "f1"), sources.Partition(1, "a", 1, "f2"),
             sources.Partition(2, "b", 0, "f3")]
    split = sources.split_entries(parts, [25, 10, None], 10)
    assert [(p.index, p.file, p.entry_start, p.entry_stop) for p in split] == [
        (0, "f1", 0, 10), (1, "f1", 10, 20), (2, "f1", 20, 25), (3, "f2", 0, None), (4, "f3", 0, None)]
    assert [p.key for p in split] == [f"p{i:07d}" for i in range(5)]


def test_a_resumed_build_reuses_a_staged_range_only_for_the_same_range(ldmx_data):
    _, files = ldmx_data
    path = files["signal"][0]
    info = {**sources.file_info(path), "entry_range": [0, 10]}
    done = store.Staged("p0000001", 5, {}, info)
    assert build._unchanged(done, sources.Partition(1, "signal", 1, path, 0, 10))
    assert not build._unchanged(done, sources.Partition(1, "signal", 1, path, 10, 20))
    assert not build._unchanged(done, sources.Partition(1, "signal", 1, path))


def test_sample_metadata_becomes_per_event_arrays_and_attributes(ldmx_data, client, tmp_path):
    """Constant per-sample metadata (e.g. the signal mass an LDMX model takes as an extra
    input) is stored per event, like the label, and listed in the root attributes."""
    data, _ = ldmx_data
    out = tmp_path / "meta.zarr"
    raw = demo_config(data, out)
    raw["samples"][0]["metadata"] = {"mass": 0.5, "process": "signal-like", "run": 7}
    raw["samples"][1]["metadata"] = {"process": "background-like", "run": 8}
    hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    ds = hepdask.open_dataset(out, "train")
    is_signal = ds["sample"].values == "signal"
    assert is_signal.any() and (~is_signal).any()
    assert ds["mass"].dtype == np.float64
    assert (ds["mass"].values[is_signal] == 0.5).all() and np.isnan(ds["mass"].values[~is_signal]).all()
    assert ds["run"].dtype == np.int64 and set(ds["run"].values[is_signal]) == {7}
    assert set(ds["process"].values[~is_signal]) == {"background-like"}
    attrs = zarr.open_group(str(out), mode="r").attrs["hepdask:samples"]
    assert attrs["signal"] == {"label": 1, "metadata": {"mass": 0.5, "process": "signal-like", "run": 7}}


def test_a_metadata_key_that_clashes_with_an_array_is_refused(ldmx_data, tmp_path):
    data, _ = ldmx_data
    raw = demo_config(data, tmp_path / "o.zarr")
    raw["samples"][0]["metadata"] = {"label": 3}
    with pytest.raises(hepdask.HepdaskError, match="metadata key 'label' names a per-event array"):
        from_dict(raw)


def test_write_tasks_own_whole_small_array_chunks_and_are_sized_by_what_they_hold():
    k = store.EVENT_ARRAY_CHUNKS
    held = 500 * 2**10  # a chunk's sparse rows and per-event values
    # Balance first: 4 tasks a worker.
    assert build._chunks_per_task(1000, held, 2, image_chunk_bytes=4 * 2**20) == 128
    assert build._chunks_per_task(1000, held, 2) % k == 0
    # What a task holds bounds it...
    assert build._chunks_per_task(10**6, held, 1) == round(build.WRITE_TASK_BYTES / held / k) * k
    # ...and so do its images, staged dense or not.
    assert build._chunks_per_task(10**6, 1, 1, image_chunk_bytes=64 * 2**20) == build.WRITE_TASK_IMAGE_BYTES // 2**26
    # Never less than one chunk of the small arrays; without them (unit 1), one image chunk.
    assert build._chunks_per_task(3, held, 64) == k
    assert build._chunks_per_task(3, held, 64, unit=1) == 1
