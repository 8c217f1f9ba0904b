"""Garbage collection in hepdask's long-lived processes: the console script and Dask workers.

Importing the build stack (Dask, numba, uproot, awkward, zarr, pydantic) creates a few hundred
thousand objects that live as long as the process. CPython's full collections traverse every
one of them, and they run whenever enough objects have survived the younger generations:
while the imports themselves run, and while a worker stages files, whose TTree metadata
(uproot models, one per branch) survives long enough to count. Measured
(benchmarks/RESULTS.md): the workers of a 100-file KM3NeT build spent 1.0-1.4 s each in
garbage collection, a quarter of the build, and a one-file build's process 0.5 s, plus ~0.9 s
more in the collections of the interpreter's shutdown.

:func:`import_frozen` imports modules with the collector paused and then freezes everything
the process holds (``gc.freeze``): collections skip those objects from then on, and
everything made later is collected as usual. Workers freeze once more after their first task
(:func:`settle`). No Dask here: the console script calls it
(``hepdask.cli.entry``), builds register ``hepdask.workers.FrozenImports`` on their workers.
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Iterable

#: What a build imports: the modules that stage and write (and with them numba, uproot,
#: awkward, zarr and pydantic; Dask's client side comes with the first real Client,
#: ``hepdask.cluster.connect``).
BUILD_STACK = ("hepdask.build", "hepdask.cluster")


_settled = False
#: Whether this process froze imports through :func:`import_frozen` (the console script, a
#: worker): only then does a build freeze the modules it imports later with them.
_imports_frozen = False


def settle() -> None:
    """Freeze the heap once per process, after its first piece of work: what that work loaded
    on first use (numba's target registries and the modules they import, uproot's models)
    lives as long as the imports. Later calls do nothing."""
    global _settled
    if not _settled:
        _settled = True
        gc.freeze()


def frozen(modules: Iterable[str]) -> bool:
    """Whether *modules* are imported and something is frozen (by :func:`import_frozen`, or by
    whoever else called ``gc.freeze``): then freezing again would only freeze garbage."""
    return gc.get_freeze_count() > 0 and all(module in sys.modules for module in modules)


def imports_frozen() -> bool:
    """Whether this process froze imports through :func:`import_frozen` (a user's own
    ``gc.freeze`` does not count: that heap is theirs)."""
    return _imports_frozen


def import_frozen(modules: Iterable[str]) -> None:
    """Import *modules* with the collector paused, then freeze the heap; the collector is left
    as it was (enabled or not)."""
    global _imports_frozen
    _imports_frozen = True
    enabled = gc.isenabled()
    gc.disable()
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
