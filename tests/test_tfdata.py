"""The chunk planner (no TensorFlow) and the tf.data adapter."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from hepdask import tfdata
from hepdask.errors import ConfigError, StoreError
from hepdask.tfdata import EpochPlan, chunk_order, shard_events

from .data_generation import chunk_file


@pytest.mark.parametrize(("n_events", "shards", "batch"), [(1000, 1, 64), (1000, 2, 64), (1001, 2, 64),
                                                          (1001, 3, 7), (640, 3, 64), (129, 2, 64)])
def test_shards_split_every_epoch_into_equal_runs_and_read_no_event_twice(n_events, shards, batch):
    for epoch in range(3):
        plans = [EpochPlan(n_events, 128, seed=4, shuffle=True, num_shards=shards, shard=s, batch_size=batch)
                 for s in range(shards)]
        parts = [p.events(epoch) for p in plans]
        together = np.concatenate(parts)
        assert np.unique(together).size == together.size  # no event twice
        assert together.size > n_events - shards  # at most num_shards - 1 left out
        sizes = [p.size for p in parts]
        assert sizes == shard_events(n_events, shards, batch)
        assert len({-(-n // batch) for n in sizes}) == 1  # every replica takes the same number of steps
        assert min(sizes) > 0
        # Whole chunks, except where a run starts or ends: at most shards - 1 chunks read twice.
        reads = sum(len(p.spans(epoch)) for p in plans)
        assert reads <= plans[0].n_chunks + shards - 1


def test_left_over_events_go_out_only_when_they_would_not_add_a_batch():
    assert shard_events(1001, 2, 64) == [501, 500]
    assert shard_events(1001, 2, 500) == [500, 500]  # 501 would need a second batch of 1 event
    assert shard_events(1001, 2, 500, drop_remainder=True) == [501, 500]  # both make one batch
    assert shard_events(1001, 2, 501, drop_remainder=True) == [500, 500]  # 501 would make one batch
    assert shard_events(3, 2, 64) == [2, 1]
    assert shard_events(1, 2, 64) == [0, 0]
    assert shard_events(10, 1, 3) == [10]


def test_shards_that_each_feed_a_replica_are_equal():
    """One shard per replica of a synchronous step: the last batches must be of one size too."""
    assert shard_events(1001, 2, 64, equal=True) == [500, 500]
    assert shard_events(117, 2, 256, equal=True) == [58, 58]
    plans = [EpochPlan(1001, 128, num_shards=2, shard=s, batch_size=64, equal_shards=True) for s in range(2)]
    parts = [p.events(1) for p in plans]
    assert [p.size for p in parts] == [500, 500] and np.unique(np.concatenate(parts)).size == 1000


def test_chunk_order_is_seeded_and_changes_per_epoch():
    a = chunk_order(50, epoch=0, seed=1, shuffle=True)
    assert np.array_equal(a, chunk_order(50, epoch=0, seed=1, shuffle=True))
    assert not np.array_equal(a, chunk_order(50, epoch=1, seed=1, shuffle=True))
    assert not np.array_equal(a, chunk_order(50, epoch=0, seed=2, shuffle=True))
    assert chunk_order(5, epoch=3, seed=1, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shard 2"):
        EpochPlan(5, 1, num_shards=2, shard=2)


def test_epoch_plan_covers_a_ragged_last_chunk():
    plan = EpochPlan(n_events=1000, chunk_events=128, seed=0, shuffle=True)
    assert plan.n_chunks == 8
    assert sorted(plan.events(0).tolist()) == list(range(1000))
    assert sum(len(plan.spans(e)) for e in range(2)) == 16
    spans = plan.spans(1)
    assert (spans[:, 0] == 1).all() and np.array_equal(spans[:, 1], chunk_order(8, epoch=1, seed=0, shuffle=True))
    assert spans[:, 2].tolist() == [0] * 8
    assert sorted(spans[:, 3].tolist()) == [104] + [128] * 7


def test_events_of_a_chunk_come_in_a_new_seeded_order_every_epoch():
    plan = EpochPlan(n_events=100, chunk_events=128, seed=5, shuffle=True)  # one chunk: no chunk order
    orders = [plan.row_order(epoch, 0, 100) for epoch in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(100))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    assert np.array_equal(plan.events(1), orders[1])
    assert np.array_equal(EpochPlan(100, 128, seed=5).events(1), plan.events(1))  # reproducible
    assert not np.array_equal(EpochPlan(100, 128, seed=6).events(1), plan.events(1))
    assert not np.array_equal(EpochPlan(100, 128, seed=6).row_order(0, 0, 100), orders[0])
    assert EpochPlan(100, 128, shuffle=False).row_order(0, 0, 100) is None
    assert EpochPlan(100, 128, shuffle=False).events(1).tolist() == list(range(100))


def _steps(plan: EpochPlan, epoch: int) -> list[np.ndarray]:
    """The events of each step of *epoch*: ``replicas * batch_size`` at a time, the last fewer."""
    events = plan.events(epoch)
    size = plan.replicas * plan.batch_size
    return [events[s : s + size] for s in range(0, events.size, size)]


@pytest.mark.parametrize(("n_events", "steps", "delivered"), [(128, 1, 128), (129, 1, 128), (130, 2, 130),
                                                             (131, 2, 130), (257, 2, 256), (45, 1, 44)])
def test_no_step_gives_a_replica_an_empty_batch(n_events, steps, delivered):
    """Two replicas, 64 events each a step: a last step of fewer events than replicas (one
    event) is left out, a last step of two or more is split equally between them (an odd
    event left out: batches of 22 and 23 events failed a first step under MirroredStrategy)."""
    plan = EpochPlan(n_events, 128, seed=3, batch_size=64, replicas=2)
    assert (plan.steps, plan.delivered) == (steps, delivered)
    assert tfdata.steps_per_epoch(n_events, 128, replicas=2) == steps
    for epoch in range(2):
        parts = _steps(plan, epoch)
        assert len(parts) == steps
        assert all(part.size >= plan.replicas and part.size % plan.replicas == 0 for part in parts)
        assert np.unique(np.concatenate(parts)).size == delivered


@pytest.mark.parametrize("rows", [slice(0, 37), slice(5, 20), np.array([36, 0, 7, 7, 12])])
@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32"])
def test_chunk_rows_are_handed_over_aligned_for_tensorflow(rows, dtype):
    """TensorFlow takes a numpy_function's array without copying it only at this alignment."""
    values = np.arange(37 * 3 * 5).reshape(37, 3, 5).astype(dtype)[:, :, 1:]  # not contiguous
    out = tfdata._aligned_rows(values, rows)
    assert out.ctypes.data % tfdata.TENSOR_ALIGNMENT == 0
    assert out.flags.c_contiguous and out.dtype == values.dtype
    np.testing.assert_array_equal(out, values[rows])


