"""Synthetic LDMX-like electromagnetic-calorimeter files, for the demo and the tests.

Each file holds a tree ``ecalHits`` with per-event jagged ``x, y, z`` (mm) and ``E`` (MeV),
a hit counter ``nHits`` and ``eventNumber``. Hits sit on the cells of 34 silicon layers
between z = 240 mm and z = 600 mm. Signal showers are a little narrower and deeper than
background showers; the distributions overlap, so a small CNN separates them well but not
perfectly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from .errors import ConfigError

TREE = "ecalHits"
LAYERS_Z = np.linspace(240.0, 600.0, 34)
CELL_MM = 5.0
HALF_WIDTH_MM = 250.0


@dataclass(frozen=True)
class ShowerModel:
    mean_hits: float
    transverse_mm: float
    depth_shape: float
    depth_scale: float
    energy_mev: float


#: The two samples overlap: alone, the mean transverse hit radius separates them with an AUC of
#: about 0.82 and the mean depth with about 0.75, so a CNN has something to learn.
SIGNAL = ShowerModel(mean_hits=62, transverse_mm=13.0, depth_shape=4.0, depth_scale=2.8, energy_mev=5.0)
BACKGROUND = ShowerModel(mean_hits=65, transverse_mm=15.5, depth_shape=3.5, depth_scale=3.0, energy_mev=4.6)


def simulate(model: ShowerModel, n_events: int, rng: np.random.Generator) -> dict[str, ak.Array]:
    """Hits of *n_events* showers drawn from *model*."""
    counts = np.maximum(rng.poisson(model.mean_hits, n_events), 1)
    n = int(counts.sum())
    event_of_hit = np.repeat(np.arange(n_events), counts)
    x0 = rng.normal(0.0, 20.0, n_events)[event_of_hit]
    y0 = rng.normal(0.0, 20.0, n_events)[event_of_hit]
    slope_x = rng.normal(0.0, 0.05, n_events)[event_of_hit]
    slope_y = rng.normal(0.0, 0.05, n_events)[event_of_hit]
    layer = np.minimum(rng.gamma(model.depth_shape, model.depth_scale, n).astype(int), LAYERS_Z.size - 1)
    z = LAYERS_Z[layer]
    radius = rng.exponential(model.transverse_mm, n)
    phi = rng.uniform(0.0, 2 * np.pi, n)
    depth = z - LAYERS_Z[0]
    x = x0 + slope_x * depth + radius * np.cos(phi)
    y = y0 + slope_y * depth + radius * np.sin(phi)
    x = np.clip(np.round(x / CELL_MM) * CELL_MM, -HALF_WIDTH_MM, HALF_WIDTH_MM)
    y = np.clip(np.round(y / CELL_MM) * CELL_MM, -HALF_WIDTH_MM, HALF_WIDTH_MM)
    energy = rng.exponential(model.energy_mev, n) * np.exp(-radius / (4 * model.transverse_mm))
    fields = {"x": x, "y": y, "z": z, "E": energy}
    return {k: ak.unflatten(v.astype(np.float32), counts) for k, v in fields.items()}


def write_file(path: str | os.PathLike, model: ShowerModel, n_events: int, seed: int, first_event: int = 0) -> None:
    """Write one file of *n_events* showers; the same seed gives the same file."""
    rng = np.random.default_rng(seed)
    hits = simulate(model, n_events, rng)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with uproot.recreate(tmp) as file:
        file.mktree(
            TREE,
            {"x": "var * float32", "y": "var * float32", "z": "var * float32", "E": "var * float32",
             "eventNumber": "int64"},
            counter_name=lambda _: "nHits",
        )
        file[TREE].extend({**hits, "eventNumber": np.arange(first_event, first_event + n_events, dtype=np.int64)})
    tmp.replace(path)


def file_paths(directory: str | os.PathLike, *, signal: bool, n_files: int) -> list[Path]:
    """The example files of a sample: ``signal_00000.root``... or ``background_...``."""
    return [Path(directory) / f"{_prefix(signal)}_{i:05d}.root" for i in range(n_files)]


def beyond(paths: list[str], directory: str | os.PathLike, *, signal: bool, n_files: int) -> set[str]:
    """Those of *paths* that are example files of this kind in *directory* numbered
    ``n_files`` or more: left over from a run that generated more."""
    kept = {path.resolve() for path in file_paths(directory, signal=signal, n_files=n_files)}
    directory, pattern = Path(directory).resolve(), _pattern(_prefix(signal))
    return {path for path in paths
            if (p := Path(path).resolve()).parent == directory and p.match(pattern) and p not in kept}


def _prefix(signal: bool) -> str:
    return "signal" if signal else "background"


def _record_path(directory: Path, prefix: str) -> Path:
    return directory / f".{prefix}.hepdask-generate.json"


def _pattern(prefix: str) -> str:
    """The glob pattern of a sample's example files (``file_paths``' names)."""
    return f"{prefix}_[0-9][0-9][0-9][0-9][0-9].root"


def _existing(directory: Path, prefix: str) -> list[Path]:
    return sorted(directory.glob(_pattern(prefix)))


def check_settings(directory: str | os.PathLike, *, signal: bool, events_per_file: int, seed: int) -> None:
    """Refuse to reuse example files that were generated with other settings.

    ``generate`` skips files that exist, so files of an earlier run with another
    ``events_per_file`` or ``seed`` would silently mix into the new dataset. Each run that
    writes files records its settings beside them. Files without a record (made before the
    record existed, or by hand) are checked for their number of events only; a record
    without files is stale and ignored.
    """
    prefix = _prefix(signal)
    directory = Path(directory)
    existing = _existing(directory, prefix)
    if not existing:
        return
    record = _record_path(directory, prefix)
    try:
        recorded = json.loads(record.read_text())
    except FileNotFoundError:
        with uproot.open(existing[0]) as file:
            recorded = {"events_per_file": int(file[TREE].num_entries), "seed": seed}
    except (OSError, ValueError) as err:
        msg = f"{record}: unreadable record of how the example files were generated ({err}); delete it"
        raise ConfigError(msg) from None
    wanted = {"events_per_file": events_per_file, "seed": seed}
    differ = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if differ:
        was = ", ".join(f"{k}={old}" for k, (old, _) in differ.items())
        now = ", ".join(f"{k}={new}" for k, (_, new) in differ.items())
        msg = (f"{directory}: the {prefix} example files there were generated with {was}, not {now}; "
               f"delete them (and the record {record.name}) or generate into another directory")
        raise ConfigError(msg)


def generate(
    directory: str | os.PathLike,
    *,
    signal: bool,
    n_files: int,
    events_per_file: int,
    seed: int,
    progress=None,
) -> list[str]:
    """Write ``n_files`` files into *directory* (skipping ones that exist); return their paths.

    Files that exist must come from the same settings (:func:`check_settings`).
    """
    if n_files < 1 or events_per_file < 1:
        msg = f"example data needs at least one file of at least one event, got {n_files} file(s) of {events_per_file}"
        raise ConfigError(msg)
    check_settings(directory, signal=signal, events_per_file=events_per_file, seed=seed)
    model = SIGNAL if signal else BACKGROUND
    directory = Path(directory)
    paths = file_paths(directory, signal=signal, n_files=n_files)
    try:
        if not all(path.exists() for path in paths):
            # Recorded only by a run that writes: a read-only directory of complete files is fine.
            directory.mkdir(parents=True, exist_ok=True)
            record = {"events_per_file": events_per_file, "seed": seed}
            _record_path(directory, _prefix(signal)).write_text(json.dumps(record))
        for i, path in enumerate(paths):
            if not path.exists():
                file_seed = np.random.SeedSequence([seed, int(signal), i]).generate_state(1)[0]
                write_file(path, model, events_per_file, int(file_seed), first_event=i * events_per_file)
            if progress is not None:
                progress()
    except OSError as err:
        msg = f"cannot write example files into {str(directory)!r}: {err.strerror or err} ({err.filename or directory})"
        raise ConfigError(msg) from None
    return [str(path) for path in paths]
