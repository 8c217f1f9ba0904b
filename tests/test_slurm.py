"""Builds on a real one-node SLURM (started by .ci/slurm.sh in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import hepdask
from hepdask.cli import main as cli
from hepdask.config import from_dict
from hepdask.errors import ClusterError

from .data_generation import demo_config, write_config
from .test_build import chunk_hashes

ROOT = Path(__file__).resolve().parents[1]


def _slurm_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False)
    return result.returncode == 0 and ("idle" in result.stdout or "mix" in result.stdout)


pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not _slurm_is_up():
        if os.environ.get("HEPDASK_REQUIRE_SLURM"):
            pytest.fail("HEPDASK_REQUIRE_SLURM is set but no SLURM node is idle (see .ci/slurm.sh)")
        pytest.skip("no SLURM here: start one with `.ci/slurm.sh start`")


def _profile(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "jobqueue" / "slurm.yaml").read_text())
    data["jobqueue"]["slurm"].update({"memory": "1GiB", "walltime": "00:10:00", **changes})
    data["jobqueue"]["slurm"]["scheduler-options"]["dashboard_address"] = "127.0.0.1:0"
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _jobs_seen(log_directory: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[1].split(".")[0] for p in log_directory.glob("*.err")}


def test_slurm_build_equals_the_local_build(ldmx_data, client, tmp_path):
    data, _ = ldmx_data
    local = from_dict(demo_config(data, tmp_path / "local.zarr"))
    hepdask.build_dataset(local, client=client, progress=False)
    raw = demo_config(data, tmp_path / "slurm.zarr",
                      cluster={"kind": "slurm", "profile": str(_profile(tmp_path)), "jobs": 2, "minimum_jobs": 2})
    messages: list[str] = []
    config = from_dict(raw)
    from hepdask.cluster import connect

    with connect(config.cluster, say=messages.append, log_directory=str(tmp_path / "slurm.zarr") + ".slurm-logs") as c:
        assert len(c.scheduler_info()["workers"]) >= 2
        hepdask.build_dataset(config, client=c, progress=False)
    assert chunk_hashes(tmp_path / "slurm.zarr") == chunk_hashes(tmp_path / "local.zarr")
    assert len(_jobs_seen(Path(str(tmp_path / "slurm.zarr") + ".slurm-logs"))) >= 2
    assert any("SLURM: up to 2 jobs" in m for m in messages)


def test_workers_recycled_by_lifetime_lose_nothing(tmp_path, client):
    from distributed import Client

    from hepdask.cluster import slurm_cluster, wait_for_workers

    from .data_generation import SlowReads, ldmx_files

    files = ldmx_files(tmp_path / "d", n_files=40, events=200, seed=31)
    raw = demo_config(tmp_path / "d", tmp_path / "local.zarr", **{"output.chunk_events": 64})
    raw["samples"][0]["files"], raw["samples"][1]["files"] = files["signal"], files["background"]
    hepdask.build_dataset(from_dict(raw), client=client, progress=False)

    # Real profiles retire workers after tens of minutes. Here: 20 s, and reads slowed to
    # 0.6 s each, so the ~80 read tasks span several worker lifetimes.
    profile = _profile(tmp_path, **{"worker-extra-args": ["--lifetime", "20s", "--lifetime-stagger", "2s"]})
    raw["output"]["path"] = str(tmp_path / "recycled.zarr")
    raw["cluster"] = {"kind": "slurm", "profile": str(profile), "jobs": 2, "minimum_jobs": 2}
    config = from_dict(raw)
    logs = tmp_path / "logs"
    cluster = slurm_cluster(config.cluster, log_directory=logs)
    cluster.adapt(minimum_jobs=2, maximum_jobs=2)
    with cluster, Client(cluster) as slurm_client:
        slurm_client.register_plugin(SlowReads(0.6))
        wait_for_workers(slurm_client, cluster, 2, 120, say=print, log_directory=logs)
        report = hepdask.build_dataset(config, client=slurm_client, progress=False)
    assert report.events_written > 0
    assert chunk_hashes(tmp_path / "recycled.zarr") == chunk_hashes(tmp_path / "local.zarr")
    jobs = _jobs_seen(logs)
    assert len(jobs) > 2, f"no worker was recycled during the build: jobs {jobs}"


def test_impossible_partition_is_refused_with_slurms_message(ldmx_data, tmp_path, capsys):
    data, _ = ldmx_data
    profile = _profile(tmp_path, queue="no-such-partition")
    raw = demo_config(data, tmp_path / "x.zarr", cluster={"kind": "slurm", "profile": str(profile), "jobs": 1})
    path = write_config(tmp_path / "c.yaml", raw)
    started = time.monotonic()
    assert cli(["build-dataset", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 60
    assert "SLURM refuses the worker job" in err
    assert "Invalid partition name specified" in err
    # Nothing is left beside the output: no staging area, no empty log directory.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("x.zarr")) == []
    from hepdask.cluster import connect

    spec = from_dict(demo_config(data, tmp_path / "y.zarr", cluster={
        "kind": "slurm", "profile": str(_profile(tmp_path, memory="900GiB")), "jobs": 1})).cluster
    with pytest.raises(ClusterError, match="Requested node configuration is not available"), connect(spec):
        pass


def test_print_job_script_submits_nothing(ldmx_data, tmp_path, capsys):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    assert cli(["build-dataset", str(ROOT / "configs" / "demo.yaml"), "--cluster", "slurm",
                "--profile", str(ROOT / "jobqueue" / "slurm.yaml"), "--print-job-script"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/usr/bin/env bash")
    assert "#SBATCH -J hepdask-worker" in script
    assert "#SBATCH --mem=2G" in script
    assert "--lifetime 25m --lifetime-stagger 2m" in script
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    assert before == after


def test_launch_script(ldmx_data, tmp_path):
    data, _ = ldmx_data
    path = write_config(tmp_path / "c.yaml", demo_config(data, tmp_path / "launched.zarr"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobqueue" / "launch_slurm.py"), str(path), "--profile",
         str(_profile(tmp_path)), "--jobs", "2", "--minimum-jobs", "1", "--set", "cluster.workers=1"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Dask dashboard: http://127.0.0.1:" in result.stdout
    assert hepdask.store.verify(tmp_path / "launched.zarr") == []
