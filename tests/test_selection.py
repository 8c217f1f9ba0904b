"""Cut expressions: parsed with ast, evaluated on arrays, never with eval."""

from __future__ import annotations

import numpy as np
import pytest

from hepdask.errors import SelectionError
from hepdask.selection import Cut, apply_hit_mask, event_cut, select_events

VALUES = {"E": np.array([0.1, 0.6, 2.0, np.nan]), "x": np.array([-3.0, 0.0, 4.0, 1.0])}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("E > 0.5", [False, True, True, False]),
        ("E > 0.5 and x > 1", [False, False, True, False]),
        ("E < 0.5 or not x < 1", [True, False, True, True]),
        ("-1 < x <= 1", [False, True, False, True]),
        ("abs(x) >= 3", [True, False, True, False]),
        ("sqrt(E * 4) > 2", [False, False, True, False]),
        ("x % 2 == 0", [False, True, True, False]),
        ("(E + 1) / 2 > 0.7", [False, True, True, False]),
    ],
)
def test_cuts_evaluate_on_arrays(text, expected):
    assert Cut(text, VALUES, "t")(VALUES).tolist() == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("log(E) > 0.5", [False, False, True, False]),      # ln(2) = 0.69; log10(2) = 0.30
        ("log(E) < -2", [True, False, False, False]),       # ln(0.1) = -2.30; log10(0.1) = -1
        ("log10(E) > -0.5", [False, True, True, False]),    # log10(0.6) = -0.22; ln(0.6) = -0.51
        ("-1.01 < log10(E) < -0.99", [True, False, False, False]),
        ("exp(x) > 2", [False, False, True, True]),         # e = 2.72; 2 ** 1 = 2
        ("exp(x) < 0.1", [True, False, False, False]),      # exp(-3) = 0.05
    ],
)
def test_log_is_natural_log10_decimal_and_exp_natural(text, expected):
    assert Cut(text, VALUES, "t")(VALUES).tolist() == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("E >", "cannot parse"),
        ("Energy > 1", "unknown field 'Energy'.*did you mean 'E'"),
        ("__import__('os').system('true')", "may be called"),
        ("E.real > 1", "Attribute is not allowed"),
        ("x[0] > 1", "Subscript is not allowed"),
        ("E > 'a'", "only numbers"),
        ("x ** 2 > 1", "Pow is not allowed"),
        ("x in (1, 2)", "In is not allowed"),
        ("1 > 0", "uses no field"),
        ("E", "'E' is a number, not a condition: compare it \\(e.g. 'E != 0'\\)"),
        ("abs(x) + 1", "is a number, not a condition"),
        ("E and x > 1", "'E' is a number, not a condition, in 'E and x > 1'"),
        ("not E", "'E' is a number, not a condition"),
        ("abs(E) or x > 0", "'abs\\(E\\)' is a number, not a condition"),
        ("True", "only numbers"),
        ("-(x > 3) < 0", "'x > 3' is a comparison, not a number"),
        ("(E > 0) - (x > 0) == 0", "'E > 0' is a comparison, not a number"),
        ("sqrt(E > 0) > 0", "is a comparison, not a number"),
        ("-" * 2000 + "E > 0", "nested"),
        ("E" + " + E" * 3000 + " > 0", "nested"),
    ],
)
def test_unsafe_or_wrong_cuts_are_refused(text, message):
    with pytest.raises(SelectionError, match=message):
        Cut(text, VALUES, "selection.hits")


def test_comparisons_of_booleans_and_negated_comparisons_still_work():
    cut = Cut("(E > 0.5) == (x > 1) and not x < 0", VALUES, "selection.hits")
    assert cut(VALUES).tolist() == [False, False, True, True]


def test_a_decimal_constant_is_compared_in_float64_as_binning_compares_edges():
    """float32(0.05) is 0.0500000007: above 0.05, as float64 edges would place it."""
    energy = np.array([0.05, 0.0499999], np.float32)
    assert Cut("E > 0.05", ["E"], "selection.hits")({"E": energy}).tolist() == [True, False]
    assert Cut("E <= 0.05", ["E"], "selection.hits")({"E": energy}).tolist() == [False, True]


def test_an_integer_constant_is_compared_exactly_with_float32_values():
    t = np.array([16777216.0], np.float32)
    assert Cut("t >= 16777217", ["t"], "selection.hits")({"t": t}).tolist() == [False]
    assert Cut("t >= 16777216", ["t"], "selection.hits")({"t": t}).tolist() == [True]
    big = np.array([2**62 + 1], np.int64)
    assert Cut("n == 4611686018427387905", ["n"], "selection.events")({"n": big}).tolist() == [True]


def test_integer_constants_beside_unsigned_fields_keep_numpys_unsigned_arithmetic():
    u = np.array([2**63 + 1, 5], np.uint64)
    cut = Cut("u % 4 == 1 and u > 4", ["u"], "selection.events")
    assert cut({"u": u}).tolist() == [True, True]
    assert Cut("u == 9223372036854775808", ["u"], "selection.events")({"u": u}).tolist() == [False, False]


def test_event_cut_knows_nhits():
    cut = event_cut("nhits >= 2 and eventNumber > 0", ["eventNumber"])
    assert cut({"nhits": np.array([1, 2, 3]), "eventNumber": np.array([5, 0, 5])}).tolist() == [False, False, True]


def test_hit_mask_and_event_selection_keep_offsets_consistent():
    offsets = np.array([0, 2, 2, 5])
    mask = np.array([True, False, True, True, False])
    assert apply_hit_mask(offsets, mask).tolist() == [0, 1, 1, 3]
    new_offsets, hit_mask = select_events(offsets, np.array([True, False, True]))
    assert new_offsets.tolist() == [0, 2, 5]
    assert hit_mask.tolist() == [True, True, True, True, True]
    new_offsets, hit_mask = select_events(offsets, np.array([False, True, True]))
    assert new_offsets.tolist() == [0, 0, 3]
    assert hit_mask.tolist() == [False, False, True, True, True]
