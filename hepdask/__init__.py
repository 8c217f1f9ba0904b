"""hepdask: thousands of detector ROOT files to one chunked Zarr image dataset, with Dask.

The public API; TensorFlow and matplotlib are never imported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .build import BuildReport, build_dataset
from .config import Config
from .config import load as load_config
from .errors import HepdaskError
from .store import open_dataset

__all__ = [
    "BuildReport",
    "Config",
    "HepdaskError",
    "__version__",
    "build_dataset",
    "load_config",
    "open_dataset",
]
