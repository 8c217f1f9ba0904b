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
