"""Training under a 2-replica MirroredStrategy on CPU, evaluation metrics, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hepdask.cli import main as cli
from hepdask.config import TrainConfig
from hepdask.errors import ConfigError
from hepdask.train import binary_metrics, fit, roc_curve


def test_roc_of_perfect_random_and_inverted_scores():
    labels = np.array([0, 0, 1, 1])
    assert binary_metrics(labels, np.array([0.1, 0.2, 0.8, 0.9]))["auc"] == 1.0
    assert binary_metrics(labels, np.array([0.9, 0.8, 0.2, 0.1]))["auc"] == 0.0
    rng = np.random.default_rng(0)
    many = rng.integers(0, 2, 20000)
    assert abs(binary_metrics(many, rng.random(20000))["auc"] - 0.5) < 0.02
    fpr, tpr, _ = roc_curve(labels, np.array([0.5, 0.5, 0.5, 0.5]))
    assert fpr.tolist() == [0.0, 1.0]
    assert tpr.tolist() == [0.0, 1.0]


def test_best_threshold_acceptance_rejection_and_confusion():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.7, 0.6, 0.62, 0.8, 0.9])
    m = binary_metrics(labels, scores)
    assert m["best_threshold"] == pytest.approx(0.6)
    assert m["signal_acceptance"] == 1.0
    assert m["background_rejection"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"]["values"] == [[2, 1], [0, 4]]


def test_calling_nothing_signal_is_reported_consistently():
    """When the best working point rejects everything, scores of exactly 1.0 (a saturated
    sigmoid) must not count as signal in the matrix while the rates say none does."""
    m = binary_metrics(np.array([0, 0, 0, 1, 0, 0]), np.array([1.0, 1.0, 1.0, 1.0, 0.2, 0.1]))
    assert (m["signal_acceptance"], m["background_rejection"]) == (0.0, 1.0)
    assert m["best_threshold"] > 1.0
    assert m["confusion_matrix"]["values"] == [[5, 0], [1, 0]]
    assert m["accuracy_at_best_threshold"] == pytest.approx(5 / 6)


def _config(store, output, **changes) -> TrainConfig:
    raw = {
        "name": "t", "store": str(store), "output": str(output),
        "data": {"batch_size": 64, "transforms": ["log1p", "add_channel_axis"], "seed": 3},
        "model": {"name": "ldmx_convnet", "filters": 8, "dense": 32},
        "fit": {"epochs": 4, "learning_rate": 0.003},
        "strategy": {"kind": "mirrored", "logical_cpus": 2},
    }
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return TrainConfig.model_validate(raw)


@pytest.mark.slow
def test_training_on_two_replicas_learns_and_writes_its_outputs(tf_two_cpus, train_store, tmp_path):
    result = fit(_config(train_store, tmp_path / "run"), verbose=0)
    assert result.replicas == 2
    assert max(result.history["val_accuracy"]) > 0.65
    for name in ("model.keras", "best.keras", "history.csv", "metrics.json", "history.png", "roc.png"):
        assert (tmp_path / "run" / name).exists(), name
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["auc"] > 0.7
    assert metrics["events"] == sum(sum(row) for row in metrics["confusion_matrix"]["values"])
    assert metrics["threshold_split"] == "val" and metrics["model"] == "best.keras"
    assert metrics["epoch"] == int(np.argmin(result.history["val_loss"])) + 1
    # The figures are best.keras's: its own scores of the test split give the same AUC.
    import keras

    from hepdask.train import predict

    labels, scores = predict(_config(train_store, tmp_path / "run"), keras.models.load_model(tmp_path / "run" / "best.keras"), "test")
    assert metrics["auc"] == pytest.approx(_rank_auc(labels, scores[:, 0]), abs=1e-9)
    assert metrics["inputs"]["transforms"] == ["log1p", "add_channel_axis"]
    assert not (tmp_path / "run" / "backup").exists()  # BackupAndRestore removes it after a finished fit


@pytest.mark.parametrize("model", ["vgg", "resnet"])
def test_other_zoo_models_train_one_step(tf_two_cpus, train_store, tmp_path, model):
    result = fit(_config(train_store, tmp_path / model, **{"model.name": model, "fit.epochs": 1,
                                                           "data.steps_per_epoch": 2}), verbose=0)
    assert len(result.history["loss"]) == 1
    assert np.isfinite(result.history["loss"][0])


def test_refusals_before_training(tf_two_cpus, train_store, tmp_path):
    with pytest.raises(ConfigError, match="needs images of rank 3"):
        fit(_config(train_store, tmp_path / "a", **{"data.transforms": []}), verbose=0)
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas"):
        fit(_config(train_store, tmp_path / "b", **{"data.batch_size": 63}), verbose=0)


def test_cli_train_with_a_device_list(tf_two_cpus, train_store, tmp_path, capsys):
    raw = _config(train_store, tmp_path / "cli").model_dump(mode="json")
    raw["strategy"] = {"kind": "mirrored", "logical_cpus": 2}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli(["train", str(path), "--epochs", "1", "--MirroredStrategy", "/cpu:0", "/cpu:1",
                "--set", "data.steps_per_epoch=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "on 2 replica(s)" in out
    assert "AUC" in out
    assert cli(["train", str(path), "--epochs", "1"]) == 2
    assert "already holds a finished training" in capsys.readouterr().err


def test_fit_takes_one_planner_epoch_of_steps_per_epoch(tf_two_cpus, train_store, tmp_path, monkeypatch):
    """Keras keeps one iterator over repeating inputs and takes steps_per_epoch steps from it
    each epoch: those must be exactly the planner's steps for one pass over each split
    (test_tfdata checks that the passes are whole and no replica gets an empty batch)."""
    import keras
    import zarr

    from hepdask import tfdata

    seen: dict = {}
    plain_fit = keras.Model.fit

    def noting_fit(model, x=None, **kwargs):
        seen.update(kwargs, x=x)
        return plain_fit(model, x, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", noting_fit)
    fit(_config(train_store, tmp_path / "run", **{"fit.epochs": 1}), verbose=0)
    sizes = {s: zarr.open_group(str(train_store), mode="r")[s]["label"].shape[0] for s in ("train", "val")}
    assert seen["steps_per_epoch"] == tfdata.steps_per_epoch(sizes["train"], 64, replicas=2) == -(-sizes["train"] // 64)
    assert seen["validation_steps"] == tfdata.steps_per_epoch(sizes["val"], 64, replicas=2)
    assert seen["x"].cardinality == tf_two_cpus.data.INFINITE_CARDINALITY


def test_data_cast_sets_the_dtype_the_model_gets(tf_two_cpus, train_store, tmp_path):
    import zarr

    from hepdask import train

    stored = zarr.open_group(str(train_store), mode="r")["train"]["image"].dtype
    for cast, expected in ((None, stored), ("float16", np.float16)):
        config = _config(train_store, tmp_path / "c", **{"data.cast": cast, "data.transforms": ["add_channel_axis"]})
        x, _ = next(iter(train._inputs(config, "val", shuffle=False, epochs=1)))
        assert x.dtype.as_numpy_dtype == expected


def _fake_tensorflow(tmp_path, body: str) -> Path:
    """A 'tensorflow' module that writes to the process's stderr (fd 2) as TensorFlow's C++
    start-up does: a notice hepdask filters out and a line it must pass on."""
    notice = "I0000 00:00:1796410210.300507 5507 port.cc:153] oneDNN custom operations are on. You may see..."
    fatal = ("F0000 00:00:1796410210.400000 5507 cpu_feature_guard.cc:95] The TensorFlow library was compiled "
             "to use AVX instructions, but these aren't available on your machine.")
    (tmp_path / "tensorflow.py").write_text(
        f"import os\nos.write(2, b{notice!r} + b'\\n' + b'E0000 a real problem\\n')\n"
        f"os.write(2, b{fatal!r} + b'\\n')\n{body}")
    return tmp_path


SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from hepdask.cli import tensorflow_notices_filtered
with tensorflow_notices_filtered():
    imported = "tensorflow" in sys.modules
    os.write(2, b"W0000 dataset.cc:997] Input of GeneratorDatasetOp::Dataset will not be optimized because...\\n")
    print("Epoch 1/3", flush=True)
    os.write(2, b"W0000 op_kernel.cc:1845] UNKNOWN: StoreError: chunk 3 is missing\\nTraceback (most recent call last):\\n"
                b"  File x, line 1\\n\\nhepdask.errors.StoreError: chunk 3 is missing\\n\\t [[{{node PyFunc}}]]\\n")
    print("a warning of the training itself", file=sys.stderr)
print("imported" if imported else "not imported", flush=True)
print("after the training", file=sys.stderr)
"""


