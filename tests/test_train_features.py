"""Training features beyond test_train's: OneDeviceStrategy (config and CLI), 3-D models,
extra scalar inputs, and resuming a killed training from its BackupAndRestore backup."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml

from hepdask import tfdata
from hepdask.cli import main as cli
from hepdask.errors import ConfigError
from hepdask.train import fit

from .data_generation import chunk_file
from .test_train import _config

#: One fast training step of a small model.
QUICK = {"fit.epochs": 1, "data.steps_per_epoch": 2, "model.filters": 4, "model.dense": 8}


@pytest.fixture(scope="module")
def store_3d(client, tmp_path_factory):
    """A small store whose images have three axes: (z, x, y) = (8, 8, 4) bins."""
    import hepdask
    from hepdask.config import from_dict

    from .data_generation import demo_config, ldmx_files

    directory = tmp_path_factory.mktemp("train-3d")
    ldmx_files(directory, n_files=2, events=100, seed=5)
    out = directory / "image3d.zarr"
    raw = demo_config(directory, out, **{"selection.events": None})
    raw["image"]["axes"] = [
        {"field": "z", "bins": 8, "range": [235, 605]},
        {"field": "x", "bins": 8, "range": [-80, 80]},
        {"field": "y", "bins": 4, "range": [-80, 80]},
    ]
    hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    return out


@pytest.fixture
def strategies(monkeypatch):
    """Every strategy ``fit`` makes, in order."""
    from hepdask import train

    made = []
    plain = train.make_strategy

    def noting(config):
        made.append(plain(config))
        return made[-1]

    monkeypatch.setattr(train, "make_strategy", noting)
    return made


def _load(path):
    import keras

    return keras.saving.load_model(path, compile=False)


def test_one_device_strategy_trains_on_one_replica(tf_two_cpus, train_store, tmp_path, strategies):
    config = _config(train_store, tmp_path / "one", **QUICK, **{"strategy.kind": "one_device"})
    result = fit(config, verbose=0)
    assert result.replicas == 1
    assert result.metrics["replicas"] == 1
    assert len(result.history["loss"]) == 1
    (strategy,) = strategies
    assert isinstance(strategy, tf_two_cpus.distribute.OneDeviceStrategy)
    # Without strategy.devices it takes the first device (no GPU here): the first CPU.
    assert [d.upper() for d in strategy.extended.worker_devices] == ["/JOB:LOCALHOST/REPLICA:0/TASK:0/DEVICE:CPU:0"]


def test_cli_one_device_strategy_flag(tf_two_cpus, train_store, tmp_path, capsys, strategies):
    raw = _config(train_store, tmp_path / "cli", **QUICK).model_dump(mode="json")
    assert raw["strategy"]["kind"] == "mirrored"
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    # /cpu:1, not the default /cpu:0, so that the flag's device is seen to be the one used.
    code = cli(["train", str(path), "--OneDeviceStrategy", "/cpu:1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "on 1 replica(s)" in out
    assert "AUC" in out
    (strategy,) = strategies
    assert isinstance(strategy, tf_two_cpus.distribute.OneDeviceStrategy)
    assert [d.upper() for d in strategy.extended.worker_devices] == ["/JOB:LOCALHOST/REPLICA:0/TASK:0/DEVICE:CPU:1"]
    assert (tmp_path / "cli" / "model.keras").exists()


def test_three_dimensional_model_on_three_axis_images(tf_two_cpus, store_3d, tmp_path):
    import zarr

    assert zarr.open_group(str(store_3d), mode="r")["train"]["image"].shape[1:] == (8, 8, 4)
    config = _config(store_3d, tmp_path / "3d", **QUICK,
                     **{"model.dims": 3, "data.batch_size": 16, "data.transforms": ["log1p", "add_channel_axis"]})
    result = fit(config, verbose=0)
    assert len(result.history["loss"]) == 1
    assert np.isfinite(result.history["loss"][0])
    model = _load(tmp_path / "3d" / "model.keras")
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "Conv3D" in kinds
    assert "MaxPooling3D" in kinds
    assert "Conv2D" not in kinds
    assert tuple(model.inputs[0].shape) == (None, 8, 8, 4, 1)
    # 3-D images need a 3-D model, and a 3-D model needs 3-D images.
    with pytest.raises(ConfigError, match=r"model\.dims=2 needs images of rank 3"):
        fit(_config(store_3d, tmp_path / "a", **QUICK, **{"data.batch_size": 16}), verbose=0)


def test_three_dimensional_model_refuses_two_axis_images(tf_two_cpus, train_store, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.dims=3 needs images of rank 4 .*; set model\.dims: 2"):
        fit(_config(train_store, tmp_path / "b", **QUICK, **{"model.dims": 3}), verbose=0)


def test_extra_scalar_inputs_reach_the_model(tf_two_cpus, train_store, tmp_path):
    import zarr

    from hepdask import train

    config = _config(train_store, tmp_path / "extra", **QUICK, **{"data.extra_inputs": ["eventNumber"]})
    # The batches carry the image and the field's values, in store order for the test split.
    x, y = next(iter(train._inputs(config, "test", shuffle=False, epochs=1)))
    assert set(x) == {"image", "scalars"}
    stored = zarr.open_group(str(train_store), mode="r")["test"]
    n = int(y.shape[0])
    assert x["scalars"].shape == (n, 1)
    np.testing.assert_array_equal(x["scalars"].numpy()[:, 0], stored["eventNumber"][:n].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), stored["label"][:n])
    assert np.ptp(stored["eventNumber"][:n]) > 0  # the values differ, so the check above means something

    result = fit(config, verbose=0)
    assert len(result.history["loss"]) == 1
    assert np.isfinite(result.history["loss"][0])
    model = _load(tmp_path / "extra" / "model.keras")
    shapes = {t.name: tuple(t.shape) for t in model.inputs}
    assert shapes == {"image": (None, *stored["image"].shape[1:], 1), "scalars": (None, 1)}
    assert "Concatenate" in {type(layer).__name__ for layer in model.layers}


def test_extra_inputs_must_be_fields_of_the_store(tf_two_cpus, train_store, tmp_path):
    from hepdask.errors import StoreError

    config = _config(train_store, tmp_path / "missing", **QUICK, **{"data.extra_inputs": ["no_such_field"]})
    with pytest.raises(StoreError, match="split 'train': no field 'no_such_field'"):
        fit(config, verbose=0)
    assert not (tmp_path / "missing").exists()  # refused before anything was written


class Killed(Exception):
    """Stands for the job being killed."""


def _history_epochs(path) -> list[int]:
    with path.open() as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_a_killed_training_resumes_after_its_last_finished_epoch(tf_two_cpus, train_store, tmp_path, monkeypatch):
    """The job dies at the end of epoch 0, once its backup is written (BackupAndRestore is
    the last callback: the history row and best.keras come before it). The same command run
    again, even with overwrite, restores that backup and trains epochs 1 and 2 only, reading
    the data from where the uninterrupted run would be."""
    import keras

    config = _config(train_store, tmp_path / "run", **{**QUICK, "fit.epochs": 3})
    output = tmp_path / "run"
    plain = keras.callbacks.BackupAndRestore
    seen: dict = {"first": [], "second": []}

    class KilledAfterFirstEpoch(plain):
        def on_epoch_begin(self, epoch, logs=None):
            seen["first"].append(epoch)

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            seen["weights"] = [np.array(w) for w in self.model.get_weights()]
            raise Killed

    monkeypatch.setattr(keras.callbacks, "BackupAndRestore", KilledAfterFirstEpoch)
    with pytest.raises(Killed):
        fit(config, verbose=0)
    assert seen["first"] == [0]
    assert (output / "backup").is_dir()
    assert not (output / "model.keras").exists()
    assert _history_epochs(output / "history.csv") == [0]

    class Recording(plain):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            seen["restored"] = [np.array(w) for w in self.model.get_weights()]

        def on_epoch_begin(self, epoch, logs=None):
            seen["second"].append(epoch)

    monkeypatch.setattr(keras.callbacks, "BackupAndRestore", Recording)
    positions, thresholds = [], []
    plain_dataset, plain_checkpoint = tfdata.tf_dataset, keras.callbacks.ModelCheckpoint
    monkeypatch.setattr(tfdata, "tf_dataset", lambda *a, **k: positions.append(
        (k.get("first_epoch"), k.get("skip_steps"))) or plain_dataset(*a, **k))
    monkeypatch.setattr(keras.callbacks, "ModelCheckpoint", lambda *a, **k: thresholds.append(
        k.get("initial_value_threshold")) or plain_checkpoint(*a, **k))
    result = fit(config.model_copy(update={"overwrite": True}), verbose=0)
    # Epochs of 2 steps: the resumed run starts 2 steps into the first planner epoch.
    n_train = tfdata.SplitSource.open(train_store, "train", ("image", "label")).n_events
    train_position = next(p for p in positions if p != (None, None))  # the train input comes first
    assert train_position == divmod(2, tfdata.steps_per_epoch(n_train, 64, replicas=2)) == (0, 2)
    with (output / "history.csv").open() as f:
        first_val_loss = float(next(csv.DictReader(f))["val_loss"])
    assert thresholds == [first_val_loss]
    assert seen["second"] == [1, 2]
    assert len(seen["restored"]) == len(seen["weights"])
    for restored, backed_up in zip(seen["restored"], seen["weights"]):
        np.testing.assert_array_equal(restored, backed_up)
    assert _history_epochs(output / "history.csv") == [0, 1, 2]
    assert len(result.history["loss"]) == 3
    assert (output / "model.keras").exists() and (output / "metrics.json").exists()
    assert not (output / "backup").exists()


def test_a_training_killed_after_its_last_epoch_just_evaluates_again(tf_two_cpus, train_store, tmp_path,
                                                                      monkeypatch):
    """Killed after training, before its metrics were written: the rerun trains nothing,
    keeps the history as it was, and writes the model, metrics and plots."""
    import keras

    output = tmp_path / "run"
    config = _config(train_store, output, **{**QUICK, "fit.epochs": 2})
    save = keras.Model.save

    def dying(self, path, *args, **kwargs):
        if str(path).endswith("model.keras"):
            raise Killed
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", dying)
    with pytest.raises(Killed):
        fit(config, verbose=0)
    assert _history_epochs(output / "history.csv") == [0, 1] and (output / "backup").is_dir()
    monkeypatch.setattr(keras.Model, "save", save)
    result = fit(config, verbose=0)
    assert _history_epochs(output / "history.csv") == [0, 1] and len(result.history["loss"]) == 2
    assert (output / "metrics.json").exists() and not (output / "backup").exists()


def test_what_a_training_refuses_and_what_overwrite_removes(tf_two_cpus, train_store, tmp_path, capsys):
    """Missing devices fail at once (a MirroredStrategy over them would wait forever); a bad
    config leaves a finished run as it was; --overwrite removes the training's own files and
    nothing else, and never an output that holds the store."""
    output = tmp_path / "run"
    config = _config(train_store, output, **QUICK)
    with pytest.raises(ConfigError, match=r"strategy.devices: \['/gpu:98', '/gpu:99'\] not visible"):
        fit(_config(train_store, output, **QUICK, **{"strategy.devices": ["/gpu:98", "/gpu:99"]}), verbose=0)
    with pytest.raises(ConfigError, match="names a device twice"):
        fit(_config(train_store, output, **QUICK, **{"strategy.devices": ["/cpu:0", "/CPU:0"]}), verbose=0)
    fit(config, verbose=0)
    (output / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas"):
        fit(_config(train_store, output, **QUICK, **{"data.batch_size": 63, "overwrite": True}), verbose=0)
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == before
    fit(config.model_copy(update={"overwrite": True}), verbose=0)
    assert (output / "notes.txt").read_text() == "mine" and (output / "model.keras").exists()
    with pytest.raises(ConfigError, match="holds the store"):
        fit(_config(train_store, train_store.parent, **QUICK, overwrite=True), verbose=0)
    assert (train_store / "zarr.json").exists()



def test_a_second_training_of_an_output_being_trained_is_refused(tf_two_cpus, train_store, tmp_path):
    import os

    from hepdask import store
    from hepdask.errors import StoreError

    output = tmp_path / "held"
    config = _config(train_store, output, **QUICK)
    with store.output_lock(output), pytest.raises(StoreError, match=f"is being built by hepdask process {os.getpid()}"):
        fit(config, verbose=0)
    assert not output.exists()


# --------------------------------------------------------------------------------------------
# what the evaluation may trust: checked before training, refused after it


@pytest.fixture
def store_copy(train_store, tmp_path):
    """A copy of the train store that a test may change."""
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(train_store, copy)
    return copy


def test_labels_outside_the_classes_are_refused_before_training(tf_two_cpus, store_copy, tmp_path):
    """A sample labelled 2 for a binary model trained with a negative loss and reported a
    confusion matrix that left its events out."""
    import zarr

    root = zarr.open_group(str(store_copy), mode="r+")
    root["val"]["label"][:3] = 2
    samples = dict(root.attrs["hepdask:samples"])
    samples["signal"] = {**samples["signal"], "label": 2}
    root.attrs["hepdask:samples"] = samples
    with pytest.raises(ConfigError, match=r"split 'val' has label \[2\] \(sample signal\), outside 0\.\.1 that "
                                          r"model\.classes: 2 takes"):
        fit(_config(store_copy, tmp_path / "run", **QUICK), verbose=0)
    assert not (tmp_path / "run").exists()
    fit(_config(store_copy, tmp_path / "three", **QUICK, **{"model.classes": 3}), verbose=0)


def test_a_test_split_of_one_class_is_refused_before_training(tf_two_cpus, store_copy, tmp_path):
    import zarr

    from hepdask.errors import StoreError

    # 1, not 0: zarr removes a chunk that holds only its fill value, 0.
    zarr.open_group(str(store_copy), mode="r+")["test"]["label"][:] = 1
    with pytest.raises(StoreError, match=r"the test split holds label 1 only \(\d+ events\); the ROC and AUC"):
        fit(_config(store_copy, tmp_path / "run", **QUICK), verbose=0)


def _small_store(client, directory, name: str, split: dict, mass: bool):
    import hepdask
    from hepdask.config import from_dict

    from .data_generation import demo_config, ldmx_files

    ldmx_files(directory, n_files=2, events=60, seed=8)
    raw = demo_config(directory, directory / name, **{"selection.events": None, "output.split": split})
    if mass:
        raw["samples"][0]["metadata"] = {"mass": 0.5}
    hepdask.build_dataset(from_dict(raw), client=client, progress=False)
    return directory / name


@pytest.fixture(scope="module")
def mass_store(client, tmp_path_factory):
    """Signal with metadata ``mass``, background without it (NaN there)."""
    return _small_store(client, tmp_path_factory.mktemp("train-mass"), "mass.zarr",
                        {"train": 0.6, "val": 0.2, "test": 0.2}, mass=True)


def test_an_extra_input_that_is_nan_for_a_sample_is_refused(tf_two_cpus, mass_store, tmp_path):
    """A NaN mass for background events made every weight of its row NaN in the first step,
    while the logged loss looked healthy."""
    config = _config(mass_store, tmp_path / "run", **QUICK, **{"data.extra_inputs": ["mass"]})
    with pytest.raises(ConfigError, match=r"data\.extra_inputs 'mass' is NaN or infinite for \d+ of \d+ events of "
                                          r"split 'train' \(the samples without metadata 'mass', background, "):
        fit(config, verbose=0)


def test_an_empty_test_split_is_refused_before_training(tf_two_cpus, client, tmp_path):
    """It gave metrics of 0 events: AUC 0.000, accuracy 0.000."""
    from hepdask.errors import StoreError

    empty = _small_store(client, tmp_path, "no-test.zarr", {"train": 0.8, "val": 0.2, "test": 0.0}, mass=False)
    with pytest.raises(StoreError, match="the test split is empty, and the training is evaluated on it"):
        fit(_config(empty, tmp_path / "run", **QUICK), verbose=0)


def test_a_store_rebuilt_in_place_is_not_resumed(store_copy, tmp_path):
    """The run's hash named the store's path only: a store rebuilt with another seed or
    split was resumed, and events trained on landed in the test split."""
    import zarr

    from hepdask.train import run_hash

    config = _config(store_copy, tmp_path / "run")
    before = run_hash(config)
    assert run_hash(config) == before
    zarr.open_group(str(store_copy), mode="r+").attrs["hepdask:created"] = "2030-01-01T00:00:00+00:00"
    assert run_hash(config) != before


def test_model_inputs_record_the_scale_divide_by_max_used(train_store, tmp_path):
    """Without the train split's maximum, model.keras could not be used on new images."""
    from hepdask.train import model_inputs

    config = _config(train_store, tmp_path / "run", **{"data.transforms": ["log1p", "divide_by_max"]})
    record = model_inputs(config)
    assert record["transforms"] == ["log1p", "divide_by_max"]
    assert record["image_max"] == tfdata.image_maximum(train_store, "train", "image") > 0
    assert "image_max" not in model_inputs(_config(train_store, tmp_path / "run"))


