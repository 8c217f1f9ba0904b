"""Stream a hepdask store into ``tf.data``: whole chunks, read in parallel, never the whole array.

Two layers, as xbatcher separates them:

* a pure planner (``chunk_order``, ``EpochPlan``): which chunks, in which order, for which
  input pipeline, per epoch, seeded. It needs no TensorFlow and is tested without it.
* a thin adapter (``tf_dataset``, ``distributed_dataset``): chunk indices from the planner →
  parallel ``tf.numpy_function`` chunk reads (rows permuted per epoch, then transformed and
  cast as whole chunks) → rebatch → prefetch; an optional per-event shuffle buffer across
  chunks.

Under ``tf.distribute``, ``distributed_dataset`` builds the input with
``strategy.distribute_datasets_from_function``: each input pipeline (``InputContext``) reads its
own chunks, batches at the per-replica batch size, and tf.distribute hands consecutive batches to
the replicas, so no event is read twice in an epoch. A last, partial batch is handled as
tf.distribute documents (replicas may receive smaller or empty batches) unless
``drop_remainder`` is set.

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
from .errors import ConfigError, StoreError

TRANSFORMS = ("log1p", "divide_by_max", "add_channel_axis", "channels_first_to_last")


# --------------------------------------------------------------------------------------------
# the planner (no TensorFlow)


def chunk_order(n_chunks: int, *, epoch: int, seed: int, shuffle: bool, num_shards: int = 1,
                shard: int = 0) -> np.ndarray:
    """Chunk indices one input pipeline reads in *epoch*.

    All shards draw the same seeded permutation for the epoch and take every
    ``num_shards``-th chunk from position *shard*, so together they read every chunk exactly
    once and no chunk twice.
    """
    if not 0 <= shard < num_shards:
        msg = f"shard {shard} is not in [0, {num_shards})"
        raise ValueError(msg)
    order = np.arange(n_chunks, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n_chunks)
    return order[shard::num_shards]


@dataclass(frozen=True)
class EpochPlan:
    """The chunk ranges of a split and the per-epoch order each shard reads them in."""

    n_events: int
    chunk_events: int
    seed: int = 0
    shuffle: bool = True
    num_shards: int = 1
    shard: int = 0

    @property
    def n_chunks(self) -> int:
        return -(-self.n_events // self.chunk_events)

    def chunks(self, epoch: int) -> np.ndarray:
        return chunk_order(self.n_chunks, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                           num_shards=self.num_shards, shard=self.shard)

    def events(self, epoch: int) -> np.ndarray:
        """The event indices this shard reads in *epoch*, in the order it delivers them."""
        parts = []
        for c in self.chunks(epoch):
            rows = np.arange(c * self.chunk_events, min((c + 1) * self.chunk_events, self.n_events))
            order = self.row_order(epoch, int(c), rows.size)
            parts.append(rows if order is None else rows[order])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def pairs(self, epoch: int) -> np.ndarray:
        """``(epoch, chunk)`` rows (int64) of the chunks this shard reads in *epoch*, in order."""
        chunks = self.chunks(epoch).astype(np.int64)
        return np.stack([np.full(chunks.size, epoch, np.int64), chunks], axis=1)

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
                msg = f"store {str(path)!r}, split {split!r}: no field {name!r} (fields: {sorted(arrays)})"
                raise StoreError(msg)
        if not fields:
            msg = "tf_dataset needs at least one field"
            raise ConfigError(msg)
        image = group[fields[0]]
        dtypes, shapes = {}, {}
        for name in fields:
            array = group[name]
            if array.dtype.kind in "OTU":
                msg = f"field {name!r} holds strings; tf_dataset streams numeric fields only"
                raise StoreError(msg)
            dtypes[name] = np.dtype(array.dtype)
            shapes[name] = tuple(array.shape[1:])
        chunk = group[fields[0]].chunks[0]
        for name in fields:
            if group[name].chunks[0] != chunk:
                msg = f"field {name!r} is chunked by {group[name].chunks[0]} events, {fields[0]!r} by {chunk}"
                raise StoreError(msg)
        return cls(str(path), split, tuple(fields), int(image.shape[0]), int(chunk), dtypes, shapes)

    def reader(self) -> Callable[[int], tuple[np.ndarray, ...]]:
        """``read(chunk_index) -> arrays``: one whole chunk of every field.

        Chunks that hepdask wrote (little-endian bytes, zstd or no compression, on a local
        file system) are read and decompressed directly (``store.ChunkFiles``): zarr's
        synchronous API passes every read through one event-loop thread, so parallel tf.data
        reads would not run in parallel. Any other layout, or a missing chunk file, is read
        through zarr.
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
    """A function reading events ``[start, stop)`` of chunk *i* of a Zarr array."""

    def via_zarr(i: int, start: int, stop: int) -> np.ndarray:
        return np.asarray(array[start:stop])

    files = store.ChunkFiles.of(array)
    if files is None:
        return via_zarr

    def read(i: int, start: int, stop: int) -> np.ndarray:
        try:
            values = files.read(i)
        except FileNotFoundError:
            return via_zarr(i, start, stop)
        return values[: stop - start].astype(array.dtype, copy=False)

    return read