@pytest.mark.parametrize(("body", "returncode", "printed"), [
    ("", 0, "imported"),
    ("raise ImportError('no libcudart')\n", 0, "not imported"),  # hepdask.tfdata explains it later
    ("os.abort()\n", -6, ""),  # what TensorFlow wrote before an abort still gets through
])
def test_tensorflow_start_up_notices_are_filtered_and_nothing_else(tmp_path, body, returncode, printed):
    fake = _fake_tensorflow(tmp_path, body)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(fake)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == returncode, run.stderr
    assert "oneDNN custom operations" not in run.stderr and "GeneratorDatasetOp" not in run.stderr
    assert "chunk 3" not in run.stderr and "Traceback" not in run.stderr  # an echo of the error, and its lines
    assert "E0000 a real problem" in run.stderr and "compiled to use AVX instructions" in run.stderr
    assert run.stdout.strip() == (f"Epoch 1/3\n{printed}" if printed else "")
    if printed:
        assert run.stderr.splitlines()[-2:] == ["a warning of the training itself", "after the training"]


def test_a_working_point_chosen_elsewhere_is_applied_not_retuned():
    """The threshold comes from the validation split; on the test events it gives what it
    gives, not the test split's own best."""
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.7, 0.6, 0.62, 0.8, 0.9])
    m = binary_metrics(labels, scores, threshold=0.75)
    assert m["best_threshold"] == 0.75
    assert (m["signal_acceptance"], m["background_rejection"]) == (0.5, 1.0)
    assert m["confusion_matrix"]["values"] == [[3, 0], [2, 2]]
    assert m["accuracy_at_best_threshold"] == pytest.approx(5 / 7)
    assert m["auc"] == binary_metrics(labels, scores)["auc"]


