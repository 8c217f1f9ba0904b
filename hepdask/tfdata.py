"""Stream a hepdask store into ``tf.data``: whole chunks, read in parallel, never the whole array.

Two layers, as xbatcher separates them:

* a pure planner (``chunk_order``, ``shard_events``, ``EpochPlan``): which rows of which
  chunks, in which order, for which input pipeline, per epoch, seeded. It needs no
  TensorFlow and is tested without it.
* a thin adapter (``tf_dataset``, ``distributed_dataset``): chunk spans from the planner →
  parallel ``tf.numpy_function`` chunk reads (rows permuted per epoch, then transformed and
  cast as whole chunks) → rebatch → prefetch; an optional per-event shuffle buffer across
  chunks.

Under ``tf.distribute``, ``distributed_dataset`` builds the input with
``strategy.distribute_datasets_from_function``: each input pipeline (``InputContext``) reads its
own run of the epoch's chunks and batches at the per-replica batch size, and its replicas take
its batches in turn, so no event is read twice in an epoch. The runs hold equal numbers of
events (``shard_events``) and each step's events are split equally among the replicas, so every
replica takes the same number of steps and none is ever handed the empty batch that
tf.distribute documents for a replica whose data ran out (TensorFlow's CPU ``Conv2D`` fails on
an empty batch), nor, in the last step, a batch one event longer than another's (a first step
of unequal batches fails under MirroredStrategy: ``AddN must have the same size and shape``).
Fewer events than there are replicas may be left out of an epoch for that.

TensorFlow is imported only inside the adapter functions; ``import hepdask`` never imports it.

An iterator whose chunk reads are still running when the interpreter shuts down hangs the
process for ever: TensorFlow destroys it during finalisation, waiting for threads that can no
longer take the GIL to finish their ``numpy_function`` call (tensorflow/tensorflow#21277; a
script that kept ``it = iter(tf_dataset(...))`` to the end hung in 5 of 8 runs here). So the
first ``tf_dataset`` registers ``_release_iterators`` with ``atexit``: the process's tf.data
iterators are released while the interpreter still runs.
"""

from __future__ import annotations

import atexit
import gc
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import malloc, store
from .errors import ConfigError, StoreError, did_you_mean

TRANSFORMS = ("log1p", "divide_by_max", "add_channel_axis", "channels_first_to_last")


# --------------------------------------------------------------------------------------------
# the planner (no TensorFlow)


