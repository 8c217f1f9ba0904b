"""Event and hit cuts written as small expressions, evaluated on numpy arrays without ``eval``.

An expression is parsed with :mod:`ast` and only this grammar is accepted: field names,
numbers, ``+ - * / %``, comparisons (chains such as ``0 < x < 5`` too), ``and``, ``or``,
``not``, parentheses and the functions ``abs``, ``sqrt``, ``log``, ``log10``, ``exp``.
Anything else (attribute access, subscripts, other calls) is refused when the config loads.

A build applies the hit cut first, then the event cut, where ``nhits`` is the number of
hits of the event that passed the hit cut.

A decimal constant is compared as the float64 nearest to it, as binning compares hits with
edges: a float32 hit ``E = float32(0.05)`` (0.0500000007) passes ``E > 0.05``; an integer
constant exactly (a float32 ``t`` of 16777216 fails ``t >= 16777217``). Arithmetic
applies to numbers, not to the result of a comparison; a cut is a condition (a comparison,
or ``and``/``or``/``not`` of conditions, never of bare numbers) and uses at least one field.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Iterable, Mapping

import numpy as np

from .errors import SelectionError, did_you_mean

_COMPARE = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Mod: operator.mod,
}
_FUNCTIONS = {"abs": np.abs, "sqrt": np.sqrt, "log": np.log, "log10": np.log10, "exp": np.exp}
#: Deepest nesting of an expression: far beyond any real cut, and far from Python's
#: recursion limit (parsing and evaluating recurse once per level).
MAX_DEPTH = 100


class Cut:
    """A parsed cut; ``Cut(text, names, where)`` checks it against the names it may use
    (``names=None``: the grammar only, where the names are known only later)."""

    def __init__(self, text: str, names: Iterable[str] | None, where: str) -> None:
        self.text = text
        self.where = where
        allowed = None if names is None else set(names)
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as err:
            msg = f"{where}: cannot parse {text!r}: {err.msg}"
            raise SelectionError(msg) from None
        except (RecursionError, MemoryError):
            msg = f"{where}: {text[:60]!r}... is nested too deeply to parse"
            raise SelectionError(msg) from None
        self._tree = tree.body
        self.names: set[str] = set()
        boolean = self._check(self._tree, allowed)
        if not self.names:
            msg = f"{where}: {text!r} uses no field: a cut keeps or drops hits or events by their values"
            raise SelectionError(msg)
        if not boolean:
            self._not_a_condition(self._tree)

    def _check(self, node: ast.AST, allowed: set[str] | None, depth: int = 0) -> bool:
        """Check *node*; return whether it gives booleans (a comparison, ``and``/``or``/``not``)."""
        if depth > MAX_DEPTH:
            msg = f"{self.where}: {self.text[:60]!r}... is nested more than {MAX_DEPTH} levels deep"
            raise SelectionError(msg)
        if isinstance(node, ast.Name):
            if allowed is not None and node.id not in allowed:
                msg = (
                    f"{self.where}: unknown field {node.id!r} in {self.text!r}"
                    f"{did_you_mean(node.id, allowed)} (fields: {sorted(allowed)})"
                )
                raise SelectionError(msg)
            self.names.add(node.id)
            return False
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                msg = f"{self.where}: only numbers are allowed as constants in {self.text!r}"
                raise SelectionError(msg)
            return False
        if isinstance(node, ast.BoolOp | ast.Compare | ast.BinOp | ast.UnaryOp):
            ops = (
                [type(node.op)] if isinstance(node, ast.BoolOp | ast.BinOp | ast.UnaryOp)
                else [type(op) for op in node.ops]
            )
            allowed_ops = (*_COMPARE, *_BINARY, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd)
            for op in ops:
                if op not in allowed_ops:
                    msg = f"{self.where}: operator {op.__name__} is not allowed in {self.text!r}"
                    raise SelectionError(msg)
            arithmetic = isinstance(node, ast.BinOp) or (isinstance(node, ast.UnaryOp)
                                                         and isinstance(node.op, ast.USub | ast.UAdd))
            logical = isinstance(node, ast.BoolOp) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.operator | ast.cmpop | ast.boolop | ast.unaryop):
                    continue
                condition = self._check(child, allowed, depth + 1)
                if condition and arithmetic:
                    self._not_a_number(child)
                if logical and not condition:
                    self._not_a_condition(child)
            return not arithmetic
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS or node.keywords:
                msg = f"{self.where}: only {sorted(_FUNCTIONS)} may be called in {self.text!r}"
                raise SelectionError(msg)
            if len(node.args) != 1:
                msg = f"{self.where}: {node.func.id}() takes one argument in {self.text!r}"
                raise SelectionError(msg)
            if self._check(node.args[0], allowed, depth + 1):
                self._not_a_number(node.args[0])
            return False
        msg = f"{self.where}: {type(node).__name__} is not allowed in {self.text!r}"
        raise SelectionError(msg)

    def _not_a_condition(self, node: ast.AST) -> None:
        part = ast.unparse(node)
        where = "" if node is self._tree else f", in {self.text!r}"
        msg = f"{self.where}: {part!r} is a number, not a condition{where}: compare it (e.g. '{part} != 0')"
        raise SelectionError(msg)

    def _not_a_number(self, node: ast.AST) -> None:
        msg = (f"{self.where}: {ast.unparse(node)!r} is a comparison, not a number: no arithmetic on it "
               f"in {self.text!r}")
        raise SelectionError(msg)

    def __call__(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluate to a boolean mask over the arrays in *values*."""
        with np.errstate(invalid="ignore", divide="ignore"):
            result = self._eval(self._tree, values)
        return np.asarray(result, dtype=bool)

    def _eval(self, node: ast.AST, values: Mapping[str, np.ndarray]):
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.Constant):
            # numpy scalars are not "weak" (NEP 50): a float32 field is compared in float64
            # with a float constant and with an integer one (int64 and float32 promote to it).
            if isinstance(node.value, float):
                return np.float64(node.value)
            return np.int64(node.value) if -(2**63) <= node.value < 2**63 else float(node.value)
        if isinstance(node, ast.BoolOp):
            parts = [np.asarray(self._eval(v, values), dtype=bool) for v in node.values]
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = parts[0]
            for part in parts[1:]:
                out = combine(out, part)
            return out
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, values)
            if isinstance(node.op, ast.Not):
                return np.logical_not(operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, values), self._eval(node.right, values)
            return _BINARY[type(node.op)](*_beside_unsigned(node.left, left, node.right, right))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, values)
            left_node = node.left
            out = None
            for op, right_node in zip(node.ops, node.comparators):
                right = self._eval(right_node, values)
                part = _COMPARE[type(op)](*_beside_unsigned(left_node, left, right_node, right))
                out = part if out is None else np.logical_and(out, part)
                left, left_node = right, right_node
            return out
        if isinstance(node, ast.Call):
            return _FUNCTIONS[node.func.id](self._eval(node.args[0], values))
        msg = f"{self.where}: cannot evaluate {ast.dump(node)}"
        raise SelectionError(msg)

    def __repr__(self) -> str:
        return f"Cut({self.text!r})"