def _rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The Mann-Whitney AUC (ties count half), computed apart from hepdask's ROC."""
    signal, background = scores[labels == 1], scores[labels == 0]
    wins = (signal[:, None] > background[None, :]).sum() + 0.5 * (signal[:, None] == background[None, :]).sum()
    return float(wins / (signal.size * background.size))


class _Weights:
    """A stand-in model that records which weights it was given."""

    def __init__(self):
        self.loaded = []

    def load_weights(self, path):
        self.loaded.append(Path(path).name)


@pytest.mark.parametrize(("evaluate", "best_written", "history", "expected"), [
    ("best", True, {"val_loss": [0.5, 0.3, 0.3, 0.4]}, ("best.keras", 2, ["best.keras"])),
    ("last", True, {"val_loss": [0.5, 0.3, 0.4]}, ("model.keras", 3, [])),
    ("best", False, {"val_loss": [float("nan")] * 2}, ("model.keras", 2, [])),
])
def test_the_metrics_are_of_the_weights_fit_evaluate_names(tmp_path, evaluate, best_written, history, expected):
    """best.keras holds the first epoch of lowest val_loss (ModelCheckpoint saves on a strict
    improvement); a run in which no epoch had a finite loss has none, and the last is used."""
    from hepdask.train import _evaluated_weights

    if best_written:
        (tmp_path / "best.keras").write_bytes(b"")
    model = _Weights()
    record = _evaluated_weights(_config("s.zarr", tmp_path, **{"fit.evaluate": evaluate}), model, tmp_path,
                                {"loss": [1.0] * len(history["val_loss"]), **history}, "val_loss")
    assert (record["model"], record["epoch"], model.loaded) == expected


def test_a_ctrl_c_is_raised_between_steps_not_in_whatever_code_it_lands_in(caplog):
    """Python raises KeyboardInterrupt in the code the signal interrupts, and in a training that
    was often a TensorFlow object's __del__, where it is printed and dropped ("Exception
    ignored"): the training then ran to its end and exited 0. The first Ctrl-C is held back to
    the end of the step; a second interrupts at once."""
    import signal

    from hepdask.train import _interrupt_between_steps, _stop_if_interrupted

    def a_training_step_pressed_twice() -> None:
        with _interrupt_between_steps() as pressed:
            signal.raise_signal(signal.SIGINT)  # held back: the code goes on
            assert pressed.is_set()
            with pytest.raises(KeyboardInterrupt):
                _stop_if_interrupted(pressed)  # where the step ends
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # a second Ctrl-C
            _stop_if_interrupted(pressed)  # where the step ends

    # Python's own handler (dask_jobqueue, imported by other tests, installs one of its own).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            a_training_step_pressed_twice()
        assert "Ctrl-C: stopping after this step (press it again to stop at once)" in caplog.text
        with _interrupt_between_steps() as pressed:  # nothing pressed: nothing raised
            _stop_if_interrupted(pressed)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a handler of the user's own is left alone
        with _interrupt_between_steps() as pressed:
            assert pressed is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
