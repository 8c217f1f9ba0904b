"""Jagged branches are taken apart into per-event counts and flat hits, whatever their layout."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest

from hepdask import sources
from hepdask.errors import BranchError

EVENTS = [[1.5, 2.5], [], [3.5, 4.5, 5.5], [6.5]]


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
