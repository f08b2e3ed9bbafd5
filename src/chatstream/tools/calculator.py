"""``calculate``: arithmetic evaluated by walking the parsed syntax tree, never ``eval``.

The expression is parsed with ``ast.parse(mode="eval")`` and its tree is walked by hand;
nothing is compiled or executed. Only numbers, ``+ - * / // % **``, unary ``+``/``-``,
parentheses and the names in ``FUNCTIONS``/``CONSTANTS`` are allowed. Work is bounded so a
hostile expression cannot eat the CPU or memory: its length (``MAX_CHARS``), its node count
(``MAX_NODES``), the size of every integer met along the way (``MAX_DIGITS``, checked
*before* a power is computed) and of every float (no ``inf``/``nan``).

Results are written back as text: integers in full, floats rounded to 12 significant
digits (so ``0.1 + 0.2`` reads ``0.3`` and float noise never shows), and a float that is a
whole number below 10**15 as an integer (``6 / 3`` reads ``2``).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from chatstream.errors import ToolError
from chatstream.tools.base import ToolContext, tool

__all__ = ["CONSTANTS", "FUNCTIONS", "calculate", "evaluate", "format_number"]

Number = int | float

MAX_CHARS = 500
MAX_NODES = 300
MAX_DIGITS = 1000
# log2(10) * MAX_DIGITS: the bit length an integer of MAX_DIGITS digits reaches.
_MAX_BITS = math.ceil(MAX_DIGITS * math.log2(10))
_SIGNIFICANT = 12

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > 100:
        # round(10, -10**9) would compute 10**(10**9) before answering.
        raise ToolError("round() takes a whole number of digits between -100 and 100")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


# name -> (function, fewest arguments, most arguments; None: any number)
FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int | None]] = {
    "sqrt": (math.sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "min": (lambda *xs: min(xs), 1, None),
    "max": (lambda *xs: max(xs), 1, None),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "exp": (math.exp, 1, 1),
}

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
# What to call a refused construct in the error message.
_REFUSED: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.Compare: "comparisons",
    ast.BoolOp: "and/or",
    ast.IfExp: "if/else",
    ast.Subscript: "indexing",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.ListComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.NamedExpr: "assignment",
    ast.JoinedStr: "strings",
    ast.Starred: "unpacking",
    ast.Await: "await",
}
_BITWISE: dict[type[ast.operator], str] = {
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
}


@tool
async def calculate(ctx: ToolContext, expression: str) -> str:
    """Evaluate an arithmetic expression safely, e.g. "48 * 12 - 7" or "sqrt(2) / 2".

    Args:
        expression: Arithmetic written like Python, e.g. "(3 + 4) * 5" or "2 ** 10". Knows
            + - * / // % ** and parentheses, the constants pi, e and tau, and sqrt, abs,
            round, floor, ceil, min, max, sin, cos, tan (radians), log (natural, or
            log(x, base)), log10, log2 and exp. A percentage is a fraction: 8% of 50 is
            "0.08 * 50".
    """
    ctx.progress(f"Calculating {_shorten(expression)}")
    max_result = ctx.settings.calculate_max_result_chars
    result = format_number(evaluate(expression, max_chars=ctx.settings.calculate_max_chars))
    if len(result) > max_result:
        raise ToolError(f"the result is too long ({len(result)} characters; at most {max_result})")
    return result


def evaluate(expression: str, *, max_chars: int = MAX_CHARS) -> Number:
    """The value of ``expression``; raise ``ToolError`` for anything outside the arithmetic."""
    text = expression.strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > max_chars:
        raise ToolError(f"the expression is too long ({len(text)} characters; at most {max_chars})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # ValueError: a NUL byte; RecursionError/MemoryError: absurd nesting.
        raise ToolError(f"{_shorten(text)!r} is not a valid arithmetic expression") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"the expression is too complex (more than {MAX_NODES} parts)")
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except ValueError as exc:
        # math domain errors: sqrt(-1), log(0)...
        raise ToolError(f"math error: {exc}") from None
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None


def format_number(value: Number) -> str:
    """``value`` as text: integers in full, floats to 12 significant digits without noise."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.{_SIGNIFICANT}g}"
    return "0" if text == "-0" else text


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        # bool is an int subclass; "True + 1" is not arithmetic a user means.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ToolError(f"{value!r} is not a number")
        return _checked(value)
    if isinstance(node, ast.BinOp):
        op = _BINARY.get(type(node.op))
        if op is None:
            symbol = _BITWISE.get(type(node.op), type(node.op).__name__)
            hint = "; use ** for powers" if symbol == "^" else ""
            raise ToolError(f"the operator {symbol} is not supported{hint}")
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked(op(left, right))
    if isinstance(node, ast.UnaryOp):
        unary = _UNARY.get(type(node.op))
        if unary is None:
            raise ToolError("only unary + and - are supported")
        return _checked(unary(_eval(node.operand)))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise ToolError(f"unknown name {node.id!r}; known constants: {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        return _call(node)
    what = _REFUSED.get(type(node), type(node).__name__)
    raise ToolError(f"{what} cannot be used in an arithmetic expression")


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name):
        # Refuse the callee itself (attribute access, a lambda...) when it is refused.
        _eval(node.func)
        raise ToolError(f"only the known functions can be called: {', '.join(FUNCTIONS)}")
    if node.func.id not in FUNCTIONS:
        raise ToolError(f"{node.func.id!r} is not a known function; known: {', '.join(FUNCTIONS)}")
    name = node.func.id
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise ToolError(f"{name}() takes plain arguments only")
    function, fewest, most = FUNCTIONS[name]
    count = len(node.args)
    if count < fewest or (most is not None and count > most):
        expected = f"at least {fewest}" if most is None else f"{fewest} to {most}"
        expected = str(fewest) if fewest == most else expected
        raise ToolError(f"{name}() takes {expected} argument(s), not {count}")
    args = [_eval(a) for a in node.args]
    return _checked(function(*args))


def _check_power(base: Number, exponent: Number) -> None:
    """Refuse an integer power whose result would exceed ``MAX_DIGITS`` before computing it."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        # |base| >= 2**(bit_length - 1), so the result has at least this many bits.
        if (base.bit_length() - 1) * exponent > _MAX_BITS:
            raise ToolError(f"the result is too large (more than {MAX_DIGITS} digits)")


def _checked(value: Any) -> Number:
    """``value`` if it is a real number of bounded size; ``ToolError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        # (-8) ** 0.5 is a complex number.
        raise ToolError("the result is not a real number")
    if isinstance(value, int):
        # Bits, not digits, because they cost nothing to count; the bound is MAX_DIGITS
        # give or take one digit.
        if value.bit_length() > _MAX_BITS:
            raise ToolError(f"the result is too large (more than {MAX_DIGITS} digits)")
    elif math.isinf(value):
        raise ToolError("the result is too large")
    elif math.isnan(value):
        raise ToolError("the result is not a number")
    return value


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