def test_import_hepdask_does_not_import_tensorflow():
    code = "import sys, hepdask, hepdask.tfdata; print('tensorflow' in sys.modules, 'matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def _keys(batch) -> np.ndarray:
    """A unique event key: eventNumber is unique within a sample, label tells the sample."""
    return batch["eventNumber"].numpy().astype(np.int64) * 2 + batch["label"].numpy().astype(np.int64)


FIELDS = ("image", "label", "eventNumber")


def test_one_epoch_reads_every_event_once_in_whole_chunks(tf_two_cpus, train_store, monkeypatch):
    reads = []
    original = tfdata.SplitSource.reader

    def counting(self):
        read = original(self)

        def wrapped(index):
            arrays = read(index)
            reads.append(len(arrays[0]))
            return arrays

        return wrapped

    monkeypatch.setattr(tfdata.SplitSource, "reader", counting)
    ds = tfdata.tf_dataset(train_store, "train", batch_size=100, fields=FIELDS, seed=1)
    keys = np.concatenate([_keys(b) for b in ds])
    n = zarr.open_group(str(train_store), mode="r")["train"]["image"].shape[0]
    assert keys.size == n
    assert np.unique(keys).size == n
    assert max(reads) <= 128
    assert sum(reads) == n


def test_every_field_of_a_delivered_event_is_of_the_same_event(tf_two_cpus, train_store):
    """Labels and event fields are chunked coarser than the images (a multiple of them):
    each delivered image still comes with its own label and event number."""
    from hepdask import store

    group = zarr.open_group(str(train_store), mode="r")["train"]
    assert group["label"].chunks[0] == store.EVENT_ARRAY_CHUNKS * group["image"].chunks[0]
    images = group["image"][:]
    keys = group["eventNumber"][:].astype(np.int64) * 2 + group["label"][:].astype(np.int64)
    where = {int(k): i for i, k in enumerate(keys)}
    seen = 0
    for batch in tfdata.tf_dataset(train_store, "train", batch_size=500, fields=FIELDS, seed=3):
        for key, image in zip(_keys(batch), batch["image"].numpy()):
            np.testing.assert_array_equal(image, images[where[int(key)]])
            seen += 1
    assert seen == images.shape[0]