def image_maximum(path: str | Path, split: str = "train", field: str = "image") -> float:
    """The largest value of a field, read chunk by chunk (for ``divide_by_max``)."""
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
    """*transforms* on *image*, a tensor of events along its first axis."""
    for name in transforms:
        if name == "log1p":
            image = tf.math.log1p(tf.cast(image, tf.float32))
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
    as_dict: bool | None = None,
    malloc_tuning: bool = True,
):
    """A ``tf.data.Dataset`` of batches of *fields* of one split of a complete store.

    Whole Zarr chunks are read ``parallel_reads`` at a time (AUTOTUNE by default) in the
    planner's seeded per-epoch order, the events of each chunk in a seeded per-epoch
    permutation, and re-sliced into batches without per-event work (``rebatch``). A build
    shuffles the store globally, so every chunk already mixes samples; ``shuffle_buffer``
    adds a per-event shuffle buffer across chunks, at a per-event cost. Two fields give ``(x, y)`` tuples,
    other numbers of fields (or ``as_dict=True``) give dicts. ``transforms`` act on the first
    field (the image): ``log1p``, ``divide_by_max`` (the split's maximum), ``add_channel_axis``,
    ``channels_first_to_last``; ``cast`` sets the image dtype. ``epochs=None`` repeats forever
    (pair it with ``steps_per_epoch``).
    Each new iteration of the dataset continues the epoch count where the last one stopped.
    ``malloc_tuning`` applies ``hepdask.malloc.tune`` (glibc only; process-wide).
    """
    tf = _import_tf()
    if not _exit_hook:
        _exit_hook.append(atexit.register(_release_iterators))
    if malloc_tuning:
        malloc.tune()
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size}"
        raise ConfigError(msg)
    source = SplitSource.open(store_path, split, tuple(fields))
    plan = EpochPlan(source.n_events, source.chunk_events, seed, shuffle, num_shards, shard)
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        msg = f"unknown transform(s) {unknown} (known: {list(TRANSFORMS)})"
        raise ConfigError(msg)
    # Every split is scaled by the train split's maximum, so val and test see the same scale.
    scale = image_maximum(store_path, "train", fields[0]) if "divide_by_max" in transforms else None
    read = source.reader()
    out_types = tuple(tf.as_dtype(source.dtypes[f]) for f in fields)
    autotune = tf.data.AUTOTUNE

    def read_shuffled(epoch, index):
        arrays = read(index)
        order = plan.row_order(int(epoch), int(index), len(arrays[0]))
        return arrays if order is None else tuple(a[order] for a in arrays)

    def read_chunk(pair):
        arrays = tf.numpy_function(read_shuffled, [pair[0], pair[1]], out_types, stateful=False)
        arrays = [tf.ensure_shape(a, (None, *source.shapes[f])) for a, f in zip(arrays, fields)]
        # Transforms and the cast act on the whole chunk here, in the parallel map and before
        # rebatching: the batches are then cut from the cast tensor. (Casting each batch after
        # rebatch was measured 15 % slower on uint8 images: benchmarks/RESULTS.md.)
        image = _transform(tf, arrays[0], transforms, scale)
        if cast:
            image = tf.cast(image, cast)
        return (image, *arrays[1:])

    # The (epoch, chunk) pairs come one epoch at a time from a numbered epoch counter: each
    # new iteration of the dataset (Keras starts one per epoch) continues the planner's epochs
    # instead of starting again at epoch 0, so every pass reads a new chunk order. (A
    # from_generator of the pairs, one Python call per chunk, cost a third of the throughput.)
    started = itertools.count()

    def pairs_of_next_epoch(unused):
        pairs = tf.numpy_function(lambda _: plan.pairs(next(started)), [unused], tf.int64, stateful=True)
        return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(pairs, (None, 2)))

    indices = tf.data.Dataset.range(1).repeat(epochs).flat_map(pairs_of_next_epoch)
    options = tf.data.Options()
    options.deterministic = True
    dataset = indices.map(read_chunk, num_parallel_calls=parallel_reads or autotune, deterministic=True)
    if shuffle and shuffle_buffer:
        # Mixing across chunks costs per-event work in tf.data; the store is already
        # globally shuffled at build time, so this is opt-in.
        dataset = dataset.unbatch().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=autotune,
                                deterministic=True)
    else:
        dataset = dataset.rebatch(batch_size, drop_remainder=drop_remainder)

    dict_out = as_dict if as_dict is not None else len(fields) != 2
    if dict_out:
        dataset = dataset.map(lambda *batch: dict(zip(fields, batch)))
    return dataset.with_options(options).prefetch(autotune)


def distributed_dataset(strategy, store_path: str | Path, split: str = "train", *, global_batch_size: int,
                        **kwargs):
    """``tf_dataset`` under a ``tf.distribute`` strategy: one shard per input pipeline,
    batched at the per-replica batch size (``InputContext``)."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        msg = f"global batch size {global_batch_size} is not divisible by the {replicas} replicas"
        raise ConfigError(msg)

    def dataset_fn(context):
        return tf_dataset(
            store_path, split, batch_size=context.get_per_replica_batch_size(global_batch_size),
            num_shards=context.num_input_pipelines, shard=context.input_pipeline_id, **kwargs,
        )

    return strategy.distribute_datasets_from_function(dataset_fn)
