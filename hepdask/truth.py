"""Event truth and per-event labels: pure numpy, no files.

The ``km3net-offline`` preset reads one MC track per event (``Evt/mc_trks``, track 0 being
the primary: the neutrino of a gSeaGen file, the first muon of a MUPAGE file) and the
gSeaGen weight list, and derives the zenith and azimuth of the direction the particle comes
from, with the KM3NeT conventions of ``km3pipe.math``: zenith is the angle to the downward
vertical (0 for a down-going track, pi for an up-going one) and azimuth is
``atan2(dir_y, dir_x) - pi`` brought into ``[0, 2 pi)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import ConfigError

#: Per-event values read from the MC track: field -> branch of ``Evt/mc_trks``.
_TRACK_BRANCHES = {
    "energy": "E",
    "dir_x": "dir.x", "dir_y": "dir.y", "dir_z": "dir.z",
    "vertex_x": "pos.x", "vertex_y": "pos.y", "vertex_z": "pos.z",
    "pdgid": "type",
}
#: Index of the Bjorken y in the gSeaGen ``w2list`` (km3io's ``w2list_gseagen["BY"]``).
W2LIST_BJORKEN_Y = 8
_DERIVED = ("zenith", "azimuth")


def truth_fields(prefix: str) -> list[str]:
    """The event fields the preset stores, in order."""
    return [prefix + name for name in (*_TRACK_BRANCHES, *_DERIVED, "bjorken_y")]


def truth_branches(prefix: str, track: int) -> dict[str, str]:
    """Event field -> branch expression for the values the preset reads from the file."""
    read = {prefix + name: f"Evt/mc_trks/mc_trks.{branch}[{track}]" for name, branch in _TRACK_BRANCHES.items()}
    read[prefix + "bjorken_y"] = f"Evt/w2list[{W2LIST_BJORKEN_Y}]"
    return read


def zenith_azimuth(dir_x: np.ndarray, dir_y: np.ndarray, dir_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zenith and azimuth (radians) of the direction a particle moving along *dir* comes from."""
    norm = np.sqrt(dir_x**2 + dir_y**2 + dir_z**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        zenith = np.arccos(np.clip(-dir_z / norm, -1.0, 1.0))
    azimuth = np.arctan2(dir_y, dir_x)
    azimuth = np.where(azimuth < 0, azimuth + 2 * np.pi, azimuth) - np.pi
    azimuth = np.where(azimuth < 0, azimuth + 2 * np.pi, azimuth)
    return zenith, azimuth


def derive(events: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The preset's event fields from what was read (``truth_branches``), in field order."""
    out = dict(events)
    zenith, azimuth = zenith_azimuth(*(np.asarray(events[prefix + f"dir_{a}"], np.float64) for a in "xyz"))
    out[prefix + "zenith"], out[prefix + "azimuth"] = zenith, azimuth
    for name in truth_fields(prefix):
        out[name] = np.asarray(out[name], np.float64)
    return out


def map_labels(values: np.ndarray, mapping: Mapping[float, int], default: int | None, *, where: str) -> np.ndarray:
    """Per-event classes from *values* through *mapping*; an unmapped value without a
    *default* raises, naming *where* (file) and the value."""
    values = np.asarray(values, np.float64)
    labels = np.full(values.shape, -1 if default is None else default, np.int32)
    mapped = np.zeros(values.shape, bool)
    for value, label in mapping.items():
        hit = values == value
        labels[hit] = label
        mapped |= hit
    if default is None and not mapped.all():
        bad = values[~mapped]
        shown = sorted({float(v) for v in bad[:1000]}, key=lambda v: (np.isnan(v), v))[:5]
        msg = (
            f"{where}: {int((~mapped).sum())} events have label values {shown} that labels.map "
            f"does not map ({sorted(mapping)}); add them or set labels.default"
        )
        raise ConfigError(msg)
    return labels
