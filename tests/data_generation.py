"""Small seeded input files for the tests, written with uproot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import uproot
import yaml
from distributed.diagnostics.plugin import WorkerPlugin

from hepdask import examples


def ldmx_files(directory: Path, *, n_files: int = 4, events: int = 40, seed: int = 11) -> dict[str, list[str]]:
    """Signal and background LDMX-like files (example generator): ``{sample: paths}``."""
    return {
        "signal": examples.generate(directory, signal=True, n_files=n_files, events_per_file=events, seed=seed),
        "background": examples.generate(directory, signal=False, n_files=n_files, events_per_file=events,
                                        seed=seed + 1),
    }


def demo_config(data: Path, output: Path, **changes) -> dict:
    """A small config over :func:`ldmx_files` (as a mapping, to dump or to change)."""
    config = {
        "name": "test",
        "samples": [
            {"name": "signal", "label": 1, "files": str(data / "signal_*.root")},
            {"name": "background", "label": 0, "files": [str(data / "background_*.root")]},
        ],
        "tree": "ecalHits",
        "hits": {"x": "x", "y": "y", "z": "z", "E": "E"},
        "event": {"eventNumber": "eventNumber"},
        "selection": {"hits": "E > 0.5", "events": "nhits >= 3"},
        "image": {
            "axes": [
                {"field": "z", "bins": 17, "range": [235, 605], "units": "mm"},
                {"field": "x", "bins": 16, "range": [-80, 80], "units": "mm"},
            ],
            "weight": "E",
            "dtype": "float32",
        },
        "read": {"step_size": 15},
        "output": {"path": str(output), "chunk_events": 16, "shuffle": {"enabled": True, "seed": 3}},
        "cluster": {"workers": 2},
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def flat_branch_file(path: Path) -> str:
    """A file whose 'x' is one value per event instead of one per hit."""
    branches = {name: np.arange(5, dtype=np.float32) for name in ("x", "y", "z", "E")}
    branches["eventNumber"] = np.arange(5)
    with uproot.recreate(path) as file:
        file.mktree("ecalHits", {k: v.dtype for k, v in branches.items()})
        file["ecalHits"].extend(branches)
    return str(path)


def wrong_tree_file(path: Path) -> str:
    with uproot.recreate(path) as file:
        file.mktree("ecalHitz", {"x": np.float32})
        file["ecalHitz"].extend({"x": np.arange(3, dtype=np.float32)})
    return str(path)


def truncated_file(source: str, path: Path) -> str:
    """The first half of a good file."""
    data = Path(source).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def not_root_file(path: Path) -> str:
    path.write_text("x,y,z,E\n1,2,3,4\n" * 200)
    return str(path)


def corrupted_basket_file(source: str, path: Path) -> str:
    """A good file with garbage written into the compressed payload of a basket of 'x'."""
    data = bytearray(Path(source).read_bytes())
    branch = uproot.open(source)["ecalHits"]["x"]
    seek = int(branch.member("fBasketSeek")[0])
    start = seek + 100
    data[start : start + 64] = bytes(range(64))
    path.write_bytes(bytes(data))
    return str(path)


def tree_missing_file(path: Path) -> str:
    return wrong_tree_file(path)


class PoisonFiles(WorkerPlugin):
    """A worker plugin that kills its worker process whenever a task opens a 'poison' file.

    Registered plugins are installed on restarted workers too, so the file kills its
    worker on every retry, as a file that exhausts memory or crashes a library would.
    """

    name = "hepdask-test-poison"

    def setup(self, worker) -> None:
        import os

        from hepdask import sources

        original = sources.read

        def read(partition, *args, **kwargs):
            if "poison" in Path(partition.file).name:
                os._exit(1)
            return original(partition, *args, **kwargs)

        sources.read = read


class SlowReads(WorkerPlugin):
    """A worker plugin that makes every partition read take *seconds* longer, so that a small
    build lasts long enough for workers to be recycled by ``--lifetime`` during it."""

    name = "hepdask-test-slow-reads"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, worker) -> None:
        import time

        from hepdask import sources

        original, pause = sources.read, self.seconds

        def read(*args, **kwargs):
            time.sleep(pause)
            return original(*args, **kwargs)

        sources.read = read


def chunk_file(path: Path, split: str, array: str, index: int) -> Path:
    """The file of chunk *index* (along the events) of ``split/array`` in the store at *path*,
    named by the array's own chunk key encoding."""
    import zarr

    from hepdask import store

    return store.chunk_file(zarr.open_array(str(path / split / array), mode="r"))(index)


def chunk_files(path: Path) -> list[Path]:
    """Every chunk file under *path* (a store, a split or an array), in name order."""
    return sorted(f for f in Path(path).rglob("*") if f.is_file() and f.name != "zarr.json" and not f.name.endswith(".partial"))
