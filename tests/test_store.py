"""Staged rows are read back exactly, whatever the order, gaps and coalescing of the rows asked for."""

from __future__ import annotations

import numpy as np
import pytest

from hepdask import store


@pytest.fixture
def staged(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.normal(size=(500, 3, 4)).astype(np.float32)
    entries = np.arange(500, dtype=np.int64) * 10
    writer = store.PartitionWriter(tmp_path, "p0")
    for step in range(0, 500, 120):
        writer.append({"image": images[step : step + 120], "entry": entries[step : step + 120]})
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
    assert store.read_rows(staging, record, "image", np.zeros(0, np.int64)).shape == (0, 3, 4)


def test_read_rows_names_a_truncated_staged_file(staged):
    staging, record, _, _ = staged
    path = staging / "p0" / "image.bin"
    path.write_bytes(path.read_bytes()[: 100 * record.arrays["image"].itemsize])
    with pytest.raises(store.StoreError, match=r"p0/image\.bin is truncated"):
        store.read_rows(staging, record, "image", np.array([5, 400]))


def test_spans_keep_whole_ranges_within_the_budget():
    ranges = [(0, 10), (10, 20), (20, 30), (30, 35)]
    assert store._spans(ranges, 20) == [[(0, 10), (10, 20)], [(20, 30), (30, 35)]]
    assert store._spans(ranges, 5) == [[r] for r in ranges]
    assert store._spans(ranges, 100) == [ranges]