def chunk_order(n_chunks: int, *, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order in which the chunks of a split are read in *epoch* (the same for every shard)."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(n_chunks).astype(np.int64)
    return np.arange(n_chunks, dtype=np.int64)


def epoch_steps(events: int, batch_size: int, replicas: int = 1, drop_remainder: bool = False) -> int:
    """Steps one input pipeline makes from its *events* of an epoch.

    A step is one batch for each of the *replicas* the pipeline feeds: ``replicas *
    batch_size`` events, split equally among them. The last step of an epoch may be smaller
    (left out with *drop_remainder*): it takes the largest multiple of *replicas* of the events
    left, and is left out when they are fewer than the replicas.
    """
    full, tail = divmod(events, replicas * batch_size)
    return full + int(not drop_remainder and tail >= replicas)


def shard_events(n_events: int, num_shards: int, batch_size: int | None = None, *, replicas: int = 1,
                 drop_remainder: bool = False, equal: bool = False) -> list[int]:
    """How many events each of *num_shards* input pipelines reads in an epoch.

    Every shard gets ``n_events // num_shards``; the ``n_events % num_shards`` left over go one
    each to the first shards when that gives no shard more steps (:func:`epoch_steps`) than
    another, and are otherwise left out of the epoch (fewer than *num_shards* events, a
    different few each shuffled epoch), so that every replica takes the same number of steps.
    With *equal* (each shard feeds one replica of a synchronous step) they are always left
    out: every step then gives every replica a batch of the same size.
    """
    if num_shards < 1:
        msg = f"num_shards must be positive, got {num_shards}"
        raise ValueError(msg)
    base, extra = divmod(n_events, num_shards)
    if extra and (equal or (batch_size and (epoch_steps(base + 1, batch_size, replicas, drop_remainder)
                                           != epoch_steps(base, batch_size, replicas, drop_remainder)))):
        extra = 0
    return [base + (s < extra) for s in range(num_shards)]


@dataclass(frozen=True)
class EpochPlan:
    """Which rows of which chunks one input pipeline (shard) reads per epoch, in what order.

    In each epoch the chunks are read in one seeded order (:func:`chunk_order`), the events of
    each chunk in a seeded permutation (:meth:`row_order`); the shards split that stream of
    events into consecutive runs of :func:`shard_events` events. A shard therefore reads whole
    chunks except where its run starts or ends inside one (at most ``num_shards - 1`` chunks an
    epoch are read by two shards, each for its own rows), and no event is delivered twice in
    an epoch. With ``batch_size`` and ``replicas`` (how many replicas the shard's batches go
    to in turn), a run ends where the epoch's last step can still give every replica at
    least one event (:attr:`delivered`).
    """

    n_events: int
    chunk_events: int
    seed: int = 0
    shuffle: bool = True
    num_shards: int = 1
    shard: int = 0
    batch_size: int | None = None
    drop_remainder: bool = False
    replicas: int = 1
    equal_shards: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.num_shards:
            msg = f"shard {self.shard} is not in [0, {self.num_shards})"
            raise ValueError(msg)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_events // self.chunk_events)

    @property
    def shard_events(self) -> int:
        """Events this shard reads in an epoch."""
        return self._sizes()[self.shard]

    def _sizes(self) -> list[int]:
        return shard_events(self.n_events, self.num_shards, self.batch_size, replicas=self.replicas,
                            drop_remainder=self.drop_remainder, equal=self.equal_shards)

    @property
    def delivered(self) -> int:
        """Events this shard delivers in an epoch: :attr:`shard_events`, less what its last
        step cannot split equally among the replicas (fewer than ``replicas`` events; any
        partial step, with ``drop_remainder``)."""
        events = self.shard_events
        if not self.batch_size:
            return events
        full, tail = divmod(events, self.replicas * self.batch_size)
        kept = 0 if self.drop_remainder else tail - tail % self.replicas
        return full * self.replicas * self.batch_size + kept

    @property
    def steps(self) -> int:
        """Steps an epoch takes (the same for every shard; needs ``batch_size``)."""
        return epoch_steps(self.shard_events, self.batch_size or 1, self.replicas, self.drop_remainder)

    def chunk_size(self, chunk: int) -> int:
        return min(self.chunk_events, self.n_events - chunk * self.chunk_events)

    def spans(self, epoch: int) -> np.ndarray:
        """``(epoch, chunk, start, stop)`` rows (int64): this shard reads positions
        ``[start, stop)`` of each chunk's permuted rows in *epoch*, in this order."""
        first = sum(self._sizes()[: self.shard])
        last = first + self.delivered
        rows = []
        position = 0
        for chunk in chunk_order(self.n_chunks, epoch=epoch, seed=self.seed, shuffle=self.shuffle):
            size = self.chunk_size(int(chunk))
            start, stop = max(first - position, 0), min(last - position, size)
            if start < stop:
                rows.append((epoch, int(chunk), start, stop))
            position += size
            if position >= last:
                break
        return np.array(rows, dtype=np.int64).reshape(-1, 4)

    def chunks(self, epoch: int) -> np.ndarray:
        """The chunks this shard reads in *epoch*, in order."""
        return self.spans(epoch)[:, 1]

    def events(self, epoch: int) -> np.ndarray:
        """The event indices this shard reads in *epoch*, in the order it delivers them."""
        parts = []
        for _, chunk, start, stop in self.spans(epoch):
            first = chunk * self.chunk_events
            order = self.row_order(epoch, int(chunk), self.chunk_size(int(chunk)))
            positions = np.arange(start, stop) if order is None else order[start:stop]
            parts.append(first + positions)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def row_order(self, epoch: int, chunk: int, n: int) -> np.ndarray | None:
        """The seeded order of the *n* events of *chunk* in *epoch* (None: unshuffled)."""
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, epoch, chunk]).permutation(n)


