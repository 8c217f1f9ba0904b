"""Train a model of the zoo on a store under a ``tf.distribute`` strategy, then evaluate it.

``fit(config)`` streams the store's train and val splits through ``hepdask.tfdata``, trains
under ``MirroredStrategy`` (all visible GPUs, the given devices, or N logical CPUs) or
``OneDeviceStrategy``, keeps a ``BackupAndRestore`` backup so that a killed job resumes at
its last finished epoch, logs the history to CSV, saves the best model, and evaluates on the
test split: accuracy, ROC and AUC, the threshold that minimises misclassification with the
signal acceptance and background rejection there, and the confusion matrix.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import store, tfdata
from .config import TrainConfig
from .errors import ConfigError, StoreError, TrainError, carried_error

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# metrics (numpy only)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates for every distinct score threshold (``score >= t``)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    distinct = np.flatnonzero(np.diff(scores)) if scores.size else np.zeros(0, np.int64)
    cut = np.concatenate([distinct, [labels.size - 1]]) if labels.size else np.zeros(0, np.int64)
    tp = np.cumsum(labels)[cut]
    fp = (cut + 1) - tp
    positives, negatives = max(labels.sum(), 1), max((~labels).sum(), 1)
    fpr = np.concatenate([[0.0], fp / negatives])
    tpr = np.concatenate([[0.0], tp / positives])
    thresholds = np.concatenate([[np.inf], scores[cut]])
    return fpr, tpr, thresholds


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """Accuracy at 0.5, AUC, the working point and what it gives, the confusion matrix.

    The working point is *threshold* (chosen on other events: ``best_threshold`` of the
    validation split), or else the threshold that minimises misclassification of these
    events. Labels are 0 (background) and 1 (signal)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    if threshold is None:
        positives, negatives = int(labels.sum()), int((1 - labels).sum())
        errors = (1 - tpr) * positives + fpr * negatives
        best = int(np.argmin(errors))
        # "Call nothing signal" is the threshold just above the largest score a sigmoid gives.
        threshold = float(thresholds[best]) if np.isfinite(thresholds[best]) else float(np.nextafter(1.0, 2.0))
    predicted = (scores >= threshold).astype(int)
    confusion = [[int(((labels == t) & (predicted == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    signal, background = labels == 1, labels == 0
    return {
        "events": int(labels.size),
        "accuracy_at_0.5": float(((scores >= 0.5).astype(int) == labels).mean()) if labels.size else 0.0,
        "auc": auc,
        "best_threshold": threshold,
        "accuracy_at_best_threshold": float((predicted == labels).mean()) if labels.size else 0.0,
        "signal_acceptance": float(predicted[signal].mean()) if signal.any() else 0.0,
        "background_rejection": float(1 - predicted[background].mean()) if background.any() else 1.0,
        "confusion_matrix": {"rows": "true label 0, 1", "columns": "predicted 0, 1", "values": confusion},
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    labels = np.asarray(labels).astype(int)
    predicted = np.argmax(probabilities, axis=1)
    n = probabilities.shape[1]
    confusion = [[int(((labels == t) & (predicted == p)).sum()) for p in range(n)] for t in range(n)]
    return {"events": int(labels.size), "accuracy": float((predicted == labels).mean()),
            "confusion_matrix": {"rows": "true label", "columns": "predicted", "values": confusion}}


# --------------------------------------------------------------------------------------------
# strategy and model zoo


def configure_devices(config: TrainConfig) -> None:
    """Split the CPU into logical devices if asked (must run before TensorFlow starts)."""
    import tensorflow as tf

    n = config.strategy.logical_cpus
    if not n:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as err:
        msg = f"strategy.logical_cpus={n}: TensorFlow has already started with {len(current or [1])} CPU device(s)"
        raise ConfigError(msg) from err


_STRATEGIES: dict[tuple, Any] = {}


def make_strategy(config: TrainConfig):
    """The strategy for ``config.strategy``, one per device set per process.

    A second MirroredStrategy over the same devices in one process numbers its collective
    operations from the same keys as the first, and its all-reduces then fail with "Shape
    mismatch in the collective instance"; reusing the first avoids that.
    """
    import tensorflow as tf

    configure_devices(config)
    spec = config.strategy
    if spec.devices:
        _check_devices(tf, spec.devices)
    if spec.kind == "one_device":
        devices = tuple((spec.devices or [_default_device(tf)])[:1])
    elif spec.devices is None and spec.logical_cpus and not tf.config.list_logical_devices("GPU"):
        devices = tuple(d.name for d in tf.config.list_logical_devices("CPU"))
    else:
        devices = tuple(spec.devices) if spec.devices is not None else None
    key = (spec.kind, devices)
    if key not in _STRATEGIES:
        if spec.kind == "one_device":
            _STRATEGIES[key] = tf.distribute.OneDeviceStrategy(devices[0])
        else:
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(list(devices) if devices else None)
    return _STRATEGIES[key]


def _check_devices(tf, devices: list[str]) -> None:
    """Refuse devices this process does not have, or one named twice: a MirroredStrategy
    over a missing device waits forever in its first step (and Ctrl-C does not stop it)."""

    def key(name: str) -> tuple[str, int] | None:
        try:
            spec = tf.DeviceSpec.from_string(name)
        except ValueError:
            return None
        return str(spec.device_type or "").upper(), spec.device_index or 0

    visible = {key(device.name): device for device in tf.config.list_logical_devices()}
    asked = {name: key(name) for name in devices}
    missing = [name for name, k in asked.items() if k not in visible]
    if missing:
        shown = sorted(f"/{t.lower()}:{i}" for t, i in visible)
        msg = (f"strategy.devices: {missing} not visible to TensorFlow here (visible: {shown}; "
               "strategy.logical_cpus: N splits the CPU into N devices)")
        raise ConfigError(msg)
    if len(set(asked.values())) < len(devices):
        msg = f"strategy.devices: {devices} names a device twice"
        raise ConfigError(msg)


def _default_device(tf) -> str:
    return "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"


def build_model(config: TrainConfig, image_shape: tuple[int, ...], extra: int):
    """A Keras model of the zoo for images of *image_shape* (channels last)."""
    import keras
    from keras import layers

    spec = config.model
    conv = layers.Conv2D if spec.dims == 2 else layers.Conv3D
    pool = layers.MaxPooling2D if spec.dims == 2 else layers.MaxPooling3D
    if len(image_shape) != spec.dims + 1:
        fits = len(image_shape) - 1
        hint = (f"set model.dims: {fits}" if fits in (2, 3) and "add_channel_axis" in config.data.transforms
                else "add 'add_channel_axis' to data.transforms, or set model.dims")
        msg = (f"model.dims={spec.dims} needs images of rank {spec.dims + 1} (with channels) but they have shape "
               f"{image_shape}; {hint}")
        raise ConfigError(msg)
    image = keras.Input(image_shape, name="image")
    x = image
    f = spec.filters
    if spec.name == "ldmx_convnet":
        x = conv(f, 3, padding="same", activation="relu")(x)
        x = pool(2, padding="same")(x)
        x = conv(2 * f, 3, padding="same", activation="relu")(x)
        x = pool(2, padding="same")(x)
    elif spec.name == "vgg":
        for block in (f, 2 * f, 4 * f):
            x = conv(block, 3, padding="same", activation="relu")(x)
            x = conv(block, 3, padding="same", activation="relu")(x)
            x = pool(2, padding="same")(x)
    else:
        x = conv(f, 3, padding="same", activation="relu")(x)
        for block in (f, 2 * f):
            shortcut = conv(block, 1, padding="same")(x)
            y = conv(block, 3, padding="same", activation="relu")(x)
            y = conv(block, 3, padding="same")(y)
            x = layers.Activation("relu")(layers.Add()([shortcut, y]))
            x = pool(2, padding="same")(x)
    x = layers.Flatten()(x)
    inputs = [image]
    if extra:
        scalars = keras.Input((extra,), name="scalars")
        inputs.append(scalars)
        x = layers.Concatenate()([x, scalars])
    x = layers.Dense(spec.dense, activation="relu")(x)
    x = layers.Dropout(spec.dropout)(x)
    if spec.dense > 1:
        x = layers.Dense(max(spec.dense // 2, 1), activation="relu")(x)
    binary = spec.classes == 2
    out = layers.Dense(1 if binary else spec.classes, activation="sigmoid" if binary else "softmax", name="label")(x)
    model = keras.Model(inputs, out, name=spec.name)
    model.compile(
        optimizer=keras.optimizers.Adam(config.fit.learning_rate),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


# --------------------------------------------------------------------------------------------
# data


def _inputs(config: TrainConfig, split: str, *, shuffle: bool, epochs: int | None, strategy=None,
            first_epoch: int = 0, skip_steps: int = 0):
    """(x, y) batches; x is the image or {image, scalars} when extra inputs are configured."""
    import tensorflow as tf

    data = config.data
    image_field, label_field = data.fields
    fields = (image_field, label_field, *data.extra_inputs)
    kwargs = {"shuffle": shuffle, "seed": data.seed, "fields": fields, "shuffle_buffer": data.shuffle_buffer,
                  "transforms": data.transforms, "cast": data.cast, "epochs": epochs, "as_dict": True,
                  "first_epoch": first_epoch, "skip_steps": skip_steps}

    def arrange(batch):
        y = tf.cast(batch[label_field], tf.float32 if config.model.classes == 2 else tf.int32)
        if not data.extra_inputs:
            return batch[image_field], y
        scalars = tf.stack([tf.cast(batch[n], tf.float32) for n in data.extra_inputs], axis=-1)
        return {"image": batch[image_field], "scalars": scalars}, y

    if strategy is None:
        return tfdata.tf_dataset(config.store, split, batch_size=data.batch_size, **kwargs).map(arrange)
    return tfdata.distributed_dataset(strategy, config.store, split, global_batch_size=data.batch_size,
                                      map_fn=arrange, **kwargs)


def _check_store(config: TrainConfig) -> dict[str, int]:
    """Refuse an incomplete store, a missing split or field, labels the model cannot take,
    a test split that cannot be evaluated and extra inputs that are not finite, before
    anything trains."""
    sizes = {}
    root = store.open_root(config.store)
    splits = store.split_names(root)
    if not set(TRAIN_SPLITS) <= set(splits):
        msg = (f"store {config.store!r}: hepdask train reads the splits {', '.join(TRAIN_SPLITS)}, and this store "
               f"has {', '.join(splits)}; build it with output.split: {{train: ..., val: ..., test: ...}}")
        raise StoreError(msg)
    for split in TRAIN_SPLITS:
        source = tfdata.SplitSource.open(config.store, split, (*config.data.fields, *config.data.extra_inputs))
        sizes[split] = source.n_events
    if sizes["train"] == 0:
        msg = f"store {config.store!r}: the train split is empty"
        raise StoreError(msg)
    _check_labels(config, root, sizes)
    _check_extra_inputs(config, root, sizes)
    return sizes


def _check_labels(config: TrainConfig, root, sizes: dict[str, int]) -> None:
    """Labels 0 to ``model.classes - 1`` in every split (binary: 0 background, 1 signal),
    and a test split with events, of both classes for a binary model's ROC."""
    field, classes = config.data.fields[1], config.model.classes
    samples = root.attrs.get(store.PREFIX + "samples", {})
    for split, n in sizes.items():
        labels = np.asarray(root[split][field][:]) if n else np.zeros(0, np.int64)
        outside = np.unique(labels[(labels < 0) | (labels >= classes)]).tolist()
        if outside:
            named = [name for name, s in samples.items() if s.get("label") in outside]
            of = f" (sample {', '.join(named)})" if named else ""
            msg = (f"store {config.store!r}: split {split!r} has {field} {outside}{of}, outside 0..{classes - 1} "
                   f"that model.classes: {classes} takes; label the samples 0 to {classes - 1} "
                   "(binary: background 0, signal 1) or set model.classes")
            raise ConfigError(msg)
        if split == "test" and classes == 2 and n and np.unique(labels).size < 2:
            msg = (f"store {config.store!r}: the test split holds {field} {int(labels[0])} only ({n} events); "
                   "the ROC and AUC of the evaluation need both classes")
            raise StoreError(msg)
    if not sizes["test"]:
        msg = (f"store {config.store!r}: the test split is empty, and the training is evaluated on it; "
               "build the store with a test fraction (output.split)")
        raise StoreError(msg)


def _check_extra_inputs(config: TrainConfig, root, sizes: dict[str, int]) -> None:
    """Every extra input finite: one NaN makes the model's weights NaN in the first step."""
    samples = root.attrs.get(store.PREFIX + "samples", {})
    for name in config.data.extra_inputs:
        for split, n in sizes.items():
            values = np.asarray(root[split][name][:]) if n else np.zeros(0)
            bad = int(np.count_nonzero(~np.isfinite(values))) if values.dtype.kind in "fc" else 0
            if bad:
                lacking = [s for s, info in samples.items() if name not in info.get("metadata", {})]
                why = (f" (the samples without metadata {name!r}, {', '.join(lacking)}, store NaN there)"
                       if lacking else "")
                msg = (f"store {config.store!r}: data.extra_inputs {name!r} is NaN or infinite for {bad} of {n} "
                       f"events of split {split!r}{why}; give every sample a finite value")
                raise ConfigError(msg)


def _image_shape(config: TrainConfig) -> tuple[int, ...]:
    import tensorflow as tf

    batch = next(iter(tfdata.tf_dataset(config.store, "train", batch_size=1, shuffle=False,
                                        fields=config.data.fields, transforms=config.data.transforms,
                                        cast=config.data.cast)))
    image = batch[0] if isinstance(batch, tuple) else batch[config.data.fields[0]]
    return tuple(int(d) for d in tf.shape(image)[1:])


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    output: Path
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    replicas: int


#: The splits a training reads: it trains on the first, validates on the second, evaluates on the third.
TRAIN_SPLITS = ("train", "val", "test")

#: The run's hash (``run_hash``), for a rerun to know what it would resume.
RECORD = "train-record.json"
#: BackupAndRestore's directory: there while a run is unfinished.
BACKUP = "backup"
#: What a training writes into its output directory (``--overwrite`` removes these, and only these).
OUTPUTS = ("model.keras", "best.keras", "history.csv", "metrics.json", "history.png", "roc.png", BACKUP, RECORD)


def run_hash(config: TrainConfig) -> str:
    """What an interrupted training must share with the command that resumes it: everything
    but the output, ``overwrite``, the number of epochs, which weights are evaluated and
    where it runs."""
    import hashlib

    payload = config.model_dump(mode="json", exclude={"output": True, "overwrite": True,
                                                       "fit": {"epochs", "evaluate"}, "strategy": True})
    # The store's build too: a store rebuilt in place (another seed or split) would put
    # events the run trained on into its test split.
    attrs = store.open_root(config.store).attrs
    payload["store_build"] = {key: attrs.get(store.PREFIX + key) for key in ("config_hash", "created")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare_output(config: TrainConfig, output: Path, inputs: dict[str, Any]) -> int:
    """Make room for the run; return the epochs an interrupted run of the same config has
    finished (0 for a new run), which it resumes from its backup.

    An interrupted run (its backup still there) resumes whether or not ``overwrite`` is
    given, so the same command run again resumes; one of another config is refused, or
    with ``overwrite`` discarded. A finished run is replaced only with ``overwrite``.
    ``overwrite`` removes the files a training writes (``OUTPUTS``) and nothing else.
    """
    store_path = Path(config.store).resolve()
    if output.resolve() == store_path or output.resolve() in store_path.parents:
        msg = f"output {str(output)!r} holds the store {config.store!r}: choose another output directory"
        raise ConfigError(msg)
    backup = output / BACKUP
    digest = run_hash(config)
    try:
        record = json.loads((output / RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    same = record.get("run_hash") == digest
    # The backup is removed last, once the metrics and plots are written: a run with a
    # backup is unfinished, whatever else it has written.
    if backup.exists():
        if same:
            try:
                epochs = int(json.loads((backup / "training_metadata.json").read_text())["epoch"])
            except (OSError, ValueError, KeyError):
                epochs = 0
            _keep_history(output / "history.csv", epochs)
            return epochs
        if not config.overwrite:
            msg = (f"{output} holds an interrupted training of a different config or of a store since rebuilt; "
                   "pass --overwrite (overwrite: true) to discard it, or choose another output")
            raise ConfigError(msg)
    elif (output / "metrics.json").exists() and not config.overwrite:
        msg = f"{output} already holds a finished training; pass --overwrite (overwrite: true)"
        raise ConfigError(msg)
    elif not config.overwrite and not same:
        left = [name for name in OUTPUTS if name != RECORD and (output / name).exists()]
        if left:
            msg = (f"{output} holds files of another training ({', '.join(left)}) that a new run would mix "
                   "with its own; pass --overwrite (overwrite: true) or choose another output")
            raise ConfigError(msg)
    # Replaced on request, or what this config's run left before it finished an epoch.
    if config.overwrite or same:
        for name in OUTPUTS:
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / RECORD).write_text(json.dumps({"run_hash": digest, "store": config.store, "inputs": inputs},
                                            indent=1))
    return 0


def model_inputs(config: TrainConfig) -> dict[str, Any]:
    """What the model's inputs went through: a user of ``model.keras`` on new images applies
    the same (``hepdask.tfdata.tf_dataset`` with these arguments does it, ``image_max``
    included, which ``divide_by_max`` takes from the train split)."""
    data = config.data
    record: dict[str, Any] = {"fields": list(data.fields), "extra_inputs": list(data.extra_inputs),
                              "transforms": list(data.transforms), "cast": data.cast}
    if "divide_by_max" in data.transforms:
        record["image_max"] = tfdata.image_maximum(config.store, tfdata.SCALE_SPLIT, data.fields[0])
    return record


def _keep_history(path: Path, epochs: int) -> None:
    """Keep the rows of the *epochs* epochs the backup holds: a kill between the backup and
    the CSV row (or after the row, before the backup) must not leave a gap or a repeat."""
    import csv

    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(float(row[0])) < epochs]
    if kept != rows:
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)


def _best_so_far(path: Path, monitor: str) -> float | None:
    """The best (lowest) *monitor* value an interrupted run logged, so that a resumed
    ``ModelCheckpoint`` keeps ``best.keras`` unless the run really improves on it."""
    values = np.asarray(_read_history(path).get(monitor, []), np.float64)
    return float(np.nanmin(values)) if np.isfinite(values).any() else None


class _Pressed:
    """Whether a held-back Ctrl-C came (a plain flag: a signal handler must take no lock)."""

    def __init__(self) -> None:
        self.pressed = False

    def is_set(self) -> bool:
        return self.pressed


@contextmanager
def _interrupt_between_steps() -> Iterator[_Pressed | None]:
    """Hold a Ctrl-C back to the end of the step it lands in (the ``_stop_on_interrupt``
    callback and ``_stop_if_interrupted`` raise it there), saying so; a second Ctrl-C
    interrupts at once.

    Python raises KeyboardInterrupt in whatever code runs when the signal comes, and during a
    training that is often a TensorFlow object's ``__del__``: Python prints "Exception
    ignored" there and the training ran on to its end with exit status 0. Only Python's own
    handler in the main thread is replaced; one a user installed is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield None
        return
    held = _Pressed()

    def hold(signum, frame) -> None:
        if held.pressed:
            raise KeyboardInterrupt
        held.pressed = True
        log.warning("Ctrl-C: stopping after this step (press it again to stop at once)")

    signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_if_interrupted(pressed: _Pressed | None) -> None:
    if pressed is not None and pressed.is_set():
        raise KeyboardInterrupt


def _stop_on_interrupt(keras, pressed: _Pressed | None):
    """A callback that raises a held-back Ctrl-C after the training or validation step it came in."""

    class StopOnInterrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            _stop_if_interrupted(pressed)

        def on_test_batch_end(self, batch, logs=None):
            _stop_if_interrupted(pressed)

    return StopOnInterrupt()


def _retune_malloc(keras):
    """A callback that applies ``hepdask.malloc.tune`` once the first batch has run:
    TensorFlow's generator op resets glibc's trim threshold when a strategy's input starts."""
    from . import malloc

    class RetuneMalloc(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                malloc.tune()

    return RetuneMalloc()


def fit(config: TrainConfig, *, verbose: int = 2) -> TrainResult:
    """Train, checkpoint, evaluate and plot; everything lands in ``config.output``.

    Everything that can be checked is checked before the output is touched: the store, the
    devices, the model against the images, the batch size against the replicas.
    """
    try:
        return _fit(config, verbose)
    except Exception as err:
        # A hepdask error raised inside the input pipeline (a damaged chunk) reaches the
        # caller as itself, not inside TensorFlow's error for the step that read it.
        carried = carried_error(err)
        if carried is None:
            raise
        raise carried from err


def _fit(config: TrainConfig, verbose: int) -> TrainResult:
    sizes = _check_store(config)
    output = Path(config.output)

    import keras

    keras.backend.clear_session()
    strategy = make_strategy(config)
    replicas = strategy.num_replicas_in_sync
    if config.data.batch_size % replicas:
        msg = f"data.batch_size {config.data.batch_size} is not divisible by the {replicas} replicas"
        raise ConfigError(msg)
    log.info("training on %d replica(s): %s", replicas, strategy.extended.worker_devices)
    image_shape = _image_shape(config)
    with strategy.scope():
        model = build_model(config, image_shape, len(config.data.extra_inputs))
    # One training of an output at a time (a second would mix its checkpoints and history in).
    with store.output_lock(output):
        return _train(config, model, strategy, sizes, output, verbose)


def _train(config: TrainConfig, model, strategy, sizes: dict[str, int], output: Path, verbose: int) -> TrainResult:
    """Train *model* into *output* (resuming what a killed run left), evaluate and plot."""
    import keras

    replicas = strategy.num_replicas_in_sync
    inputs = model_inputs(config)  # divide_by_max's maximum may take a pass over the train split
    finished_epochs = _prepare_output(config, output, inputs)
    if finished_epochs:
        log.info("resuming %s after %d finished epoch(s)", output, finished_epochs)
    # Both inputs repeat, batched one planner epoch at a time, and each Keras epoch takes
    # exactly one planner epoch of steps: every event once (fewer than the replica count may
    # be left out so that no replica gets an empty batch), and a new order every epoch. An
    # explicit data.steps_per_epoch takes that many training steps instead. A resumed run
    # starts where the uninterrupted one would be after its finished epochs.
    plan_steps = tfdata.steps_per_epoch(sizes["train"], config.data.batch_size, replicas=replicas)
    steps = config.data.steps_per_epoch or plan_steps
    first_epoch, skip_steps = divmod(finished_epochs * steps, plan_steps)
    train = _inputs(config, "train", shuffle=True, epochs=None, strategy=strategy, first_epoch=first_epoch,
                    skip_steps=skip_steps)
    val_steps = tfdata.steps_per_epoch(sizes["val"], config.data.batch_size, replicas=replicas)
    val = _inputs(config, "val", shuffle=False, epochs=None, strategy=strategy) if val_steps else None
    monitor = "val_loss" if val else "loss"
    # A Ctrl-C from the first step to the metrics is raised where a step ends; once the
    # metrics are final the run is finished, and one then is Python's again.
    with _interrupt_between_steps() as pressed:
        callbacks = [
            keras.callbacks.ModelCheckpoint(str(output / "best.keras"), monitor=monitor, save_best_only=True,
                                            initial_value_threshold=_best_so_far(output / "history.csv", monitor)),
            keras.callbacks.CSVLogger(str(output / "history.csv"), append=True),
            _retune_malloc(keras),
            _stop_on_interrupt(keras, pressed),
            # Last: an epoch is backed up once everything else has its record of it. The backup
            # outlives fit and goes once the metrics are written, so a kill at any point before
            # resumes (a run whose epochs are all done just saves and evaluates again).
            keras.callbacks.BackupAndRestore(str(output / BACKUP), delete_checkpoint=False),
        ]
        history = model.fit(train, epochs=config.fit.epochs, steps_per_epoch=steps, validation_data=val,
                            validation_steps=val_steps or None, callbacks=callbacks, verbose=verbose, shuffle=False)
        _stop_if_interrupted(pressed)
        model.save(output / "model.keras")
        full_history = (_read_history(output / "history.csv")
                        or {k: list(map(float, v)) for k, v in history.history.items()})
        evaluated = _evaluated_weights(config, model, output, full_history, monitor)
        metrics = {**evaluated, **evaluate(config, model, evaluated["model"], pressed)}
        _stop_if_interrupted(pressed)
    metrics["replicas"] = replicas
    metrics["train_events"], metrics["val_events"] = sizes["train"], sizes["val"]
    metrics["inputs"] = inputs
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(output, full_history, metrics)
    shutil.rmtree(output / BACKUP, ignore_errors=True)
    return TrainResult(output, full_history, metrics, replicas)


def epochs_trained(history: dict[str, list[float]]) -> int:
    """The epochs a training's history (one list per metric) records."""
    return len(next(iter(history.values()), []))


def _evaluated_weights(config: TrainConfig, model, output: Path, history: dict[str, list[float]],
                       monitor: str) -> dict[str, Any]:
    """Give *model* the weights ``fit.evaluate`` asks for and say which they are: best.keras's
    (the epoch of lowest *monitor*; a resumed run's history covers every epoch) or the last
    epoch's, which it already holds."""
    record: dict[str, Any] = {"model": "model.keras", "epoch": epochs_trained(history), "monitor": monitor}
    if config.fit.evaluate == "last":
        return record
    values = np.asarray(history.get(monitor, []), np.float64)
    best = output / "best.keras"
    if not np.isfinite(values).any():
        log.warning("no epoch had a finite %s, so best.keras was not written: evaluating the last epoch's "
                    "weights (model.keras)", monitor)
        return record
    if not best.exists():
        log.warning("%s is missing (removed since it was written?): evaluating the last epoch's weights "
                    "(model.keras)", best)
        return record
    model.load_weights(best)
    # ModelCheckpoint saves on a strict improvement, so the first of equal minima is the one saved.
    return {**record, "model": "best.keras", "epoch": int(np.nanargmin(values)) + 1}


def evaluate(config: TrainConfig, model, name: str = "model.keras", pressed: _Pressed | None = None) -> dict[str, Any]:
    """Metrics of *model* (saved as *name*) on the test split, every test event once, in
    store order. A binary model's working point is the threshold that minimises
    misclassification of the validation split, so that the test figures at it are not tuned
    on the test events; without validation events, of the test split itself."""
    labels, scores = predict(config, model, "test", name, pressed)
    if config.model.classes != 2:
        return {"model": name, **multiclass_metrics(labels, scores)}
    threshold, chosen_on = None, "test"
    val_labels, val_scores = predict(config, model, "val", name, pressed)
    if val_labels.size and np.unique(val_labels).size == 2:
        threshold, chosen_on = binary_metrics(val_labels, val_scores[:, 0])["best_threshold"], "val"
    return {"model": name, **binary_metrics(labels, scores[:, 0], threshold), "threshold_split": chosen_on}


def predict(config: TrainConfig, model, split: str, name: str = "model.keras",
            pressed: _Pressed | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of every event of *split*, in store order; non-finite scores are
    refused (a model whose weights went NaN)."""
    labels, scores = [], []
    for x, y in _inputs(config, split, shuffle=False, epochs=1):
        scores.append(np.asarray(model(x, training=False)))
        labels.append(np.asarray(y))
        _stop_if_interrupted(pressed)
    scores_array = np.concatenate(scores) if scores else np.zeros((0, 1))
    labels_array = np.concatenate(labels) if labels else np.zeros(0)
    bad = int(np.count_nonzero(~np.isfinite(scores_array).all(axis=1)))
    if bad:
        msg = (f"{config.output}: the trained model gives NaN or infinite scores for {bad} of {len(scores_array)} "
               f"{split} events (its weights are not finite: history.csv shows where the loss diverged); "
               f"{name} is saved, the metrics are not")
        raise TrainError(msg)
    return labels_array, scores_array


def _read_history(path: Path) -> dict[str, list[float]]:
    import csv

    if not path.exists():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {}) if k != "epoch"}


def _plot(output: Path, history: dict[str, list[float]], metrics: dict[str, Any]) -> None:
    try:
        from . import plots
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'hepdask[plots]')")
        return
    plots.history(history, output / "history.png")
    if "roc" in metrics:
        plots.roc(metrics, output / "roc.png")
