from __future__ import annotations

import pytest

from .data_generation import ldmx_files


@pytest.fixture(scope="session")
def ldmx_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ldmx")
    files = ldmx_files(directory)
    return directory, files


@pytest.fixture(scope="session")
def client():
    """One 2-worker LocalCluster for the whole session (starting one costs seconds)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def tf_two_cpus():
    """TensorFlow with the CPU split into 2 logical devices (a real 2-replica MirroredStrategy)."""
    tf = pytest.importorskip("tensorflow")
    cpu = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(cpu) is None:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    assert len(tf.config.list_logical_devices("CPU")) == 2
    return tf


@pytest.fixture(scope="session")
def train_store(client, tmp_path_factory):
    """A store of 6,000 separable-but-overlapping events, chunks of 128 events."""
    import hepdask
    from hepdask.config import from_dict

    from .data_generation import demo_config

    directory = tmp_path_factory.mktemp("train-data")
    ldmx_files(directory, n_files=6, events=500, seed=21)
    out = directory / "train.zarr"
    raw = demo_config(directory, out, **{"output.chunk_events": 128, "selection.events": None})
    hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    return out
