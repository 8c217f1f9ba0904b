"""Loading, validating and overriding configs."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import yaml

from hepdask.cli import main as cli
from hepdask.config import Override, apply_overrides, from_dict, load, load_train, override_origin
from hepdask.errors import ConfigError

from .data_generation import demo_config, write_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _config(tmp_path, **changes):
    return demo_config(tmp_path / "data", tmp_path / "out.zarr", **changes)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    if path.stem.endswith("-train"):
        train = load_train(path)
        assert Path(train.store).is_absolute()
        assert Path(train.output).is_absolute()
    else:
        config = load(path)
        assert Path(config.output.path).is_absolute()


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    raw = _config(tmp_path)
    raw["samples"][0]["files"] = "data/*.root"
    raw["output"]["path"] = "../out/x.zarr"
    (tmp_path / "sub").mkdir()
    config = load(write_config(tmp_path / "sub" / "c.yaml", raw))
    assert config.samples[0].files == [str(tmp_path / "sub" / "data" / "*.root")]
    assert config.output.path == str(tmp_path / "out" / "x.zarr")


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path):
    raw = _config(tmp_path)
    raw["image"]["axes"][0]["bin"] = 3
    raw["selektion"] = {}
    with pytest.raises(ConfigError) as err:
        from_dict(raw, source="c.yaml")
    text = str(err.value)
    assert "c.yaml: unknown key 'image.axes.0.bin'; did you mean 'bins'?" in text
    assert "unknown key 'selektion'; did you mean 'selection'?" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image.dtype": "uint8"}, "needs a float dtype"),
        ({"output.split": {"train": 0.5, "val": 0.1}}, "add up to 1"),
        ({"output.chunk_events": "lots"}, "output.chunk_events"),
        ({"image.axes": [{"field": "z", "bins": 4}]}, "needs 'bins' and 'range'"),
        ({"image.axes": [{"field": "z", "bins": 4, "range": [0, 1], "downsample": 3}]}, "not divisible"),
        ({"image.axes": [{"field": "q", "bins": 4, "range": [0, 1]}]}, "is not a hit field"),
        ({"image.axes": [{"field": "z", "bins": 4, "range": [0, 1], "scale": "log"},
                         {"field": "x", "bins": 4, "range": [0, 1]}]}, "positive range start"),
        ({"image.format": "xyz"}, "exactly three axes"),
        ({"event": {"label": "eventNumber"}}, "clash"),
        ({"event": {"nhits": "eventNumber"}}, "'nhits' is taken"),
        ({"image.axes": [{"field": "z", "bins": 4, "range": [-1e308, 1e308]}]}, "finite and increasing"),
        ({"image.axes": [{"field": "z", "bins": 40, "range": [1e16, 1e16 + 64]}]}, "narrower than float64"),
        ({"image.axes": [{"field": "z", "edges": [0, float("nan"), 3]}]}, "finite, increasing"),
        ({"image.axes": [{"field": "z", "edges": [0, 1, float("inf")]}]}, "finite, increasing"),
        ({"selection": {"hits": "1 > 0"}}, "uses no field"),
        ({"output.shuffle": {"seed": -1}}, "output.shuffle.seed: Input should be greater than or equal to 0"),
        ({"output.path": "/"}, "output.path: '/' names no directory to build the store in"),
        ({"output.compressor": {"name": "blosc-lz4", "level": 12}}, "output.compressor: .*'blosc-lz4': level 12 is above its highest, 9"),
        ({"cluster": {"kind": "address"}}, "needs cluster.address"),
        ({"cluster": {"processes": False, "workers": 2}}, "cluster.workers is 2"),
        ({"cluster": {"processes": False, "kind": "address", "address": "tcp://h:1"}}, "cluster.kind is 'address'"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(_config(tmp_path, **change))


def test_small_plans_run_in_this_process_unless_told_otherwise():
    from hepdask.config import Cluster

    assert Cluster().in_process(1) and not Cluster().in_process(2)
    assert not Cluster(processes=True).in_process(1)
    assert Cluster(processes=False).in_process(50)
    assert not Cluster(kind="address", address="tcp://h:1").in_process(1)
    # a plan of small files, unless workers or threads are asked for
    assert Cluster().in_process(20, small_input=True)
    assert not Cluster(workers=2).in_process(20, small_input=True)
    assert not Cluster(threads_per_worker=2).in_process(20, small_input=True)
    assert not Cluster(processes=True).in_process(20, small_input=True)
    assert not Cluster(kind="address", address="tcp://h:1").in_process(20, small_input=True)


def test_a_build_in_this_process_starts_no_dashboard_unless_one_is_named():
    from hepdask.config import DEFAULT_DASHBOARD, Cluster

    assert Cluster().dashboard(in_process=False) == DEFAULT_DASHBOARD
    assert Cluster().dashboard(in_process=True) is None
    assert Cluster(dashboard_address="127.0.0.1:0").dashboard(in_process=True) == "127.0.0.1:0"
    assert Cluster(dashboard_address=None).dashboard(in_process=False) is None


def test_a_bracketed_list_index_in_an_override_is_answered_with_the_dotted_key(tmp_path):
    path = write_config(tmp_path / "c.yaml", _config(tmp_path))
    with pytest.raises(ConfigError, match=r"numbered with dots: image\.axes\.0\.bins=3$"):
        load(path, ["image.axes[0].bins=3"])


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    path = write_config(tmp_path / "c.yaml", _config(tmp_path))
    config = load(path, ["output.chunk_events=7", "samples.1.label=5", "read.step_size=100",
                         "image.axes.0.bins=3", "output.shuffle.enabled=false"])
    assert config.output.chunk_events == 7
    assert config.samples[1].label == 5
    assert config.read.step_size == 100
    assert config.image.axes[0].bins == 3
    assert config.output.shuffle.enabled is False


@pytest.mark.parametrize(
    ("override", "message"),
    [("noequals", "KEY.SUB=VALUE"), ("samples.9.label=1", "not an index"), ("name.sub=1", "is a value")],
)
def test_bad_overrides_are_explained(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(_config(tmp_path), [override])


def test_python_tags_are_refused_without_side_effects(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path)
    assert not marker.exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")


def test_content_hash_ignores_the_cluster(tmp_path):
    a = from_dict(_config(tmp_path))
    b = from_dict(_config(tmp_path, cluster={"workers": 1}))
    c = from_dict(_config(tmp_path, **{"output.chunk_events": 3}))
    assert a.content_hash() == b.content_hash() != c.content_hash()
    assert yaml.safe_load(a.to_yaml())["name"] == "test"


@pytest.mark.parametrize("changes", [
    {"output.shuffle": {"enabled": True, "seed": 7}},
    {"output.shuffle": {"enabled": False}},
    {"output.split": {"train": 0.5, "val": 0.5}},
    {"selection.events": "nhits >= 3"},
    {"selection.hits": "E > 0.2"},
], ids=lambda c: next(iter(c)))
def test_content_hash_follows_what_decides_the_store(tmp_path, changes):
    """A resumed build reuses staged partitions and written chunks of the same hash: anything
    that changes which events are stored, or where, must change it (a write phase resumed
    under another shuffle seed would otherwise mix two orders in one store)."""
    base = from_dict(_config(tmp_path, **{"output.shuffle": {"enabled": True, "seed": 42}}))
    assert from_dict(_config(tmp_path, **changes)).content_hash() != base.content_hash()
    same = {"read.on_bad_file": "skip", "read.partitions_per_task": 3, "read.memory_map": False,
            "output.overwrite": True}
    assert from_dict(_config(tmp_path, **{"output.shuffle": {"enabled": True, "seed": 42}}, **same)).content_hash() \
        == base.content_hash()


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ({"hits": "Ex > 0.01"}, "selection.hits: unknown field 'Ex' in 'Ex > 0.01'; did you mean"),
        ({"events": "nhit >= 3"}, "selection.events: unknown field 'nhit' in 'nhit >= 3'; did you mean 'nhits'?"),
        ({"events": "__import__('os')"}, "selection.events: only"),
        ({"hits": "E >> 1"}, "operator RShift is not allowed"),
    ],
)
def test_cuts_are_checked_when_the_config_loads(tmp_path, selection, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(_config(tmp_path, selection=selection))


def test_a_per_image_cut_is_checked_too(tmp_path):
    raw = _config(tmp_path)
    raw["image"]["hits"] = "zz > 1"
    with pytest.raises(ConfigError, match=re.escape("image.hits: unknown field 'zz'")):
        from_dict(raw)


def test_errors_are_one_line_per_key_and_name_the_override(tmp_path):
    path = write_config(tmp_path / "c.yaml", _config(tmp_path))
    with pytest.raises(ConfigError) as err:
        load(path, ["output.chunk_events=ten"])
    assert str(err.value) == ("--set 'output.chunk_events=ten': output.chunk_events: Input should be a valid "
                              "integer or 'auto' (got 'ten')")
    raw = _config(tmp_path)
    raw["tre"] = raw.pop("tree")
    with pytest.raises(ConfigError) as err:
        from_dict(raw, source="c.yaml")
    assert str(err.value) == "c.yaml: unknown key 'tre'; did you mean 'tree'?"


def test_one_override_may_be_given_as_a_string(tmp_path):
    path = write_config(tmp_path / "c.yaml", _config(tmp_path))
    assert load(path, "output.chunk_events=3").output.chunk_events == 3


def test_an_override_keeps_its_flag_through_copies():
    flag = Override("cluster.workers=0", "--workers 0")
    for copied in (copy.copy(flag), copy.deepcopy(flag), pickle.loads(pickle.dumps(flag))):
        assert copied == "cluster.workers=0" and override_origin(copied) == "--workers 0"
    assert override_origin("cluster.workers=0") == "--set 'cluster.workers=0'"


def test_errors_name_the_flag_the_user_typed(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", _config(tmp_path))
    cases = [
        (["--workers", "0"], "--workers 0: cluster.workers: Input should be greater than 0 (got 0)"),
        (["--cluster", "slurm", "--jobs", "5", "--minimum-jobs", "6"],
         f"{path} with --cluster slurm, --jobs 5, --minimum-jobs 6: cluster: cluster.minimum_jobs (6) exceeds"),
        (["--cluster", "lcoal"], f"{path} with --cluster lcoal: cluster: cluster.address 'lcoal'"),
        # A whole-config check names the file and the overrides that may have caused it.
        (["--set", "image.axes.0.field=q"], f"{path} with --set 'image.axes.0.field=q': image axis field 'q'"),
        (["--set", "output..path=x"], "--set 'output..path=x': expected KEY.SUB=VALUE"),
    ]
    for flags, message in cases:
        assert cli(["build-dataset", str(path), "--dry-run", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hepdask: error: {message}"), err


def test_a_cluster_address_that_is_no_address_is_refused_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("cluster.address 'lcoal' is not a scheduler address")) as err:
        from_dict(_config(tmp_path, cluster={"kind": "address", "address": "lcoal"}))
    assert "did you mean 'local'?" in str(err.value)
    for address in ("tcp://10.0.0.1:8786", "tls://node01:8786", "node01:8786", "tcp://[::1]:8786"):
        assert from_dict(_config(tmp_path, cluster={"kind": "address", "address": address})).cluster.address == address


def test_a_missing_km3net_testdata_file_is_a_config_error(tmp_path):
    pytest.importorskip("km3net_testdata")
    raw = _config(tmp_path)
    raw["samples"][0]["files"] = ["km3net-testdata:offline/no-such-file.root"]
    with pytest.raises(ConfigError, match="no such file in the km3net-testdata package"):
        from_dict(raw)


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nsamples: [a, b\ntree: t\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert len(str(err.value).splitlines()) == 1
    assert "not valid YAML" in str(err.value) and "line 3" in str(err.value)


def test_a_key_given_twice_is_refused(tmp_path):
    """YAML would keep the second silently; the config names the key and both lines."""
    text = yaml.safe_dump(_config(tmp_path), sort_keys=False)
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("  weight: E\n", "  weight: E\n  weight: x\n", 1))
    assert path.read_text().count("weight:") == 2
    with pytest.raises(ConfigError, match=r"key 'image\.weight' is given twice \(lines \d+ and \d+\)"):
        load(path)
    # Keys are compared as YAML reads them: 13 and 13.0 are the same label-map key.
    path.write_text(text + "labels: {field: eventNumber, map: {13: 1, 13.0: 2}}\n")
    with pytest.raises(ConfigError, match=r"key 'labels\.map\.13\.0' is given twice"):
        load(path)
    # The same name in two different mappings is no duplicate.
    raw = _config(tmp_path)
    raw["samples"][0]["metadata"] = {"name": "a"}
    assert load(write_config(tmp_path / "ok.yaml", raw)).samples[0].metadata == {"name": "a"}


@pytest.mark.parametrize("override", ["output.path=", "samples.0.files=", "cluster.profile="])
def test_an_empty_path_is_refused_not_taken_as_the_configs_directory(tmp_path, override):
    """Resolved against the config file, an empty output.path named its directory (and a
    training's empty output wrote its model and plots among the configs)."""
    path = write_config(tmp_path / "c.yaml", demo_config(tmp_path / "data", tmp_path / "o.zarr"))
    key = override.rstrip("=")
    with pytest.raises(ConfigError, match=re.escape(f"--set {override!r}: {key}") + r"(\.0)?: is empty: give a path"):
        load(path, [override])


def test_an_empty_training_output_is_refused(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "store": "s.zarr", "output": ""}))
    with pytest.raises(ConfigError, match=r"output: is empty: give a path"):
        load_train(path)
    assert load_train(path, ["output=run"]).output == str(tmp_path / "run")
