"""Staged rows are read back exactly, whatever the order, gaps and coalescing of the rows asked
for, and whether they were staged dense or sparse."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hepdask import store

from .data_generation import chunk_files


@pytest.fixture
def staged(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.normal(size=(500, 6, 4)).astype(np.float32)
    entries = np.arange(500, dtype=np.int64) * 10
    writer = store.PartitionWriter(tmp_path, "p0")
    for step in range(0, 500, 120):
        writer.append({"image": images[step : step + 120], "entry": entries[step : step + 120],
                       "energy": entries[step : step + 120] * 0.5, "pair": images[step : step + 120, 0, :2]})
    return tmp_path, writer.close({}), images, entries


@pytest.mark.parametrize("coalesce", [1, 48, store.COALESCE_BYTES, 10**9])
def test_read_rows_returns_the_rows_asked_for_in_their_order(staged, monkeypatch, coalesce):
    staging, record, images, entries = staged
    monkeypatch.setattr(store, "COALESCE_BYTES", coalesce)
    rng = np.random.default_rng(coalesce)
    for rows in (rng.permutation(500)[:37], np.array([499, 0, 250, 251, 1]), np.arange(500)[::-1],
                 np.array([3]), rng.choice(500, 300, replace=False)):
        np.testing.assert_array_equal(store.read_rows(staging, record, "image", rows), images[rows])
        np.testing.assert_array_equal(store.read_rows(staging, record, "entry", rows), entries[rows])
        np.testing.assert_array_equal(store.read_rows(staging, record, "energy", rows), entries[rows] * 0.5)
        np.testing.assert_array_equal(store.read_rows(staging, record, "pair", rows), images[rows, 0, :2])
    assert store.read_rows(staging, record, "image", np.zeros(0, np.int64)).shape == (0, 6, 4)
    assert store.read_rows(staging, record, "pair", np.zeros(0, np.int64)).shape == (0, 2)


def _section_bytes(record, section: str) -> int:
    return sum(block["at"][section][1] for block in record.blocks)


def test_small_per_event_arrays_share_one_table_and_a_partition_one_file(staged):
    staging, record, _, _ = staged
    assert [n for n, spec in record.arrays.items() if spec.table] == ["entry", "energy", "pair"]
    assert not record.arrays["image"].table
    assert sorted(f.name for f in staging.iterdir()) == ["p0" + store.PART_SUFFIX]
    assert [sorted(block["at"]) for block in record.blocks] == [["image.bin", store.TABLE_SECTION]] * 5
    assert _section_bytes(record, store.TABLE_SECTION) == 500 * (8 + 8 + 8)
    assert store.Staged.from_json(record.to_json()).arrays == record.arrays
    assert store.load_staged(staging, "p0").to_json() == record.to_json()


def test_a_killed_writers_temporary_file_is_no_finished_work(tmp_path):
    writer = store.PartitionWriter(tmp_path, "p0")
    writer.append({"entry": np.arange(3)})  # killed before close: only its .tmp-* file is left
    assert not store.has_finished_work(tmp_path)
    store.clean_staging(tmp_path)
    assert list(tmp_path.iterdir()) == []
    writer = store.PartitionWriter(tmp_path, "p0")
    writer.append({"entry": np.arange(3)})
    writer.close({})
    assert store.has_finished_work(tmp_path)


def test_a_partition_file_without_its_record_is_not_staged(staged):
    """A file cut short (a killed task's, a full disk) is not mistaken for a staged partition."""
    staging, _, _, _ = staged
    path = store.staged_file(staging, "p0")
    path.write_bytes(path.read_bytes()[:-3])
    assert store.load_staged(staging, "p0") is None
    path.write_bytes(b"")
    assert store.load_staged(staging, "p0") is None
    assert store.load_staged(staging, "p9") is None


@pytest.fixture
def sparse_staged(tmp_path):
    """Mostly-zero images, as calorimeter images are, with -0.0, NaN, empty and full events."""
    rng = np.random.default_rng(11)
    images = np.where(rng.random((500, 6, 8)) < 0.05, rng.normal(size=(500, 6, 8)), 0).astype(np.float32)
    images[3] = 0.0
    images[4] = 1.0
    images[5, 0, 0], images[5, 1, 1], images[6, 2, 2] = -0.0, np.nan, np.inf
    counts = (images != 0).astype(np.uint8)
    writer = store.PartitionWriter(tmp_path, "p1")
    for step in range(0, 500, 120):
        writer.append({"image": images[step : step + 120], "counts": counts[step : step + 120]})
    return tmp_path, writer.close({}), images, counts


def test_mostly_zero_images_are_staged_sparse_and_read_back_bit_for_bit(sparse_staged, monkeypatch):
    staging, record, images, counts = sparse_staged
    assert record.arrays["image"].sparse and record.arrays["counts"].sparse
    assert store.Staged.from_json(record.to_json()).arrays == record.arrays
    assert all("image.bin" not in block["at"] for block in record.blocks)
    dense_bytes = images.nbytes
    sparse_bytes = sum(_section_bytes(record, f"image{s}") for s in store.SPARSE_SECTIONS)
    assert sparse_bytes < 0.2 * dense_bytes
    rng = np.random.default_rng(3)
    for coalesce in (1, 48, store.COALESCE_BYTES, 10**9):
        monkeypatch.setattr(store, "COALESCE_BYTES", coalesce)
        for rows in (rng.permutation(500)[:37], np.array([499, 0, 3, 4, 5, 6, 250, 251]), np.arange(500)[::-1],
                     np.array([3]), rng.choice(500, 300, replace=False)):
            got = store.read_rows(staging, record, "image", rows)
            assert got.dtype == images.dtype
            assert got.tobytes() == images[rows].tobytes()  # -0.0 and NaN included
            np.testing.assert_array_equal(store.read_rows(staging, record, "counts", rows), counts[rows])
    assert store.read_rows(staging, record, "image", np.zeros(0, np.int64)).shape == (0, 6, 8)


def test_a_write_task_holds_the_sparse_and_table_sections_not_the_dense_ones(staged, sparse_staged):
    """What sizes write tasks (``build.WRITE_TASK_BYTES``): the rows gathered for a whole task."""
    _, dense, _, _ = staged
    _, sparse, images, _ = sparse_staged

    def sections(record, keep) -> int:
        return sum(n for block in record.blocks for section, (_, n) in block["at"].items() if keep(section))

    assert store.gathered_bytes([dense], 3) == 8 + 8 + 8 + 8 * 3  # the table only: entry, energy, pair
    per_event = sections(sparse, lambda name: True) / 500
    assert store.gathered_bytes([sparse], 2) == per_event + 16
    assert per_event < 0.3 * images[0].nbytes
    both = (sections(dense, lambda name: not name.endswith(".bin")) + sections(sparse, lambda name: True)) / 1000
    assert store.gathered_bytes([dense, sparse], 0) == both


@pytest.mark.parametrize("whole", [0, 2**30])
def test_a_one_block_partition_read_whole_or_by_ranges_gives_the_same_rows(tmp_path, monkeypatch, whole):
    """A write task reads a small one-block partition with one call, its table rows along."""
    monkeypatch.setattr(store, "WHOLE_BLOCK_BYTES", whole)
    rng = np.random.default_rng(17)
    images = np.where(rng.random((300, 5, 6)) < 0.05, rng.normal(size=(300, 5, 6)), 0).astype(np.float32)
    images[7] = 0.0
    entries = np.arange(300, dtype=np.int64) * 3
    writer = store.PartitionWriter(tmp_path, "p0")
    writer.append({"image": images, "entry": entries, "energy": entries * 0.5})
    record = writer.close({})
    assert len(record.blocks) == 1 and record.arrays["image"].sparse
    for rows in (rng.choice(300, 40, replace=False), np.array([7, 299, 0, 7 + 1]), np.arange(300)[::-1]):
        counts, positions, values, table = store._sparse_rows(tmp_path, record, "image", rows, with_table=True)
        np.testing.assert_array_equal(table["entry"], entries[rows])
        np.testing.assert_array_equal(table["energy"], entries[rows] * 0.5)
        dense = store.densify(counts, positions, values, record.arrays["image"]).reshape(rows.size, 5, 6)
        assert dense.tobytes() == images[rows].tobytes()
        assert store._sparse_rows(tmp_path, record, "image", rows, with_table=False)[3] is None


def test_dense_images_stay_dense(staged):
    _, record, _, _ = staged
    assert not record.arrays["image"].sparse and not record.arrays["entry"].sparse


def _cut_at(record, section: str, keep: int) -> int:
    """Where to cut a staged file so that *section* keeps *keep* bytes of its last block."""
    return record.blocks[-1]["at"][section][0] + keep


def test_read_rows_names_a_truncated_sparse_staged_file(sparse_staged):
    staging, record, _, _ = sparse_staged
    path = store.staged_file(staging, "p1")
    whole = path.read_bytes()
    path.write_bytes(whole[: _cut_at(record, "image.val", 10)])
    with pytest.raises(store.StoreError, match=r"p1\.part is truncated: section 'image\.val'"):
        store.read_rows(staging, record, "image", np.array([5, 499]))
    path.write_bytes(whole[: _cut_at(record, "counts.nnz", 40)])
    with pytest.raises(store.StoreError, match=r"p1\.part is truncated: section 'counts\.nnz', 40 of 80 bytes"):
        store.read_rows(staging, record, "counts", np.array([5]))


@pytest.mark.parametrize(("name", "section"), [("image", "image.bin"), ("energy", store.TABLE_SECTION)])
def test_read_rows_names_a_truncated_staged_file(staged, name, section):
    staging, record, _, _ = staged
    path = store.staged_file(staging, "p0")
    path.write_bytes(path.read_bytes()[: _cut_at(record, section, 100)])
    with pytest.raises(store.StoreError, match=rf"p0\.part is truncated: section '{section.replace('.', '[.]')}'"):
        store.read_rows(staging, record, name, np.array([5, 499]))


def test_spans_keep_whole_ranges_within_the_budget():
    ranges = [(0, 10), (10, 20), (20, 30), (30, 35)]
    assert store._spans(ranges, 20) == [[(0, 10), (10, 20)], [(20, 30), (30, 35)]]
    assert store._spans(ranges, 5) == [[r] for r in ranges]
    assert store._spans(ranges, 100) == [ranges]


def test_a_write_task_gathers_sparse_and_small_rows_of_many_partitions_in_task_order(tmp_path):
    rng = np.random.default_rng(9)
    staged, images, entries = {}, {}, {}
    for p in range(3):
        images[p] = np.where(rng.random((40, 5, 6)) < 0.1, rng.normal(size=(40, 5, 6)), 0).astype(np.float32)
        entries[p] = np.arange(40, dtype=np.int64) + 100 * p
        writer = store.PartitionWriter(tmp_path, f"p{p}")
        writer.append({"image": images[p], "entry": entries[p]})
        staged[p] = writer.close({})
        assert staged[p].arrays["image"].sparse
    part = rng.integers(0, 3, 70)  # the task's events, shuffled over the partitions
    row = np.empty(70, np.int64)
    for p in range(3):
        where = np.flatnonzero(part == p)
        row[where] = rng.permutation(40)[: where.size]
    order = np.argsort(part, kind="stable")
    groups = [(int(part[w[0]]), w) for w in np.split(order, np.flatnonzero(np.diff(part[order])) + 1)]
    expected_images = np.stack([images[p][r] for p, r in zip(part, row)])
    expected_entries = np.array([entries[p][r] for p, r in zip(part, row)])

    class Target:  # what _gather_task looks at of a Zarr array
        def __init__(self, dtype, shape):
            self.dtype, self.shape = np.dtype(dtype), (70, *shape)

    sparse = store._gather_task("image", Target("float32", (5, 6)), groups, row, staged, {}, tmp_path, 70)
    small = store._gather_task("entry", Target("int64", ()), groups, row, staged, {}, tmp_path, 70)
    labels = {p: {"label": p + 4} for p in range(3)}
    constant = store._gather_task("label", Target("int32", ()), groups, row, staged, labels, tmp_path, 70)
    for a, b in ((0, 70), (0, 1), (13, 52), (69, 70)):
        assert sparse.rows(a, b).tobytes() == expected_images[a:b].tobytes()
        np.testing.assert_array_equal(small.rows(a, b), expected_entries[a:b])
        np.testing.assert_array_equal(constant.rows(a, b), part[a:b] + 4)


def test_a_write_task_reads_each_table_file_once_for_all_its_columns(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    staged, entries = {}, {}
    for p in range(3):
        entries[p] = np.arange(30, dtype=np.int64) + 100 * p
        writer = store.PartitionWriter(tmp_path, f"p{p}")
        writer.append({"entry": entries[p], "energy": entries[p] * 0.5, "pair": np.stack([entries[p]] * 2, 1)})
        staged[p] = writer.close({})
        assert all(spec.table for spec in staged[p].arrays.values())
    part = rng.integers(0, 3, 50)
    row = rng.integers(0, 30, 50)
    order = np.argsort(part, kind="stable")
    groups = [(int(part[w[0]]), w) for w in np.split(order, np.flatnonzero(np.diff(part[order])) + 1)]
    reads = []
    read_ranges = store._Part.read_ranges
    monkeypatch.setattr(store._Part, "read_ranges",
                        lambda part, section, *a: reads.append((part.path, section)) or read_ranges(part, section, *a))

    class Target:  # what _gather_task looks at of a Zarr array
        def __init__(self, dtype, shape):
            self.dtype, self.shape = np.dtype(dtype), (50, *shape)

    tables = {}
    got = {name: store._gather_task(name, Target(dtype, shape), groups, row, staged, {}, tmp_path, 50, tables)
           for name, dtype, shape in (("entry", "int64", ()), ("energy", "float64", ()), ("pair", "int64", (2,)))}
    expected = np.array([entries[p][r] for p, r in zip(part, row)])
    np.testing.assert_array_equal(got["entry"].rows(0, 50), expected)
    np.testing.assert_array_equal(got["energy"].rows(0, 50), expected * 0.5)
    np.testing.assert_array_equal(got["pair"].rows(0, 50), np.stack([expected] * 2, 1))
    assert sorted(reads) == sorted((str(store.staged_file(tmp_path, f"p{p}")), store.TABLE_SECTION)
                                   for p in set(part.tolist()))


def test_small_per_event_arrays_get_whole_multiples_of_the_image_chunks(tmp_path):
    """Labels and other small per-event arrays are chunked EVENT_ARRAY_CHUNKS times coarser
    than the images, and stay a multiple of them in small splits; a write task that owns
    whole chunks of both writes them, any other region is refused."""
    arrays = {"image": store.ArraySpec("float32", (4, 4)), "label": store.ArraySpec("int32"),
              "sample": store.ArraySpec("str"), "wide": store.ArraySpec("float64", (16,)),
              "flags": store.ArraySpec("float32", (4,))}
    per_array = store.array_chunk_events(arrays, ["image"], 10)
    k = store.EVENT_ARRAY_CHUNKS
    assert per_array == {"image": 10, "label": 10 * k, "sample": 10 * k, "wide": 10, "flags": 10 * k}
    sizes = {"train": 25 * k, "val": 25, "test": 7}
    dims = {"image": ("y", "x"), "label": (), "sample": (), "wide": ("w",), "flags": ("f",)}
    path = tmp_path / "s.zarr"
    store.prepare(path, sizes, arrays, dims, [], chunk_events=per_array, compressor=("zstd", 1), attrs={})
    root = zarr.open_group(str(path))
    chunks = {split: {name: root[split][name].chunks[0] for name in arrays} for split in sizes}
    assert chunks["train"] == {"image": 10, "label": 10 * k, "sample": 10 * k, "wide": 10, "flags": 10 * k}
    assert chunks["val"] == {"image": 10, "label": 30, "sample": 30, "wide": 10, "flags": 30}
    assert chunks["test"] == dict.fromkeys(arrays, 7)

    n = sizes["train"]
    rng = np.random.default_rng(5)
    images = rng.random((n, 4, 4)).astype(np.float32)
    wide = rng.random((n, 16))
    flags = np.where(rng.random((n, 4)) < 0.05, 1.0, 0.0).astype(np.float32)  # small, but staged sparse
    writer = store.PartitionWriter(tmp_path / "staging", "p0")
    writer.append({"image": images, "label": np.arange(n, dtype=np.int32), "wide": wide, "flags": flags})
    staged = writer.close({})
    assert staged.arrays["flags"].sparse
    sources = store.Sources({0: staged.slim()}, {0: {"sample": "s0"}})
    ranges = store.chunk_ranges(n, 10)
    task = 2 * k  # image chunks a task owns: two chunks of the labels
    for first in range(0, len(ranges), task):
        own = ranges[first : first + task]
        rows = np.arange(own[0][0], own[-1][1])
        store.write_chunks(path, "train", own, np.zeros(rows.size, np.int64), rows, sources, tmp_path / "staging")
    train = root["train"]
    np.testing.assert_array_equal(train["image"][:], images)
    np.testing.assert_array_equal(train["label"][:], np.arange(n))
    np.testing.assert_array_equal(train["wide"][:], wide)
    np.testing.assert_array_equal(train["flags"][:], flags)
    assert set(train["sample"][:].tolist()) == {"s0"}
    assert store._missing_chunks(path, train["label"]) == []
    with pytest.raises(store.StoreError, match=r"train/flags: region \[10, 20\) is not aligned to chunks of 80"):
        store.write_chunks(path, "train", ranges[1:2], np.zeros(10, np.int64), np.arange(10, 20), sources,
                           tmp_path / "staging")


def test_a_coordinate_equal_to_the_fill_value_is_written(tmp_path):
    """zarr skips chunks equal to the fill value by default; verify would call them missing."""
    coords = [store.Coordinate("x", np.zeros(1)), store.Coordinate("y", np.array([-0.5, 0.5]))]
    store.prepare(tmp_path / "s.zarr", {"train": 3}, {"label": store.ArraySpec("int32")}, {"label": ()}, coords,
                  chunk_events=2, compressor=("zstd", 1), attrs={})
    assert (tmp_path / "s.zarr" / "train" / "x" / "c.0").is_file()
    # Chunks sit beside their array's metadata (``CHUNK_KEY_ENCODING``): no directory a chunk.
    zarr.open_group(str(tmp_path / "s.zarr"))["train"]["label"][:] = [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "train" / "label").iterdir()) == ["c.0", "c.1", "zarr.json"]
    assert store._missing_chunks(tmp_path / "s.zarr", zarr.open_group(str(tmp_path / "s.zarr"))["train"]["x"]) == []


@pytest.mark.parametrize("compressor", [("zstd", 1), ("zstd", 5), ("none", 0), ("blosc-lz4", 1), ("blosc-lz4", 5)])
def test_chunk_files_are_the_bytes_zarr_writes(tmp_path, compressor):
    """Chunks written as files (``ChunkFiles``) equal zarr's own, the edge chunk's fill
    included, and read back through zarr and through ``ChunkFiles.read``."""
    n, chunk = 3 * 40 + 7, 40
    rng = np.random.default_rng(3)
    values = {
        "image": rng.poisson(0.3, (n, 5, 6)).astype(np.float32),
        "counts": rng.poisson(0.3, (n, 5, 7)).astype(np.uint8),  # one-byte values: blosc's typesize 2
        "label": rng.integers(0, 3, n).astype(np.int32),
        "truth": rng.normal(size=n),
        "source_file": np.array([f"/data/run_{i // 50:03d}.root" for i in range(n)], dtype=object),
    }
    stores = {}
    for how in ("zarr", "files"):
        group = zarr.open_group(tmp_path / f"{how}.zarr", mode="w", zarr_format=3).create_group("train")
        for name, v in values.items():
            dtype = str if v.dtype == object else v.dtype
            spelled = "str" if dtype is str else v.dtype.str  # as a build's ArraySpec spells it
            array = group.create_array(name, shape=v.shape, chunks=(chunk, *v.shape[1:]), dtype=dtype,
                                       compressors=store.compressors(*compressor, spelled), fill_value=store._fill(spelled))
            array = array.with_config({"write_empty_chunks": True})
            if how == "zarr":
                array[:] = v
            else:
                files = store.ChunkFiles.of(array)
                assert files is not None
                for start in range(0, n, chunk):
                    files.write(start // chunk, v[start : start + chunk])
                np.testing.assert_array_equal(files.read(3)[: n - 3 * chunk], v[3 * chunk :])
        stores[how] = tmp_path / f"{how}.zarr"
    written = [p.relative_to(stores["zarr"]) for p in chunk_files(stores["zarr"])]
    assert len(written) == 4 * len(values)
    for relative in written:
        assert (stores["files"] / relative).read_bytes() == (stores["zarr"] / relative).read_bytes(), relative
    group = zarr.open_group(stores["files"], mode="r")["train"]
    for name, v in values.items():
        np.testing.assert_array_equal(group[name][:], v.astype(str) if v.dtype == object else v)


def test_other_layouts_are_left_to_zarr(tmp_path):
    from zarr.codecs import BloscCodec, BytesCodec, GzipCodec

    group = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    gzip = group.create_array("gzip", shape=(10,), chunks=(5,), dtype="int32", compressors=GzipCodec())
    zstd_lz4 = group.create_array("two", shape=(10,), chunks=(5,), dtype="int32",
                                  compressors=[store.compressors("zstd", 1), BloscCodec(cname="lz4")])
    big = group.create_array("big", shape=(10,), chunks=(5,), dtype="int32", compressors=None,
                             serializer=BytesCodec(endian="big"))
    assert store.ChunkFiles.of(gzip) is None
    assert store.ChunkFiles.of(zstd_lz4) is None
    assert store.ChunkFiles.of(big) is None


def _count_images(n: int, *, noisy: bool, seed: int = 5) -> np.ndarray:
    """uint8 count images (64 x 64): hits at random all over (noisy, 14 % of the pixels),
    or a few percent clustered around one centre an event (a shower)."""
    rng = np.random.default_rng(seed)
    if noisy:
        return rng.binomial(1, 0.14, (n, 64, 64)).astype(np.uint8)
    images = np.zeros((n, 64, 64), np.uint8)
    for image in images:
        xy = np.clip(np.round(rng.normal(rng.integers(16, 48, 2), 6, (150, 2))).astype(int), 0, 63)
        np.add.at(image, (xy[:, 0], xy[:, 1]), 1)
    return images


def test_auto_takes_blosc_for_one_byte_images_only_where_a_trial_finds_it_nearly_as_small(tmp_path):
    from zarr.codecs import BloscCodec, ZstdCodec

    from hepdask.config import Compressor

    assert Compressor().name == "auto"
    noisy, clustered = _count_images(256, noisy=True), _count_images(256, noisy=False)
    assert store.compressor_name("auto", "uint8", noisy) == "blosc-lz4"
    assert store.compressor_name("auto", "uint8", clustered) == "zstd"
    assert store.compressor_name("auto", "uint8") == "zstd"  # nothing to try: the safe choice
    assert store.compressor_name("auto", "float32", noisy.astype(np.float32)) == "zstd"
    assert store.compressor_name("blosc-lz4", "uint8", clustered) == "blosc-lz4"  # named: kept

    arrays = {"counts": store.ArraySpec("uint8", (64, 64)), "showers": store.ArraySpec("uint8", (64, 64)),
              "energy": store.ArraySpec("float32", (64, 64)), "label": store.ArraySpec("int32"),
              "flag": store.ArraySpec("bool"), "sample": store.ArraySpec("str")}
    dims = {"counts": ("y", "x"), "showers": ("y", "x"), "energy": ("y", "x"), "label": (), "flag": (), "sample": ()}
    resolved = store.resolve_compressors("auto", 1, {"counts": ("uint8", noisy), "showers": ("uint8", clustered)})
    assert resolved == {"counts": "blosc-lz4", "showers": "zstd"}
    store.prepare(tmp_path / "s.zarr", {"train": 10}, arrays, dims, [], chunk_events=5, compressor=("auto", 1),
                  attrs={}, resolved=resolved)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")["train"]
    kinds = {name: type(group[name].metadata.codecs[-1]) for name in arrays}
    assert kinds == {"counts": BloscCodec, "showers": ZstdCodec, "energy": ZstdCodec, "label": ZstdCodec,
                     "flag": ZstdCodec, "sample": ZstdCodec}
    assert all(store.ChunkFiles.of(group[name]) is not None for name in arrays)
    assert store.compressor_label(group["counts"]) == "blosc-lz4-1"
    assert store.compressor_label(group["energy"]) == "zstd-1"
    plain = zarr.open_group(tmp_path / "p.zarr", mode="w", zarr_format=3).create_array(
        "x", shape=(4,), chunks=(2,), dtype="int32", compressors=store.compressors("none", 0))
    assert store.compressor_label(plain) == "none"


def test_blosc_shuffles_one_byte_values_in_pairs(tmp_path):
    """Blosc's bit-unshuffle of one-byte elements is a scalar loop; pairs take its SSE2 path.
    Other arrays shuffle by their item size."""
    group = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    expected = {"uint8": store.BLOSC_BYTE_TYPESIZE, "bool": store.BLOSC_BYTE_TYPESIZE, "float32": 4, "int64": 8}
    for dtype, typesize in expected.items():
        array = group.create_array(dtype, shape=(10,), chunks=(5,), dtype=dtype,
                                   compressors=store.compressors("blosc-lz4", 1, dtype))
        assert array.metadata.codecs[-1].typesize == typesize, dtype


def _assigned(plans) -> dict[str, list[tuple[int, int]]]:
    return {name: list(zip(plan.part.tolist(), plan.row.tolist())) for name, plan in plans.items()}


def test_assign_draws_its_split_and_order_from_the_seed():
    counts, split = [30, 50, 20], {"train": 0.7, "val": 0.3}
    one = _assigned(store.assign(counts, split, seed=1, shuffle=True))
    assert _assigned(store.assign(counts, split, seed=1, shuffle=True)) == one
    assert _assigned(store.assign(counts, split, seed=2, shuffle=True)) != one
    every = sorted(one["train"] + one["val"])
    assert every == [(p, r) for p, n in enumerate(counts) for r in range(n)]  # each event once
    assert [len(one["train"]), len(one["val"])] == [70, 30]
    # Unshuffled, the seed still decides which events go to which split; each stays in source order.
    kept = {seed: _assigned(store.assign(counts, split, seed=seed, shuffle=False)) for seed in (1, 2)}
    assert kept[1]["val"] != kept[2]["val"]
    assert all(pairs == sorted(pairs) for plans in kept.values() for pairs in plans.values())


def test_chunk_ranges_end_with_the_partial_last_chunk():
    assert store.chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert store.chunk_ranges(8, 4) == [(0, 4), (4, 8)]
    assert store.chunk_ranges(3, 4) == [(0, 3)]
    assert store.chunk_ranges(0, 4) == []


def test_verify_reports_a_missing_partial_last_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    store.prepare(path, {"train": 5}, {"label": store.ArraySpec("int32")}, {"label": ()}, [],
                  chunk_events=2, compressor=("zstd", 1), attrs={store.PREFIX + "splits": ["train"]})
    zarr.open_group(str(path))["train"]["label"][:] = np.arange(1, 6, dtype=np.int32)
    store.finalize(path, {})
    assert store.verify(path) == []
    (path / "train" / "label" / "c.2").unlink()  # events [4, 5): the partial last chunk
    assert store.verify(path) == ["train/label: 1 chunk(s) missing, e.g. train/label/c.2"]


def test_finalize_writes_the_root_metadata_once_for_all_attributes(tmp_path, monkeypatch):
    """``attrs.update`` rewrote the root's zarr.json once per attribute (11 in a build)."""
    from zarr.storage import LocalStore

    path = tmp_path / "s.zarr"
    store.prepare(path, {"train": 3}, {"label": store.ArraySpec("int32")}, {"label": ()}, [],
                  chunk_events=2, compressor=("zstd", 1), attrs={})
    writes = []
    original = LocalStore.set

    async def counted(self, key, value):
        writes.append(key)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", counted)
    attrs = {f"{store.PREFIX}a{i}": i for i in range(10)}
    store.finalize(path, attrs)
    # The attributes, the consolidated metadata, the completion marker.
    assert writes.count("zarr.json") == 3
    root = zarr.open_group(str(path), mode="r")
    assert {k: root.attrs[k] for k in attrs} == attrs and root.attrs[store.COMPLETE] is True


def test_a_store_of_zarrs_default_chunk_layout_is_still_written_read_and_verified(tmp_path, monkeypatch):
    """Stores made before ``CHUNK_KEY_ENCODING`` nest chunks as ``c/<i>/0/0``: hepdask's
    chunk files (the reader's and the write tasks') follow each array's own encoding."""
    monkeypatch.setattr(store, "CHUNK_KEY_ENCODING", {"name": "default", "separator": "/"})
    path = tmp_path / "old.zarr"
    store.prepare(path, {"train": 5}, {"image": store.ArraySpec("float32", (2, 3))}, {"image": ("a", "b")}, [],
                  chunk_events=2, compressor=("zstd", 1), attrs={store.PREFIX + "splits": ["train"]})
    array = zarr.open_group(str(path))["train"]["image"]
    files = store.ChunkFiles.of(array)
    values = np.arange(5 * 6, dtype=np.float32).reshape(5, 2, 3)
    for i in range(3):
        files.write(i, values[2 * i : 2 * i + 2])
    assert (path / "train" / "image" / "c" / "2" / "0" / "0").is_file()
    np.testing.assert_array_equal(array[:], values)
    np.testing.assert_array_equal(files.read(1), values[2:4])
    store.finalize(path, {})
    assert store.verify(path) == []
    (path / "train" / "image" / "c" / "1" / "0" / "0").unlink()
    assert store.verify(path) == ["train/image: 1 chunk(s) missing, e.g. train/image/c/1/0/0"]


def test_first_rows_reads_the_first_events_in_plan_order_across_partitions(tmp_path):
    staging = tmp_path / "staging"
    rng = np.random.default_rng(2)
    images = {"a": rng.binomial(1, 0.05, (5, 4, 4)).astype(np.uint8), "b": np.zeros((0, 4, 4), np.uint8),
              "c": rng.binomial(1, 0.5, (7, 4, 4)).astype(np.uint8)}
    staged = []
    for key, array in images.items():
        writer = store.PartitionWriter(staging, key)
        if len(array):
            writer.append({"image": array, "entry": np.arange(len(array))})
        staged.append(writer.close({}))
    staged.insert(1, store.Staged("bad", 0, {}))  # a bad file's record
    np.testing.assert_array_equal(store.first_rows(staging, staged, "image", 3), images["a"][:3])
    np.testing.assert_array_equal(store.first_rows(staging, staged, "image", 8),
                                  np.concatenate([images["a"], images["c"][:3]]))
    np.testing.assert_array_equal(store.first_rows(staging, staged, "image", 100),
                                  np.concatenate([images["a"], images["c"]]))
    assert store.first_rows(staging, staged, "other", 3) is None
    assert store.first_rows(staging, staged[1:2], "image", 3) is None


def test_the_plan_digest_names_the_compressors_decided_from_the_data():
    staged = [store.Staged("p0", 10, {}, {"size": 1, "mtime": 2})]
    plain = store.plan_digest("h", staged)
    assert store.plan_digest("h", staged, {}) == plain  # no trial: the digest of earlier versions
    assert store.plan_digest("h", staged, {"image": "zstd"}) != plain
    assert store.plan_digest("h", staged, {"image": "zstd"}) != store.plan_digest("h", staged, {"image": "blosc-lz4"})


def test_compressor_setting_reads_back_what_prepare_was_given(tmp_path):
    from zarr.codecs import GzipCodec

    for setting in (("zstd", 3), ("blosc-lz4", 5), ("none", 0)):
        path = tmp_path / f"{setting[0]}.zarr"
        store.prepare(path, {"train": 4}, {"image": store.ArraySpec("uint8", (2,))}, {"image": ("x",)}, [],
                      chunk_events=2, compressor=setting, attrs={})
        assert store.compressor_setting(zarr.open_group(str(path), mode="r")["train"]["image"]) == setting
    gzip = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3).create_array(
        "x", shape=(4,), chunks=(2,), dtype="int32", compressors=GzipCodec())
    with pytest.raises(store.StoreError, match="not a compressor hepdask writes"):
        store.compressor_setting(gzip)
