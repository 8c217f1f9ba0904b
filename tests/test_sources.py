"""Jagged branches are taken apart into per-event counts and flat hits, whatever their layout."""

from __future__ import annotations

import re

import awkward as ak
import numpy as np
import pytest

from hepdask import sources
from hepdask.errors import BranchError

EVENTS = [[1.5, 2.5], [], [3.5, 4.5, 5.5], [6.5]]
#: A KM3NeT offline file (km3net-testdata): split classes, the streamers uproot parses most.
KM3NET_FILE = "offline/mcv6.0.gsg_muon_highE-CC_50-500GeV.km3sim.jterbr00008357.jorcarec.aanet.905.root"


@pytest.mark.parametrize(
    "array",
    [
        ak.Array(EVENTS),                              # list-offset over a flat buffer (uproot's)
        ak.Array([[0.5], *EVENTS])[1:],                # the same with offsets not starting at 0
        ak.Array([*EVENTS, [9.5]])[[0, 1, 2, 3]],      # a ListArray (starts/stops), awkward's path
        ak.Array([[[1.5], [2.5]], [], [[3.5], [4.5], [5.5]], [[6.5]]])[:, :, 0],
    ],
    ids=["list-offset", "sliced", "list", "indexed"],
)
def test_jagged_parts_match_awkward(array):
    counts, flat = sources._jagged_parts(array)
    np.testing.assert_array_equal(counts, [2, 0, 3, 1])
    np.testing.assert_array_equal(flat, [1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
    assert counts.dtype == np.int64


def test_flatten_hits_names_fields_of_different_lengths():
    arrays = {"x": ak.Array(EVENTS), "E": ak.Array([[1.0, 2.0], [], [3.0, 4.0], [5.0]])}
    with pytest.raises(BranchError, match=r"'x' and 'E' have different numbers of hits in entry 12 \(3 and 2\)"):
        sources._flatten_hits("f.root", arrays, {"x": "x", "E": "E"}, 10)
    offsets, flat = sources._flatten_hits("f.root", {"x": arrays["x"]}, {"x": "x"}, 0)
    np.testing.assert_array_equal(offsets, [0, 2, 2, 5, 6])
    np.testing.assert_array_equal(flat["x"], [1.5, 2.5, 3.5, 4.5, 5.5, 6.5])


def test_a_file_matched_twice_in_a_sample_is_listed_once_where_first_found(tmp_path):
    for name in ("a.root", "b.root", "c.root"):
        (tmp_path / name).touch()
    a, b, c = (str(tmp_path / name) for name in ("a.root", "b.root", "c.root"))
    every = str(tmp_path / "*.root")
    assert sources.expand("s", [every, b, str(tmp_path / "[ab].root"), a]) == [a, b, c]
    assert sources.expand("s", [c, every, c]) == [c, a, b]
    assert sources.expand("s", [b, b]) == [b]
    partitions = sources.plan([("s", 0, [every, c])])
    assert [(p.index, p.sample, p.file) for p in partitions] == [(0, "s", a), (1, "s", b), (2, "s", c)]


def _write_tree(path, hits_dtype, offset):
    """A small tree: jagged ``x`` of *hits_dtype* and one int32 ``n`` per event."""
    import uproot

    x = ak.values_astype(ak.Array(EVENTS), hits_dtype) + offset
    branches = {"x": x, "n": np.arange(len(EVENTS), dtype=np.int32) + offset}
    with uproot.recreate(path) as f:
        f.mktree("t", {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in branches.items()})
        f["t"].extend(branches)
    return path


def _read_all(path, **options):
    partition = sources.Partition(0, "s", 0, str(path))
    steps = list(sources.read(partition, "t", {"x": "x"}, {"n": "n"}, step_size=3, **options))
    flat = np.concatenate([s.hits["x"] for s in steps])
    return flat, np.concatenate([s.events["n"] for s in steps]), [s.n_events for s in steps]


def test_branch_types_are_identified_once_per_type_and_again_for_another(tmp_path, monkeypatch):
    import uproot

    identify = uproot.interpretation.identify
    calls = []
    original = identify.interpretation_of

    def counted(branch, *args, **kwargs):
        calls.append(branch.name)
        return original(branch, *args, **kwargs)

    monkeypatch.setattr(identify, "interpretation_of", counted)
    monkeypatch.setattr(sources, "_BRANCH_TYPES", {})
    a = _write_tree(tmp_path / "a.root", np.float64, 0)
    b = _write_tree(tmp_path / "b.root", np.float64, 100)
    c = _write_tree(tmp_path / "c.root", np.int32, 1000)

    flat, n, steps = _read_all(a)
    np.testing.assert_array_equal(flat, [1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
    np.testing.assert_array_equal(n, [0, 1, 2, 3])
    assert steps == [3, 1]
    assert sorted(calls) == ["n", "x"]

    # Same streamers, same branch types: nothing identified again, and b's own values come back.
    flat, n, _ = _read_all(b)
    np.testing.assert_array_equal(flat, np.array([1.5, 2.5, 3.5, 4.5, 5.5, 6.5]) + 100)
    np.testing.assert_array_equal(n, [100, 101, 102, 103])
    assert sorted(calls) == ["n", "x"]

    # The same branch name with another type is identified again and read as its own type.
    flat, n, _ = _read_all(c)
    assert "x" in calls[2:]
    assert flat.dtype == np.int32
    np.testing.assert_array_equal(flat, np.array([1, 2, 3, 4, 5, 6]) + 1000)
    np.testing.assert_array_equal(n, [1000, 1001, 1002, 1003])


def test_files_read_the_same_with_and_without_a_memory_map(tmp_path):
    path = _write_tree(tmp_path / "a.root", np.float32, 7)
    mapped, unmapped = _read_all(path, memory_map=True), _read_all(path, memory_map=False)
    for got, expected in zip(mapped, unmapped):
        np.testing.assert_array_equal(got, expected)


def test_a_branch_uproot_cannot_interpret_is_named(tmp_path, monkeypatch):
    import uproot

    identify = uproot.interpretation.identify

    def unknown(branch, *args, **kwargs):
        raise identify.UnknownInterpretation("no rule for this branch", branch.file.file_path, branch.object_path)

    monkeypatch.setattr(identify, "interpretation_of", unknown)
    monkeypatch.setattr(sources, "_BRANCH_TYPES", {})
    path = _write_tree(tmp_path / "a.root", np.float64, 0)
    with pytest.raises(BranchError, match=r"a\.root: hits\.x: uproot cannot read branch 'x' as an array"):
        _read_all(path)


def test_memoised_uproot_classnames_answer_as_uproot_does(monkeypatch):
    import uproot
    import uproot.model

    kd = pytest.importorskip("km3net_testdata")

    originals = {name: getattr(uproot.model, name) for name in sources.MEMOISED_CLASSNAME_FUNCTIONS}
    for name, function in originals.items():
        monkeypatch.setattr(uproot.model, name, getattr(function, "__wrapped__", function))
    plain = {name: getattr(uproot.model, name) for name in sources.MEMOISED_CLASSNAME_FUNCTIONS}
    sources.memoise_uproot_classnames()
    sources.memoise_uproot_classnames()
    for name in sources.MEMOISED_CLASSNAME_FUNCTIONS:
        cached = getattr(uproot.model, name)
        assert cached.__wrapped__ is plain[name]  # cached once, not twice

    with uproot.open(kd.data_path(KM3NET_FILE)) as file:
        names = [*file.file.streamers, "std::vector< double >", "vector<Hit >", "map < int , string >", None]
    encoded = [uproot.model.classname_encode(n, 3) for n in names if n]
    for name in names:
        assert uproot.model.classname_regularize(name) == plain["classname_regularize"](name)
        assert uproot.model.classname_regularize(name) == plain["classname_regularize"](name)
    for name in encoded:
        assert uproot.model.classname_version(name) == plain["classname_version"](name)


def test_branch_type_cache_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_BRANCH_TYPES", {})
    monkeypatch.setattr(sources, "MAX_BRANCH_TYPES", 1)
    flat, n, _ = _read_all(_write_tree(tmp_path / "a.root", np.float64, 0))
    np.testing.assert_array_equal(flat, [1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
    np.testing.assert_array_equal(n, [0, 1, 2, 3])
    assert len(sources._BRANCH_TYPES) == 1


def test_branches_whose_values_are_fixed_arrays_are_refused_where_a_number_is_needed(tmp_path):
    import uproot

    path = tmp_path / "arrays.root"
    v3 = ak.to_regular(ak.Array([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]), axis=2)
    with uproot.recreate(path) as file:
        file.mktree("t", {"v3": "var * 3 * float32", "x": "var * float32", "a": ("int64", (3,)), "n": "int64"})
        file["t"].extend({"v3": ak.values_astype(v3, np.float32), "x": ak.values_astype(ak.Array([[1.0], [2.0]]), np.float32),
                          "a": np.arange(6).reshape(2, 3), "n": np.arange(2)})
    tree = uproot.open(path)["t"]
    cases = [
        ({"x": "v3"}, {}, "hits.x: branch 'v3' holds [3] values per hit"),
        ({"x": "x"}, {"a": "a"}, "branch 'a' is an array of [3] per event (int64_t[3]); pick one element"),
        ({"x": "x"}, {"a": "v3[0]"}, "holds lists of [3] arrays (float[][3]); 'v3[0]' would pick an array"),
        ({"x": "x"}, {"n": "n[0]"}, "branch 'n' holds one number per event (int64_t); 'n[0]' picks from a list"),
    ]
    for hits, events, message in cases:
        with pytest.raises(BranchError, match=re.escape(message)):
            sources.check_branches(tree, str(path), "t", hits, events)
    assert set(sources.check_branches(tree, str(path), "t", {"x": "x"}, {"a": "a[1]", "n": "n"})) == {"x", "a", "n"}


def test_an_element_that_is_itself_a_list_is_named_where_it_is_read():
    """`trks.fitinf[0]` picks each event's first track's fit list, not a number."""
    from km3net_testdata import data_path

    partition = sources.Partition(0, "nu", 1, data_path(KM3NET_FILE))
    with pytest.raises(BranchError, match=r"event\.fit0: 'Evt/trks/trks\.fitinf\[0\]' does not give one number per event"):
        next(sources.read(partition, "E", {"t": "Evt/hits/hits.t"}, {"fit0": "Evt/trks/trks.fitinf[0]"}, 100))


def _zlib_tree(path, n_events=2000):
    """A ZLIB-compressed tree of random jagged hits, large enough for several baskets."""
    import uproot

    rng = np.random.default_rng(7)
    x = ak.unflatten(rng.normal(size=n_events * 5), np.full(n_events, 5))
    with uproot.recreate(path, compression=uproot.ZLIB(1)) as f:
        f.mktree("t", {"x": x.type, "n": np.int32})
        f["t"].extend({"x": x, "n": np.arange(n_events, dtype=np.int32)})
    return path


def test_reads_inflate_zlib_baskets_with_isal_to_the_same_values_and_give_zlib_back(tmp_path, monkeypatch):
    import uproot

    pytest.importorskip("isal")
    decompressor = uproot.compression._decompress_ZLIB
    monkeypatch.setattr(decompressor, "library", "zlib")
    path = _zlib_tree(tmp_path / "z.root")
    calls = []
    isal_zlib = uproot.extras.isal().isal_zlib
    original = isal_zlib.decompress
    monkeypatch.setattr(isal_zlib, "decompress", lambda *a, **k: calls.append(1) or original(*a, **k))
    with_isal = _read_all(path)
    assert calls  # the baskets went through ISA-L
    assert decompressor.library == "zlib"  # and the process has Python's zlib again
    assert uproot.ZLIB(1).library == "zlib"  # uproot's writing was never touched
    calls.clear()
    monkeypatch.setattr(sources, "_isal_zlib", None)
    with_zlib = _read_all(path)
    assert not calls
    np.testing.assert_array_equal(with_isal[0], with_zlib[0])
    np.testing.assert_array_equal(with_isal[1], with_zlib[1])


def test_inflating_gives_back_the_library_only_when_the_last_read_ends(monkeypatch):
    import uproot

    pytest.importorskip("isal")
    decompressor = uproot.compression._decompress_ZLIB
    monkeypatch.setattr(decompressor, "library", "zlib")
    with sources.inflating() as outer:
        assert outer == "isal" == decompressor.library
        with sources.inflating() as inner:  # another read, e.g. another worker thread
            assert inner == "isal"
        assert decompressor.library == "isal"
    assert decompressor.library == "zlib"
    decompressor.library = "deflate"  # a user's own choice is kept
    with sources.inflating() as library:
        assert library == "deflate"
    assert decompressor.library == "deflate"
    with pytest.raises(RuntimeError), sources.inflating():
        raise RuntimeError
    assert sources._inflating == 0


def test_inflating_changes_nothing_where_isal_is_missing(monkeypatch):
    import uproot

    decompressor = uproot.compression._decompress_ZLIB
    monkeypatch.setattr(decompressor, "library", "zlib")
    monkeypatch.setattr(sources, "_isal_zlib", None)
    with sources.inflating() as library:
        assert library == "zlib" == decompressor.library
    monkeypatch.setattr(uproot.compression, "_decompress_ZLIB", object())  # an uproot without it
    with sources.inflating() as library:
        assert library == "zlib"