# --------------------------------------------------------------------------------------------
# reading a split


@dataclass(frozen=True)
class SplitSource:
    """The arrays of one split that a dataset reads, checked before any training starts."""

    path: str
    split: str
    fields: tuple[str, ...]
    n_events: int
    chunk_events: int
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, path: str | Path, split: str, fields: Sequence[str]) -> SplitSource:
        group = store.open_split(path, split)
        arrays = set(group.array_keys())
        for name in fields:
            if name not in arrays:
                msg = (f"store {str(path)!r}, split {split!r}: no field {name!r}{did_you_mean(name, arrays)} "
                       f"(fields: {sorted(arrays)})")
                raise StoreError(msg)
        if not fields:
            msg = "tf_dataset needs at least one field"
            raise ConfigError(msg)
        image = group[fields[0]]
        n_events = group["label"].shape[0] if "label" in arrays else image.shape[0]
        dtypes, shapes = {}, {}
        for name in fields:
            array = group[name]
            dims = array.metadata.dimension_names or ()
            if not dims or dims[0] != "event" or array.shape[0] != n_events:
                msg = (f"store {str(path)!r}, split {split!r}: field {name!r} is not a per-event array "
                       f"(dimensions {list(dims)}, shape {list(array.shape)}; the split has {n_events} events)")
                raise StoreError(msg)
            if array.dtype.kind in "OTU":
                msg = f"field {name!r} holds strings; tf_dataset streams numeric fields only"
                raise StoreError(msg)
            dtypes[name] = np.dtype(array.dtype)
            shapes[name] = tuple(array.shape[1:])
        # Reads go by the finest chunking; a build chunks small per-event arrays (label, ...)
        # by a multiple of the images' chunks (``store.array_chunk_events``).
        chunk = min(group[name].chunks[0] for name in fields)
        for name in fields:
            if group[name].chunks[0] % chunk:
                msg = f"field {name!r} is chunked by {group[name].chunks[0]} events, not a multiple of {chunk}"
                raise StoreError(msg)
        return cls(str(path), split, tuple(fields), int(n_events), int(chunk), dtypes, shapes)

    def reader(self) -> Callable[[int], tuple[np.ndarray, ...]]:
        """``read(chunk_index) -> arrays``: one whole chunk of every field.

        Chunks that hepdask wrote (little-endian bytes; zstd, Blosc or no compression; on a
        local file system) are read and decompressed directly (``store.ChunkFiles``): zarr's
        synchronous API passes every read through one event-loop thread, so parallel tf.data
        reads would not run in parallel. Any other layout is read through zarr. A chunk file
        that is missing (on a local file system) or does not decode is a ``StoreError``.
        """
        import zarr

        group = zarr.open_group(self.path, mode="r", zarr_format=3)[self.split]
        readers = [_chunk_reader(group[name]) for name in self.fields]

        def read(index) -> tuple[np.ndarray, ...]:
            start = int(index) * self.chunk_events
            stop = min(start + self.chunk_events, self.n_events)
            return tuple(r(int(index), start, stop) for r in readers)

        return read


