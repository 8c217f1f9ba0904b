"""hepdask: thousands of detector ROOT files to one chunked Zarr image dataset, with Dask.

The public API; TensorFlow and matplotlib are never imported here. The names below are
imported on first use (PEP 562), so that ``hepdask --help``, ``hepdask info`` and other
commands that need neither numba, uproot nor Dask do not pay for importing them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> (module, attribute)
_LAZY = {
    "BuildReport": ("build", "BuildReport"),
    "build_dataset": ("build", "build_dataset"),
    "Config": ("config", "Config"),
    "load_config": ("config", "load"),
    "HepdaskError": ("errors", "HepdaskError"),
    "open_dataset": ("store", "open_dataset"),
    "tf_dataset": ("tfdata", "tf_dataset"),
}

#: submodules reachable as attributes (``hepdask.store.verify``) without importing them first
_SUBMODULES = frozenset({
    "binning", "build", "cli", "cluster", "config", "errors", "examples", "geometry", "heap", "jit", "malloc",
    "plots", "selection", "sources", "store", "tfdata", "train", "truth", "workers",
})  # fmt: skip

__all__ = [
    "BuildReport",
    "Config",
    "HepdaskError",
    "__version__",
    "build_dataset",
    "load_config",
    "open_dataset",
    "tf_dataset",
]

if TYPE_CHECKING:
    from .build import BuildReport, build_dataset
    from .config import Config
    from .config import load as load_config
    from .errors import HepdaskError
    from .store import open_dataset
    from .tfdata import tf_dataset


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        msg = f"module 'hepdask' has no attribute {name!r}"
        raise AttributeError(msg)
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