def test_a_model_with_nan_scores_is_refused_not_evaluated(train_store, tmp_path):
    from hepdask.errors import TrainError
    from hepdask.train import predict

    def nan_model(x, training=False):
        return np.full((int(x.shape[0]), 1), np.nan, np.float32)

    with pytest.raises(TrainError, match=r"gives NaN or infinite scores for \d+ of \d+ test events"):
        predict(_config(train_store, tmp_path / "run"), nan_model, "test")


def test_a_first_step_of_an_odd_number_of_events_trains_on_two_replicas(tf_two_cpus, client, tmp_path):
    """A validation split of 51 events at a global batch of 64: its only step gave the two
    replicas 25 and 26 events, and MirroredStrategy failed ('AddN must have the same size
    and shape'). The step now leaves the odd event out."""
    import zarr

    odd = _small_store(client, tmp_path, "odd.zarr", {"train": 0.6, "val": 0.2125, "test": 0.1875}, mass=False)
    sizes = {s: zarr.open_group(str(odd), mode="r")[s]["label"].shape[0] for s in ("train", "val", "test")}
    assert sizes["val"] % 2 == 1 and sizes["val"] < 64, sizes
    result = fit(_config(odd, tmp_path / "run", **{**QUICK, "data.steps_per_epoch": None}), verbose=0)
    assert np.isfinite(result.history["val_loss"][0])


