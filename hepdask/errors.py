"""One exception family for everything hepdask reports to a user.

Each error also subclasses the matching built-in (as zarr-python does), so ``except KeyError``
or ``except FileNotFoundError`` in user code keeps working. Every message names the file, the
key or the value at fault.

The exceptions are raised on Dask workers and travel back to the client by pickling, so each
one keeps its whole message in ``args`` and nothing else.
"""

from __future__ import annotations

import difflib
import errno
import re
from collections.abc import Iterable

#: ``errno`` of a write that a full or read-only file system refused (ENOSPC, EDQUOT, EFBIG,
#: EROFS): a build stopped by one resumes once the cause is fixed.
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class HepdaskError(Exception):
    """Base class of every error hepdask raises on purpose."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(HepdaskError, ValueError):
    """The YAML config or a ``--set`` override is invalid."""


class InputFileError(HepdaskError, OSError):
    """An input file is missing, unreadable, not ROOT, or lacks a tree or branch."""


class MissingInputError(InputFileError, FileNotFoundError):
    """A file or glob pattern of a sample matches nothing."""


class BranchError(InputFileError, KeyError):
    """A tree or branch named in the config is absent or has the wrong shape."""


class SelectionError(ConfigError):
    """A selection expression cannot be parsed or names an unknown field."""


class GeometryError(HepdaskError, ValueError):
    """A detector file is unreadable or does not match the data (unknown channel, det_id)."""


class StoreError(HepdaskError, OSError):
    """The output store exists, is incomplete, or cannot be written or read."""


class ClusterError(HepdaskError, RuntimeError):
    """A Dask cluster could not be started or reached."""


class BuildError(HepdaskError, RuntimeError):
    """A build failed; the store is left without its completion marker."""


class TrainError(HepdaskError, RuntimeError):
    """A training ran but its result cannot be evaluated (a model that gives NaN scores)."""


def error_classes() -> dict[str, type[HepdaskError]]:
    """Every class of the family, by name (those defined elsewhere too, once imported)."""
    found: dict[str, type[HepdaskError]] = {}
    todo: list[type[HepdaskError]] = [HepdaskError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def carried_error(err: BaseException) -> HepdaskError | None:
    """The hepdask error that *err* carries in its message, or None. TensorFlow reports an
    exception raised inside a tf.data function (a chunk read) as its own error, with the
    original's class name and message in its text."""
    if isinstance(err, HepdaskError):
        return None
    classes = error_classes()
    found = re.search(rf"\b({'|'.join(map(re.escape, classes))}): ([^\n]+)", str(err))
    if found is None:
        return None
    return classes[found.group(1)](found.group(2).strip())


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest of *choices*, or ``""``."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not close:
        lowered = name.lower()
        close = [
            c for c in choices
            if lowered in c.lower() or lowered.startswith(c.lower()) or c.lower().endswith(lowered)
        ][:n]
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
