"""numba's one-time set-up in a fresh process, without the SciPy import it does not need.

The first call of any jitted function in a process (compiling it or loading it from the
cache) loads numba's CPU target: a few hundred modules of typing and lowering registries.
One of them, ``numba.np.arraymath``, asks at import time whether BLAS is available by
importing ``scipy.linalg`` (``_HAVE_BLAS = _check_blas()``), which pulls in most of SciPy:
0.20-0.25 s of a 0.55-0.6 s set-up on a 2-core machine, paid by the ``hepdask`` process and
by every worker process. hepdask's kernels use no linear algebra, and the answer is used by
one overload only (``np.vdot``-style inner products choose BLAS or a plain loop at typing
time); every other linear-algebra function checks BLAS again when it is compiled.

:func:`fast_start` imports ``numba.np.arraymath`` once with that probe answered by whether
SciPy is installed (``importlib.util.find_spec``, which imports nothing) and leaves numba's
own check in place for everything compiled later. No Dask, no files: the kernel modules call
it when they are imported.
"""

from __future__ import annotations

import importlib.util
import sys

_PROBED = "numba.np.arraymath"


def _scipy_installed() -> None:
    """numba's ``ensure_blas`` contract: return if BLAS can be had, raise ImportError if not."""
    if importlib.util.find_spec("scipy") is None:
        msg = "scipy is required for linear algebra"
        raise ImportError(msg)


def fast_start() -> bool:
    """Import ``numba.np.arraymath`` with a BLAS probe that imports nothing; True if this call
    did, False if it was imported already (by numba, the user or an earlier call) or if this
    numba has no such probe to answer."""
    if _PROBED in sys.modules:
        return False
    try:
        from numba.np import linalg

        ensure_blas = linalg.ensure_blas
    except (ImportError, AttributeError):  # another numba layout: its own set-up, unchanged
        return False
    linalg.ensure_blas = _scipy_installed
    try:
        arraymath = importlib.import_module(_PROBED)
    finally:
        linalg.ensure_blas = ensure_blas
    arraymath.ensure_blas = ensure_blas
    return True