def test_shuffling_is_seeded(tf_two_cpus, train_store):
    def order(seed):
        return np.concatenate([_keys(b) for b in tfdata.tf_dataset(train_store, "val", batch_size=64,
                                                                   fields=FIELDS, seed=seed)])  # fmt: skip

    assert np.array_equal(order(5), order(5))
    assert not np.array_equal(order(5), order(6))


def test_a_resumed_stream_continues_where_the_uninterrupted_one_would_be(tf_two_cpus, train_store):
    """first_epoch and skip_steps put a new pipeline where an old one was after that many
    epochs and steps: what a training resumed from its backup reads."""
    def batches(n, **kwargs):
        stream = tfdata.tf_dataset(train_store, "train", batch_size=64, fields=FIELDS, seed=4, epochs=None, **kwargs)
        return [_keys(b) for b in stream.take(n)]

    steps = tfdata.steps_per_epoch(tfdata.SplitSource.open(train_store, "train", FIELDS).n_events, 64)
    whole = batches(steps + 4)
    for got, want in zip(batches(3, skip_steps=2), whole[2:5]):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(batches(3, first_epoch=1, skip_steps=1), whole[steps + 1 : steps + 4]):
        np.testing.assert_array_equal(got, want)


def test_batches_transforms_and_dtypes(tf_two_cpus, train_store):
    ds = tfdata.tf_dataset(train_store, "val", batch_size=32, shuffle=False, transforms=["log1p", "add_channel_axis"])
    image, label = next(iter(ds))
    assert tuple(image.shape) == (32, 17, 16, 1)
    assert image.dtype.name == "float32"
    raw = zarr.open_group(str(train_store), mode="r")["val"]["image"][:32]
    np.testing.assert_allclose(image.numpy()[..., 0], np.log1p(raw), rtol=1e-6)
    assert label.shape == (32,)


def test_mirrored_strategy_replicas_see_every_event_once(tf_two_cpus, train_store):
    tf = tf_two_cpus
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    dist = tfdata.distributed_dataset(strategy, train_store, "val", global_batch_size=64, fields=FIELDS, seed=2)
    per_replica = [[], []]
    for batch in dist:
        labels = strategy.experimental_local_results(batch["label"])
        numbers = strategy.experimental_local_results(batch["eventNumber"])
        for r in range(2):
            per_replica[r].append(numbers[r].numpy().astype(np.int64) * 2 + labels[r].numpy().astype(np.int64))
    keys = [np.concatenate(k) for k in per_replica]
    assert keys[0].size > 0
    assert keys[1].size > 0
    n = zarr.open_group(str(train_store), mode="r")["val"]["image"].shape[0]
    together = np.concatenate(keys)
    assert together.size == n
    assert np.unique(together).size == n