def _chunk_reader(array) -> Callable[[int, int, int], np.ndarray]:
    """A function reading events ``[start, stop)`` of read chunk *i* of a Zarr array: all
    within one of the array's chunks, which may hold several read chunks."""
    per_chunk = array.chunks[0]
    chunk_file = store.chunk_file(array)

    def missing(index: int) -> StoreError:
        # A build writes every chunk: zarr would hand over fill values for a missing one.
        msg = (f"chunk {index} of {array.path!r} is missing ({chunk_file(index)}): the store is damaged; "
               f"'hepdask verify' lists what else is")
        return StoreError(msg)

    def via_zarr(i: int, start: int, stop: int) -> np.ndarray:
        if chunk_file is not None and not chunk_file(start // per_chunk).is_file():
            raise missing(start // per_chunk)
        return np.asarray(array[start:stop])

    files = store.ChunkFiles.of(array)
    if files is None:
        return via_zarr

    def read(i: int, start: int, stop: int) -> np.ndarray:
        index, offset = divmod(start, per_chunk)
        try:
            values = files.read(index)
        except FileNotFoundError:
            raise missing(index) from None
        except (RuntimeError, ValueError) as err:  # zstd's or Blosc's decompression error, a short chunk
            msg = f"chunk {index} of {array.path!r} cannot be decoded ({err}): the store is damaged"
            raise StoreError(msg) from None
        return values[offset : offset + stop - start].astype(array.dtype, copy=False)

    return read


#: The split whose largest value ``divide_by_max`` divides every split by.
SCALE_SPLIT = "train"


def _train_maximum(path: str | Path, split: str, field: str) -> float:
    """``image_maximum`` of the train split, for ``divide_by_max`` on *split*."""
    splits = store.split_names(store.open_root(path))
    if SCALE_SPLIT not in splits:
        msg = (f"store {str(path)!r}: divide_by_max scales every split by the {SCALE_SPLIT!r} split's largest "
               f"value, and this store has no {SCALE_SPLIT!r} split (splits: {splits}; reading {split!r})")
        raise StoreError(msg)
    return image_maximum(path, SCALE_SPLIT, field)


def image_maximum(path: str | Path, split: str = "train", field: str = "image") -> float:
    """The largest value of a field (for ``divide_by_max``): the build's record of it
    (``hepdask:image_max``), or, for a store without one, read chunk by chunk."""
    recorded = store.open_root(path).attrs.get(store.PREFIX + "image_max", {}).get(split, {})
    if field in recorded:
        return float(recorded[field]) if recorded[field] > 0 else 1.0
    source = SplitSource.open(path, split, (field,))
    read = source.reader()
    return float(max((read(c)[0].max(initial=0) for c in range(-(-source.n_events // source.chunk_events))),
                     default=1.0))


# --------------------------------------------------------------------------------------------
# the tf.data adapter


def _import_tf():
    try:
        import tensorflow as tf
    except ImportError as err:
        msg = "hepdask.tfdata needs TensorFlow: pip install 'hepdask[tf]'"
        raise ImportError(msg) from err
    return tf


_exit_hook = []


def _release_iterators() -> None:
    """Drop the resource of every live tf.data iterator (``atexit``; see the module notes):
    TensorFlow then stops its pipeline while Python can still run the pending chunk reads.
    Frozen objects (``hepdask.heap``: the ``hepdask`` command freezes its heap before it
    exits) are not in ``gc.get_objects``, so they are thawed for the search and frozen again."""
    import tensorflow as tf

    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    for obj in gc.get_objects():
        if isinstance(obj, tf.data.Iterator) and hasattr(obj, "_iterator_resource"):
            del obj._iterator_resource
    if frozen:
        gc.freeze()


def _transform(tf, image, transforms: Sequence[str], scale: float | None):
    """*transforms* on *image*, a tensor of events along its first axis, in their order.
    *scale* is the stored image's maximum: ``divide_by_max`` after ``log1p`` divides by
    ``log1p`` of it, so that the largest value is 1 either way."""
    for name in transforms:
        if name == "log1p":
            image = tf.math.log1p(tf.cast(image, tf.float32))
            scale = None if scale is None else float(np.log1p(scale))
        elif name == "divide_by_max":
            image = tf.cast(image, tf.float32) / tf.constant(scale or 1.0, tf.float32)
        elif name == "add_channel_axis":
            image = tf.expand_dims(image, -1)
        elif name == "channels_first_to_last":
            rank = len(image.shape)
            image = tf.transpose(image, [0, *range(2, rank), 1])
        else:
            msg = f"unknown transform {name!r} (known: {list(TRANSFORMS)})"
            raise ConfigError(msg)
    return image


#: Per-epoch seeds of the optional shuffle buffer: ``seed * EPOCH_SEED_STRIDE + epoch``.
EPOCH_SEED_STRIDE = 1_000_003
#: Seeds are integers in ``[0, SEED_LIMIT)``: the shuffle buffer's per-epoch seeds stay int64
#: (``config.ReaderSeed`` says the same; this module does not import the config's pydantic).
SEED_LIMIT = 2**32


def _check_arguments(where: str, **values) -> None:
    """Refuse a ``tf_dataset`` argument of the wrong kind before TensorFlow sees it, naming it:
    *values* maps each name to ``(value, smallest allowed, None allowed)``."""
    for name, (value, least, optional) in values.items():
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            kind = f"an integer >= {least}" + (" or None" if optional else "")
            msg = f"{where}: {name} must be {kind}, got {value!r}"
            raise ConfigError(msg)


def _check_names(where: str, name: str, value) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not all(isinstance(v, str) for v in value):
        msg = f"{where}: {name} must be a list of names, got {value!r}"
        raise ConfigError(msg)
    return tuple(value)


#: The alignment at which TensorFlow takes a numpy array's memory for a tensor's instead of
#: copying it (``EIGEN_MAX_ALIGN_BYTES``: 64 in AVX-512 builds, less in others).
TENSOR_ALIGNMENT = 64


def _aligned_rows(values: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """``values[rows]`` in a new array aligned for TensorFlow: ``numpy_function`` hands it
    over without another copy (numpy's own allocations are 16-byte aligned, and TensorFlow
    copied each chunk: half the cost of handing it over, measured)."""
    n = len(range(*rows.indices(len(values)))) if isinstance(rows, slice) else len(rows)
    shape = (n, *values.shape[1:])
    size = int(np.prod(shape)) * values.dtype.itemsize
    memory = np.empty(size + TENSOR_ALIGNMENT, np.uint8)
    start = -memory.ctypes.data % TENSOR_ALIGNMENT
    out = memory[start : start + size].view(values.dtype).reshape(shape)
    if isinstance(rows, slice):
        out[...] = values[rows]
    else:
        np.take(values, rows, axis=0, out=out, mode="clip")  # "raise" would buffer the copy
    return out


def _split_among(tf, replicas: int):
    """A ``flat_map`` function cutting each batch into *replicas* consecutive batches of equal
    size (the planner's steps hold a multiple of *replicas* events)."""

    def split(*batch):
        size = tf.shape(batch[0], out_type=tf.int64)[0]
        bounds = tf.range(replicas + 1, dtype=tf.int64) * size // replicas
        return tf.data.Dataset.range(replicas).map(
            lambda i: tuple(t[bounds[i]:bounds[i + 1]] for t in batch))

    return split


def tf_dataset(
    store_path: str | Path,
    split: str = "train",
    *,
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    fields: Sequence[str] = ("image", "label"),
    shuffle_buffer: int | None = None,
    transforms: Sequence[str] = (),
    cast: str | None = "float32",
    epochs: int | None = 1,
    drop_remainder: bool = False,
    parallel_reads: int | None = None,
    num_shards: int = 1,
    shard: int = 0,
    replicas: int = 1,
    equal_shards: bool = False,
    as_dict: bool | None = None,
    malloc_tuning: bool = True,
    first_epoch: int = 0,
    skip_steps: int = 0,
):
    """A ``tf.data.Dataset`` of batches of *fields* of one split of a complete store.

    Whole Zarr chunks are read ``parallel_reads`` at a time (AUTOTUNE by default) in the
    planner's seeded per-epoch order, the events of each chunk in a seeded per-epoch
    permutation, and re-sliced into batches without per-event work (``rebatch``). A build
    shuffles the store globally, so every chunk already mixes samples; ``shuffle_buffer``
    adds a per-event shuffle buffer across chunks, at a per-event cost. Two fields give ``(x, y)`` tuples,
    other numbers of fields (or ``as_dict=True``) give dicts. ``transforms`` act, in their
    order, on the first field, which must be the image: ``log1p``, ``divide_by_max`` (by the
    train split's maximum), ``add_channel_axis``, ``channels_first_to_last``; ``cast`` sets the
    image dtype. ``parallel_reads`` may be ``tf.data.AUTOTUNE`` (-1, as None).

    Each epoch is batched on its own and takes exactly :func:`steps_per_epoch` steps (its last
    batch may be smaller); ``epochs=None`` repeats forever: pair it with that many
    ``steps_per_epoch`` in ``fit``. The k-th iteration of a finite dataset reads epochs
    ``first_epoch + k * epochs`` on, whatever was read ahead before (Keras iterates it once
    per epoch); every iteration of an endless one starts at ``first_epoch`` (Keras iterates
    it once per ``fit``, after a look at its first batch). A training resumed after
    ``first_epoch`` epochs reads the orders it would have read, and ``skip_steps`` leaves out
    that many steps of it (a resumed training whose epochs are not whole passes). Arguments of
    the wrong kind are refused (``ConfigError``) before TensorFlow sees them.
    ``num_shards``/``shard`` pick this input pipeline's run of each epoch; ``replicas`` is
    how many replicas take its batches in turn (under ``tf.distribute``,
    ``distributed_dataset`` sets all three), and each step's events are split evenly among
    them, so none gets an empty batch. ``equal_shards`` gives every shard the same number of
    events (each shard feeds one replica: ``distributed_dataset`` on CPUs).
    ``malloc_tuning`` applies ``hepdask.malloc.tune`` (glibc only; process-wide).
    """
    tf = _import_tf()
    where = "tf_dataset"
    if parallel_reads == tf.data.AUTOTUNE:
        parallel_reads = None
    _check_arguments(where, batch_size=(batch_size, 1, False), seed=(seed, 0, False), epochs=(epochs, 0, True),
                     shuffle_buffer=(shuffle_buffer, 0, True), parallel_reads=(parallel_reads, 1, True),
                     num_shards=(num_shards, 1, False), shard=(shard, 0, False), replicas=(replicas, 1, False),
                     first_epoch=(first_epoch, 0, False), skip_steps=(skip_steps, 0, False))
    if seed >= SEED_LIMIT:
        msg = f"{where}: seed must be below 2**32, got {seed}"
        raise ConfigError(msg)
    if shard >= num_shards:
        msg = f"{where}: shard must be below num_shards={num_shards}, got {shard}"
        raise ConfigError(msg)
    fields = _check_names(where, "fields", fields)
    transforms = _check_names(where, "transforms", transforms)
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        msg = f"unknown transform(s) {unknown} (known: {list(TRANSFORMS)})"
        raise ConfigError(msg)
    if cast is not None:
        try:
            cast = tf.as_dtype(cast).name
        except TypeError:
            msg = f"{where}: cast {cast!r} is not a TensorFlow dtype (float32, float16, bfloat16, uint8, ...)"
            raise ConfigError(msg) from None
    if not _exit_hook:
        _exit_hook.append(atexit.register(_release_iterators))
    if malloc_tuning:
        malloc.tune()
    source = SplitSource.open(store_path, split, fields)
    if (transforms or cast) and not source.shapes[fields[0]]:
        msg = (f"{where}: transforms and cast act on the first field, the image, but {fields[0]!r} holds one "
               f"number per event: put the image field first (or give cast=None and no transforms)")
        raise ConfigError(msg)
    plan = EpochPlan(source.n_events, source.chunk_events, seed, shuffle, num_shards, shard, batch_size,
                     drop_remainder, replicas, equal_shards)
    if source.n_events and not plan.steps:
        msg = (f"store {str(store_path)!r}, split {split!r}: {source.n_events} event(s) are too few for "
               f"{num_shards} input pipeline(s) feeding {replicas} replica(s) each in batches of {batch_size}")
        raise ConfigError(msg)
    if not source.n_events and epochs is None:
        msg = f"store {str(store_path)!r}, split {split!r} has no events: an endless dataset of it would never yield"
        raise ConfigError(msg)
    # Every split is scaled by the train split's maximum, so val and test see the same scale.
    scale = _train_maximum(store_path, split, fields[0]) if "divide_by_max" in transforms else None
    read = source.reader()
    out_types = tuple(tf.as_dtype(source.dtypes[f]) for f in fields)
    autotune = tf.data.AUTOTUNE

    def read_span(epoch, chunk, start, stop):
        arrays = read(chunk)
        order = plan.row_order(int(epoch), int(chunk), len(arrays[0]))
        rows = slice(start, stop) if order is None else order[start:stop]
        return tuple(_aligned_rows(a, rows) for a in arrays)

    def read_chunk(span):
        arrays = tf.numpy_function(read_span, [span[0], span[1], span[2], span[3]], out_types, stateful=False)
        arrays = [tf.ensure_shape(a, (None, *source.shapes[f])) for a, f in zip(arrays, fields)]
        # Transforms and the cast act on the whole chunk here, in the parallel map and before
        # rebatching: the batches are then cut from the cast tensor. (Casting each batch after
        # rebatch was measured 15 % slower on uint8 images: benchmarks/RESULTS.md.)
        image = _transform(tf, arrays[0], transforms, scale)
        if cast:
            image = tf.cast(image, cast)
        return (image, *arrays[1:])

    # Epoch numbers: the k-th iteration of a finite dataset (Keras starts one per epoch)
    # reads epochs first_epoch + k * epochs and on, so every pass reads a new chunk order, the
    # same in every run; an endless one always starts at first_epoch, however many iterators
    # were opened to look at it. The iteration count is taken once, when an iterator starts,
    # and the epochs within it are counted in the graph: how far prefetching has read ahead
    # never changes them. Each epoch is batched on its own, so it takes exactly ``plan.steps``
    # steps: with ``epochs=None`` and that many ``steps_per_epoch``, every Keras epoch is one
    # planner epoch. (A from_generator of the
    # spans, one Python call per chunk, cost a third of the throughput.)
    iterations = itertools.count()
    per_iteration = 0 if epochs is None else epochs
    step_events = replicas * batch_size

    def one_epoch(epoch):
        spans = tf.numpy_function(lambda e: plan.spans(int(e)), [epoch], tf.int64, stateful=False)
        events = tf.data.Dataset.from_tensor_slices(tf.ensure_shape(spans, (None, 4)))
        events = events.map(read_chunk, num_parallel_calls=parallel_reads or autotune, deterministic=True)
        if shuffle and shuffle_buffer:
            # Mixing across chunks costs per-event work in tf.data; the store is already
            # globally shuffled at build time, so this is opt-in.
            events = events.unbatch().shuffle(shuffle_buffer, seed=seed * EPOCH_SEED_STRIDE + epoch)
            events = events.batch(step_events, drop_remainder=drop_remainder, num_parallel_calls=autotune,
                                  deterministic=True)
        else:
            events = events.rebatch(step_events, drop_remainder=drop_remainder)
        return events if replicas == 1 else events.flat_map(_split_among(tf, replicas))

    def first_of_iteration(_):
        return np.int64(first_epoch + next(iterations) * per_iteration)

    def epochs_from(first):
        count = tf.data.Dataset.counter() if epochs is None else tf.data.Dataset.range(epochs)
        return count.map(lambda i: first + i)

    numbered = tf.data.Dataset.range(1).map(
        lambda unused: tf.numpy_function(first_of_iteration, [unused], tf.int64, stateful=True)).flat_map(epochs_from)
    options = tf.data.Options()
    options.deterministic = True
    # No model-based autotuning: deleting an iterator waited for its tuning thread to sleep
    # out its period, which doubles up to 60 s (2 to 16 s here, at random; Keras deletes the
    # validation iterator every epoch). Without it, AUTOTUNE reads min(16, cores) chunks at a
    # time and the prefetch buffer grows on demand, as fast as the model's tuning measured.
    options.autotune.enabled = False
    dataset = numbered.flat_map(one_epoch)
    if skip_steps:
        dataset = dataset.skip(skip_steps * replicas)  # a step takes one batch per replica of this pipeline
    if epochs is None:
        # Known to be endless, tf.distribute skips its checks for a partial last batch.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    elif replicas == 1:
        # tf.data cannot count batches through numpy_function; Keras needs the count to end
        # an epoch without warning that the input "ran out of data". (Under a strategy Keras
        # would take this per-replica count for steps: there, pass steps_per_epoch.)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(max(0, epochs * plan.steps - skip_steps)))

    dict_out = as_dict if as_dict is not None else len(fields) != 2
    if dict_out:
        dataset = dataset.map(lambda *batch: dict(zip(fields, batch)))
    return dataset.with_options(options).prefetch(autotune)


def steps_per_epoch(n_events: int, global_batch_size: int, *, replicas: int = 1, num_shards: int = 1,
                    drop_remainder: bool = False) -> int:
    """The steps an epoch of *n_events* takes at *global_batch_size* over *replicas* replicas fed
    by *num_shards* input pipelines: what ``fit`` needs as ``steps_per_epoch`` (and
    ``validation_steps``) for datasets that repeat (``epochs=None``)."""
    batch_size, per_pipeline = global_batch_size // replicas, replicas // num_shards
    events = shard_events(n_events, num_shards, batch_size, replicas=per_pipeline, drop_remainder=drop_remainder)
    return epoch_steps(events[0], batch_size, per_pipeline, drop_remainder)


def distributed_dataset(strategy, store_path: str | Path, split: str = "train", *, global_batch_size: int,
                        map_fn: Callable | None = None, **kwargs):
    """``tf_dataset`` under a ``tf.distribute`` strategy: one shard per input pipeline,
    batched at the per-replica batch size and handed to the pipeline's replicas in turn
    (``InputContext``), each batch mapped by *map_fn* if given. With ``epochs=None``, give
    ``fit`` :func:`steps_per_epoch` steps."""
    replicas = strategy.num_replicas_in_sync
    _check_arguments("distributed_dataset", global_batch_size=(global_batch_size, 1, False))
    if global_batch_size % replicas:
        msg = f"global batch size {global_batch_size} is not divisible by the {replicas} replicas"
        raise ConfigError(msg)

    options = _input_options(strategy)
    per_replica = options.experimental_replication_mode == _import_tf().distribute.InputReplicationMode.PER_REPLICA

    def dataset_fn(context):
        dataset = tf_dataset(
            store_path, split, batch_size=context.get_per_replica_batch_size(global_batch_size),
            num_shards=context.num_input_pipelines, shard=context.input_pipeline_id,
            replicas=replicas // context.num_input_pipelines, equal_shards=per_replica, **kwargs,
        )
        return dataset if map_fn is None else dataset.map(map_fn)

    return strategy.distribute_datasets_from_function(dataset_fn, options)


def _input_options(strategy):
    """How the strategy takes its input. Where every replica is on a CPU (logical CPUs), each
    replica gets a pipeline of its own (one shard of every epoch) and nothing is fetched to
    the devices. On accelerators, one pipeline per worker feeds its replicas in turn and
    prefetches to them: that goes through a MultiDeviceIterator, whose per-device datasets
    tf.data autotunes, and deleting it (Keras does for the validation input every epoch and
    for the training input at the end of ``fit``) waited at random for the tuning thread
    to sleep out its period, which doubles up to 60 s: 2 to 17 s here on CPUs."""
    tf = _import_tf()

    devices = strategy.extended.worker_devices
    if not all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices):
        return tf.distribute.InputOptions()
    if isinstance(strategy, tf.distribute.MirroredStrategy):  # the one strategy that takes PER_REPLICA
        return tf.distribute.InputOptions(experimental_fetch_to_device=False,
                                          experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)
    return tf.distribute.InputOptions(experimental_fetch_to_device=False)