def _beside_unsigned(left_node: ast.AST, left, right_node: ast.AST, right) -> tuple:
    """The operands of a binary operation; an integer constant beside an unsigned integer
    array is given as a Python int, which numpy applies in the array's own dtype (an int64
    constant would turn uint64 values into float64)."""
    def plain(node, value, other):
        unsigned = getattr(getattr(other, "dtype", None), "kind", "") == "u"
        if unsigned and isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        return value

    return plain(left_node, left, right), plain(right_node, right, left)


def hit_cut(text: str | None, hit_fields: Iterable[str]) -> Cut | None:
    return None if not text else Cut(text, hit_fields, "selection.hits")


def event_cut(text: str | None, event_fields: Iterable[str]) -> Cut | None:
    return None if not text else Cut(text, [*event_fields, "nhits"], "selection.events")


def apply_hit_mask(offsets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """New offsets after dropping the hits where *mask* is False."""
    kept = np.zeros(mask.size + 1, np.int64)
    np.cumsum(mask, out=kept[1:])
    return kept[offsets]


def select_events(offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and a hit mask that keep only the events where *keep* is True."""
    counts = np.diff(offsets)
    hit_mask = np.repeat(keep, counts)
    new_offsets = np.zeros(int(keep.sum()) + 1, np.int64)
    np.cumsum(counts[keep], out=new_offsets[1:])
    return new_offsets, hit_mask