def test_iterators_delete_without_waiting_for_tf_datas_tuning_thread(tf_two_cpus, train_store):
    """Deleting an iterator whose tf.data model-based autotuning ran waited, at random, for the
    tuning thread to sleep out its period (up to 60 s; Keras deletes the validation iterator
    every epoch): the pipelines are built without it, and a MirroredStrategy on CPUs gives each
    replica its own pipeline (the MultiDeviceIterator's per-device datasets are autotuned)."""
    tf = tf_two_cpus
    assert tfdata.tf_dataset(train_store, "val", batch_size=8).options().autotune.enabled is False
    mirrored = tfdata._input_options(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    assert mirrored.experimental_replication_mode == tf.distribute.InputReplicationMode.PER_REPLICA
    assert mirrored.experimental_fetch_to_device is False
    assert tfdata._input_options(tf.distribute.OneDeviceStrategy("/cpu:0")).experimental_fetch_to_device is False


def test_every_replica_gets_a_batch_of_one_size_at_every_step(tf_two_cpus, train_store):
    """Unequal batches in a step failed under MirroredStrategy (AddN must have the same size)."""
    tf = tf_two_cpus
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    n = zarr.open_group(str(train_store), mode="r")["val"]["image"].shape[0]
    dist = tfdata.distributed_dataset(strategy, train_store, "val", global_batch_size=48, fields=FIELDS, seed=2)
    sizes = [[int(t.shape[0]) for t in strategy.experimental_local_results(batch["label"])] for batch in dist]
    assert all(a == b > 0 for a, b in sizes)
    assert len(sizes) == tfdata.steps_per_epoch(n, 48, replicas=2) and sum(map(sum, sizes)) == n - n % 2


@pytest.mark.parametrize("shuffle_buffer", [None, 300])
def test_mirrored_epochs_are_whole_passes_without_empty_batches(tf_two_cpus, train_store, shuffle_buffer):
    """Repeating input under a 2-replica strategy: each run of steps_per_epoch steps is one
    pass (no event twice, at most 1 left out), in a new order, and every replica gets events
    at every step, the last one included (the split's size is not a multiple of the batch)."""
    tf = tf_two_cpus
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    n = zarr.open_group(str(train_store), mode="r")["val"]["image"].shape[0]
    global_batch = 64
    assert n % global_batch
    steps = tfdata.steps_per_epoch(n, global_batch, replicas=2)
    dist = tfdata.distributed_dataset(strategy, train_store, "val", global_batch_size=global_batch, fields=FIELDS,
                                      seed=2, epochs=None, shuffle_buffer=shuffle_buffer)
    it = iter(dist)
    passes = []
    for _ in range(2):
        keys = []
        for _ in range(steps):
            batch = next(it)
            labels = strategy.experimental_local_results(batch["label"])
            numbers = strategy.experimental_local_results(batch["eventNumber"])
            for r in range(2):
                assert numbers[r].shape[0] > 0
                keys.append(numbers[r].numpy().astype(np.int64) * 2 + labels[r].numpy().astype(np.int64))
        passes.append(np.concatenate(keys))
    for keys in passes:
        assert n - 1 <= keys.size <= n
        assert np.unique(keys).size == keys.size
    assert not np.array_equal(passes[0], passes[1])


def test_bad_requests_are_refused_before_training(tf_two_cpus, train_store, tmp_path):
    with pytest.raises(StoreError, match="no split 'valid'"):
        tfdata.tf_dataset(train_store, "valid")
    with pytest.raises(StoreError, match="no field 'energy'"):
        tfdata.tf_dataset(train_store, "train", fields=("energy", "label"))
    with pytest.raises(StoreError, match="no field 'imag'; did you mean 'image'"):
        tfdata.tf_dataset(train_store, "train", fields=("imag", "label"))
    with pytest.raises(StoreError, match="holds strings"):
        tfdata.tf_dataset(train_store, "train", fields=("sample", "label"))
    with pytest.raises(ConfigError, match="unknown transform"):
        tfdata.tf_dataset(train_store, "train", transforms=["sqrt"])
    strategy = tf_two_cpus.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas"):
        tfdata.distributed_dataset(strategy, train_store, "train", global_batch_size=33)
    incomplete = tmp_path / "incomplete.zarr"
    zarr.open_group(str(incomplete), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="incomplete"):
        tfdata.tf_dataset(incomplete, "train")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": None}, "seed must be an integer >= 0, got None"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": 2**60}, "seed must be below 2\\*\\*32"),
        ({"batch_size": 64.0}, "batch_size must be an integer >= 1, got 64.0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"epochs": -1}, "epochs must be an integer >= 0 or None"),
        ({"epochs": 1.0}, "epochs must be"),
        ({"first_epoch": -1}, "first_epoch must be"),
        ({"skip_steps": -1}, "skip_steps must be"),
        ({"shuffle_buffer": -5}, "shuffle_buffer must be"),
        ({"parallel_reads": -3}, "parallel_reads must be an integer >= 1 or None"),
        ({"num_shards": 0}, "num_shards must be"),
        ({"num_shards": 2, "shard": 2}, "shard must be below num_shards=2"),
        ({"replicas": 0}, "replicas must be"),
        ({"cast": "float33"}, "cast 'float33' is not a TensorFlow dtype"),
        ({"fields": "image"}, "fields must be a list of names, got 'image'"),
        ({"transforms": "log1p"}, "transforms must be a list of names"),
        ({"fields": ("label", "image")}, "'label' holds one number per event: put the image field first"),
    ],
)
def test_bad_arguments_are_refused_naming_them(tf_two_cpus, train_store, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tfdata.tf_dataset(train_store, "val", **kwargs)


def test_fields_that_are_not_per_event_are_refused(tf_two_cpus, train_store):
    with pytest.raises(StoreError, match="field 'x' is not a per-event array"):
        tfdata.tf_dataset(train_store, "val", fields=("image", "x"))


def test_a_label_field_first_streams_as_stored_without_cast_or_transforms(tf_two_cpus, train_store):
    labels, _images = next(iter(tfdata.tf_dataset(train_store, "val", batch_size=8, shuffle=False,
                                                  fields=("label", "image"), cast=None)))
    stored = zarr.open_group(str(train_store), mode="r")["val"]["label"]
    assert labels.dtype.as_numpy_dtype == stored.dtype
    np.testing.assert_array_equal(labels.numpy(), stored[:8])


def test_an_endless_dataset_of_an_empty_split_is_refused(tf_two_cpus, train_store, tmp_path):
    import hepdask
    from hepdask.config import from_dict

    from .data_generation import demo_config

    data = train_store.parent
    out = tmp_path / "empty-test.zarr"
    raw = demo_config(data, out, **{"output.split": {"train": 0.9999, "val": 0.0001, "test": 0.0},
                                    "selection.events": None})
    hepdask.build_dataset(from_dict(raw), progress=False)
    assert list(tfdata.tf_dataset(out, "test", batch_size=4)) == []
    with pytest.raises(ConfigError, match="'test' has no events: an endless dataset"):
        tfdata.tf_dataset(out, "test", batch_size=4, epochs=None)


def test_a_missing_chunk_file_is_an_error_not_fill_values(tf_two_cpus, train_store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(train_store, damaged)
    chunk_file(damaged, "val", "image", 1).unlink()
    batches = iter(tfdata.tf_dataset(damaged, "val", batch_size=128, shuffle=False))
    next(batches)
    with pytest.raises(tf_two_cpus.errors.UnknownError, match="chunk 1 of 'val/image' is missing"):
        next(batches)


def test_a_missing_chunk_of_a_store_read_through_zarr_is_an_error_too(tf_two_cpus, ldmx_data, tmp_path, monkeypatch):
    """A layout hepdask does not decode itself is read through zarr, which would hand over
    fill values for a missing chunk."""
    import hepdask
    from hepdask.config import from_dict

    from .data_generation import demo_config

    data, _ = ldmx_data
    out = tmp_path / "s.zarr"
    hepdask.build_dataset(from_dict(demo_config(data, out, **{"output.chunk_events": 64})), progress=False)
    monkeypatch.setattr(tfdata.store.ChunkFiles, "of", classmethod(lambda cls, array: None))
    chunk_file(out, "val", "image", 0).unlink()
    with pytest.raises(tf_two_cpus.errors.UnknownError, match="chunk 0 of 'val/image' is missing"):
        next(iter(tfdata.tf_dataset(out, "val", batch_size=16, shuffle=False)))


def test_autotune_reads_are_accepted(tf_two_cpus, train_store):
    batch = next(iter(tfdata.tf_dataset(train_store, "val", batch_size=8, parallel_reads=tf_two_cpus.data.AUTOTUNE)))
    assert batch[0].shape[0] == 8


def test_a_chunk_that_does_not_decode_is_named(tf_two_cpus, train_store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(train_store, damaged)
    chunk = chunk_file(damaged, "val", "image", 0)
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(tf_two_cpus.errors.UnknownError, match="chunk 0 of 'val/image' cannot be decoded"):
        next(iter(tfdata.tf_dataset(damaged, "val", batch_size=128, shuffle=False)))


def test_a_group_inside_a_store_is_named_as_such(tf_two_cpus, train_store):
    with pytest.raises(StoreError, match="is the group 'val' inside the store"):
        tfdata.tf_dataset(train_store / "val", "val")


def test_divide_by_max_after_log1p_scales_to_one(tf_two_cpus, train_store):
    images = np.concatenate([x.numpy() for x, _ in tfdata.tf_dataset(
        train_store, "train", batch_size=1000, shuffle=False, transforms=["log1p", "divide_by_max"])])
    assert images.max() == pytest.approx(1.0, rel=1e-6)


def test_epochs_do_not_depend_on_how_far_an_iterator_read_ahead(tf_two_cpus, train_store):
    """An endless dataset starts at first_epoch whenever it is iterated; the k-th iteration of
    a finite one at first_epoch + k * epochs, however far prefetching had read before."""
    kwargs = {"batch_size": 500, "fields": ("image", "entry"), "seed": 3}
    first = {k: next(iter(tfdata.tf_dataset(train_store, "val", first_epoch=k, **kwargs)))[1].numpy()
             for k in (0, 1, 2, 4)}
    endless = tfdata.tf_dataset(train_store, "val", epochs=None, **kwargs)
    iterator = iter(endless)
    taken = [next(iterator)[1].numpy() for _ in range(3)]
    np.testing.assert_array_equal(taken[0], first[0])
    np.testing.assert_array_equal(taken[2], first[1])  # 600 val events: two steps an epoch
    time.sleep(0.5)  # let prefetching run ahead
    del iterator
    np.testing.assert_array_equal(next(iter(endless))[1].numpy(), first[0])
    finite = tfdata.tf_dataset(train_store, "val", epochs=2, **kwargs)
    for k in (0, 2, 4):
        iterator = iter(finite)
        np.testing.assert_array_equal(next(iterator)[1].numpy(), first[k])
        time.sleep(0.3)
        del iterator


def test_each_pass_over_a_dataset_reads_a_new_chunk_order(tf_two_cpus, train_store, monkeypatch):
    """model.fit(ds, epochs=N) iterates the same dataset N times: each pass is a new epoch."""
    orders: list[list[int]] = [[]]
    original = tfdata.SplitSource.reader

    def recording(self):
        read = original(self)

        def wrapped(index):
            orders[-1].append(int(index))
            return read(index)

        return wrapped

    monkeypatch.setattr(tfdata.SplitSource, "reader", recording)
    ds = tfdata.tf_dataset(train_store, "train", batch_size=500, seed=9, parallel_reads=1)
    for _ in range(3):
        for _batch in ds:
            pass
        orders.append([])
    passes = orders[:3]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)
    assert passes[0] != passes[1] != passes[2]


#: A script that keeps an iterator to the end while chunk reads (slowed to 0.2 s each) are
#: still running: TensorFlow used to hang at exit then (tensorflow/tensorflow#21277). It
#: freezes its heap at the end, as the ``hepdask`` command does before it exits.
ITERATOR_AT_EXIT = """
import gc, sys, time
from hepdask import tfdata
read_chunks = tfdata.SplitSource.reader
def slow_reader(self):
    read = read_chunks(self)
    return lambda index: time.sleep(0.2) or read(index)
tfdata.SplitSource.reader = slow_reader
it = iter(tfdata.tf_dataset(sys.argv[1], "train", batch_size=64, epochs=None, parallel_reads=2))
next(it)
print("took a batch", flush=True)
gc.freeze()
"""


def test_a_script_that_keeps_an_iterator_to_the_end_exits(tf_two_cpus, train_store):
    done = subprocess.run([sys.executable, "-c", ITERATOR_AT_EXIT, str(train_store)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "took a batch" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("compressor", ["zstd", "none", "blosc-lz4"])
def test_chunk_reader_equals_zarr_for_every_codec(ldmx_data, client, tmp_path, compressor):
    """Direct chunk decoding (zstd, none, blosc) reads what zarr reads."""
    import hepdask
    from hepdask.config import from_dict

    from .data_generation import demo_config

    data, _ = ldmx_data
    out = tmp_path / f"{compressor}.zarr"
    hepdask.build_dataset(from_dict(demo_config(data, out, **{"output.compressor": {"name": compressor}})),
                          client=client, progress=False)
    source = tfdata.SplitSource.open(out, "train", ("image", "label", "eventNumber"))
    read = source.reader()
    group = zarr.open_group(str(out), mode="r")["train"]
    assert all(tfdata.store.ChunkFiles.of(group[name]) is not None for name in source.fields)
    for i in range(-(-source.n_events // source.chunk_events)):
        start, stop = i * source.chunk_events, min((i + 1) * source.chunk_events, source.n_events)
        for values, name in zip(read(i), source.fields):
            np.testing.assert_array_equal(values, group[name][start:stop])
            assert values.dtype == group[name].dtype


def test_divide_by_max_scales_every_split_by_the_train_maximum(tf_two_cpus, train_store, monkeypatch):
    root = zarr.open_group(str(train_store), mode="r")
    maximum = float(root["train"]["image"][:].max())
    # The build recorded each split's maximum, so the reader takes it without reading the split.
    assert root.attrs["hepdask:image_max"]["train"]["image"] == maximum
    assert {split: float(root[split]["image"][:].max()) for split in ("val", "test")} == {
        split: root.attrs["hepdask:image_max"][split]["image"] for split in ("val", "test")}
    with monkeypatch.context() as patched:
        patched.setattr(tfdata.SplitSource, "reader", None)
        assert tfdata.image_maximum(train_store) == maximum
    image, _ = next(iter(tfdata.tf_dataset(train_store, "val", batch_size=16, shuffle=False,
                                           transforms=["divide_by_max"])))
    raw = zarr.open_group(str(train_store), mode="r")["val"]["image"][:16]
    np.testing.assert_allclose(image.numpy(), raw / np.float32(maximum), rtol=1e-6)


def test_transforms_act_per_event_on_every_batch(tf_two_cpus, train_store):
    """Transforms run on whole chunks before rebatching; each batch must hold each event's
    transform (channels_first_to_last moved the batch axis last when it ran on batches)."""
    raw = zarr.open_group(str(train_store), mode="r")["val"]["image"][:]
    batches = tfdata.tf_dataset(train_store, "val", batch_size=100, shuffle=False,
                                transforms=["log1p", "channels_first_to_last", "add_channel_axis"])
    images = np.concatenate([x.numpy() for x, _ in batches])
    assert images.dtype == np.float32
    assert images.shape == (raw.shape[0], raw.shape[2], raw.shape[1], 1)
    np.testing.assert_allclose(images[..., 0], np.log1p(raw.astype(np.float32)).transpose(0, 2, 1), rtol=1e-6)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_tuning_applies_on_glibc():
    from hepdask import malloc

    assert malloc.tune() is True