def test_a_damaged_chunk_stops_the_training_as_the_store_error_it_is(tf_two_cpus, store_copy, tmp_path):
    """The reader's StoreError came wrapped in TensorFlow's UnknownError with 150 lines of
    tracebacks; the CLI now prints its one line."""
    from hepdask.errors import StoreError

    chunk_file(store_copy, "train", "image", 0).unlink()
    with pytest.raises(StoreError, match=r"^chunk 0 of 'train/image' is missing \("):
        fit(_config(store_copy, tmp_path / "run", **QUICK), verbose=0)


def test_an_error_a_tensorflow_error_carries_is_found():
    from hepdask.errors import StoreError, carried_error

    text = ("Error in user-defined function passed to ParallelMapDatasetV2:66 transformation with iterator: "
            "Iterator::Root: StoreError: chunk 3 of 'train/image' is missing (/s.zarr/train/image/c.3.0.0): "
            "the store is damaged\nTraceback (most recent call last):\n\t [[{{node PyFuncStateless}}]]")
    carried = carried_error(RuntimeError(text))
    assert type(carried) is StoreError
    assert str(carried) == "chunk 3 of 'train/image' is missing (/s.zarr/train/image/c.3.0.0): the store is damaged"
    assert carried_error(RuntimeError("AddN must have the same size and shape")) is None
    assert carried_error(StoreError("itself")) is None


def test_a_store_without_the_three_training_splits_is_refused_with_the_fix(tf_two_cpus, client, tmp_path):
    from hepdask.errors import StoreError

    two = _small_store(client, tmp_path, "two.zarr", {"training": 0.8, "validation": 0.2}, mass=False)
    with pytest.raises(StoreError, match=r"reads the splits train, val, test, and this store has training, "
                                         r"validation; build it with output.split: \{train: \.\.\., val"):
        fit(_config(two, tmp_path / "run", **QUICK), verbose=0)
