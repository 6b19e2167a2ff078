"""Derived columns: small, safe expressions over the columns of an input chunk.

    like      = "rating >= 4"
    ctcvr     = "click * buy"
    married   = "marital_status == 'Never married'"
    spend     = "where(is_null(price), 0, price * quantity)"

Parsed with Python's ``ast`` (never evaluated as Python): column names, numbers, quoted strings,
``+ - * / **``, comparisons (chains too), ``and or not``, ``where(condition, a, b)``, ``abs``,
``log1p`` and ``is_null``. Evaluated column-wise with ``pyarrow.compute`` on a whole chunk.
Booleans become 0/1 (float64), so a comparison is a binary label as it stands.
"""

from __future__ import annotations

import ast
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from towerrec.data.errors import DataError

_BINARY = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide", ast.Pow: "power"}
_COMPARE = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal",
            ast.Gt: "greater", ast.GtE: "greater_equal"}  # fmt: skip
_FUNCTIONS = {"abs": 1, "log1p": 1, "is_null": 1, "where": 3}


class Expression:
    """A compiled expression: ``columns`` it reads; ``evaluate(table)`` → float64 array."""

    def __init__(self, name: str, text: str):
        self.name, self.text = name, text
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as err:
            raise DataError(f"data.prepare.derive.{name}: {text!r} is not an expression ({err.msg})") from err
        self.columns: list[str] = []
        self._evaluate = self._compile(tree.body)

    def _fail(self, node: ast.AST, what: str) -> DataError:
        return DataError(f"data.prepare.derive.{self.name}: {what} in {self.text!r} is not allowed")

    def _compile(self, node: ast.AST) -> Callable[[pa.Table], pa.Array | pa.Scalar]:
        if isinstance(node, ast.Name):
            if node.id not in self.columns:
                self.columns.append(node.id)
            return lambda table, name=node.id: _column(table, name, self)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float, str))
            and not isinstance(node.value, bool)
        ):
            return lambda table, value=node.value: pa.scalar(value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right, fn = self._compile(node.left), self._compile(node.right), _BINARY[type(node.op)]
            return lambda t: getattr(pc, fn)(_number(left(t)), _number(right(t)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            operand = self._compile(node.operand)
            return lambda t: pc.negate(_number(operand(t)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            operand = self._compile(node.operand)
            return lambda t: pc.invert(_boolean(operand(t)))
        if isinstance(node, ast.BoolOp):
            parts = [self._compile(v) for v in node.values]
            fn = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene

            def combine(t):
                result = _boolean(parts[0](t))
                for part in parts[1:]:
                    result = fn(result, _boolean(part(t)))
                return result

            return combine
        if isinstance(node, ast.Compare):
            terms = [self._compile(node.left), *(self._compile(c) for c in node.comparators)]
            ops = []
            for op in node.ops:
                if type(op) not in _COMPARE:
                    raise self._fail(node, f"the comparison {type(op).__name__}")
                ops.append(_COMPARE[type(op)])

            def compare(t):
                values = [term(t) for term in terms]
                result = None
                for fn, a, b in zip(ops, values, values[1:]):
                    part = getattr(pc, fn)(*_alike(a, b))
                    result = part if result is None else pc.and_kleene(result, part)
                return result

            return compare
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            if len(node.args) != _FUNCTIONS[node.func.id] or node.keywords:
                raise self._fail(node, f"{node.func.id}() with {len(node.args)} arguments")
            args = [self._compile(a) for a in node.args]
            name = node.func.id
            if name == "abs":
                return lambda t: pc.abs(_number(args[0](t)))
            if name == "log1p":
                return lambda t: pc.ln(pc.add(_number(args[0](t)), 1.0))
            if name == "is_null":
                return lambda t: pc.is_null(args[0](t), nan_is_null=True)
            return lambda t: pc.if_else(_boolean(args[0](t)), *_alike(args[1](t), args[2](t)))
        raise self._fail(node, f"'{ast.unparse(node)}'" if hasattr(ast, "unparse") else type(node).__name__)

    def evaluate(self, table: pa.Table) -> pa.Array:
        """The expression on every row of ``table``, as float64 (booleans 0/1, nulls kept)."""
        try:
            result = self._evaluate(table)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise DataError(
                f"data.prepare.derive.{self.name}: cannot evaluate {self.text!r} ({err})"
            ) from err
        if isinstance(result, pa.Scalar):
            result = pa.array([result.as_py()] * table.num_rows)
        if isinstance(result, pa.ChunkedArray):
            result = result.combine_chunks()
        if pa.types.is_string(result.type) or pa.types.is_large_string(result.type):
            raise DataError(f"data.prepare.derive.{self.name}: {self.text!r} gives strings, expected numbers")
        return result.cast(pa.float64())


def _column(table: pa.Table, name: str, expression: Expression) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(
            f"data.prepare.derive.{expression.name}: no column {name!r} in the input (have: {table.column_names})"
        )
    return table.column(name)


def _is_text(value) -> bool:
    kind = value.type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _number(value):
    """Numbers as float64; strings (CSV cells) parsed as numbers; booleans 0/1."""
    if _is_text(value):
        text = pc.utf8_trim_whitespace(value)
        return pc.cast(pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text), pa.float64())
    return pc.cast(value, pa.float64()) if not pa.types.is_floating(value.type) else value


def _trimmed(value):
    return pc.utf8_trim_whitespace(value) if not isinstance(value, pa.Scalar) else value


def _boolean(value):
    return value if pa.types.is_boolean(value.type) else pc.not_equal(_number(value), 0.0)


def _alike(a, b):
    """Comparable operands: two strings as strings, anything else as float64 numbers."""
    if _is_text(a) and _is_text(b):
        return _trimmed(a), _trimmed(b)
    return _number(a), _number(b)


def compile_all(derive: dict[str, str]) -> list[Expression]:
    return [Expression(name, text) for name, text in derive.items()]
