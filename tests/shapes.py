"""The shape of a JSON value, for comparing two servers' answers without their values: an object's field names
with the shapes of their values, an array by the shape its elements share, a scalar by its JSON type. Two
answers with the same shape differ only in values (ids, times, token counts, messages), which the parity test
does not compare.

Pure functions only (the table tests are in test_shapes.py): `shape(value)`, and `differences(expected,
actual)`, the list of places where two shapes differ, written as `missing $.a.b`, `extra $.a.c` and
`type $.a: number != string` (expected first), `$.items[]` standing for every element of an array.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

# A shape: a JSON type name ("string", "number", "boolean", "null"), an object's {field: shape}, an array's
# ("array", element shape or None when empty), or ("any of", shapes...) when an array's elements differ.
Shape: TypeAlias = "str | Mapping[str, Shape] | tuple[Any, ...]"

EMPTY_ARRAY: Shape = ("array", None)


def shape(value: Any) -> Shape:
    """The shape of a decoded JSON value (booleans are not numbers, ints and floats are both numbers)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return {str(key): shape(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        element: Shape | None = None
        for item in value:
            element = shape(item) if element is None else merge(element, shape(item))
        return ("array", element)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def merge(a: Shape, b: Shape) -> Shape:
    """One shape for two elements of an array: objects keep every field either has (so that a listing whose
    loaded entries carry more fields than the others still compares field by field), arrays merge their
    elements, and anything else that differs becomes ("any of", ...)."""
    if a == b:
        return a
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return {key: merge(a[key], b[key]) if key in a and key in b else a.get(key, b.get(key))
                for key in {**a, **b}}
    if _is_array(a) and _is_array(b):
        elements = [e for e in (a[1], b[1]) if e is not None]
        return ("array", merge(elements[0], elements[1]) if len(elements) == 2 else elements[0])
    options = {_describe(s): s for s in (*_options(a), *_options(b))}
    return ("any of", *(options[name] for name in sorted(options)))


def differences(expected: Shape, actual: Shape, path: str = "$") -> list[str]:
    """Where `actual` differs from `expected`. An empty array matches any array (its elements are unknown)."""
    if expected == actual:
        return []
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        found = [f"missing {path}.{key}" for key in expected if key not in actual]
        found += [f"extra {path}.{key}" for key in actual if key not in expected]
        for key in expected:
            if key in actual:
                found += differences(expected[key], actual[key], f"{path}.{key}")
        return found
    if _is_array(expected) and _is_array(actual):
        if expected[1] is None or actual[1] is None:
            return []
        return differences(expected[1], actual[1], f"{path}[]")
    return [f"type {path}: {_describe(expected)} != {_describe(actual)}"]


def _is_array(value: Shape) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and value[0] == "array"


def _options(value: Shape) -> tuple[Shape, ...]:
    return value[1:] if isinstance(value, tuple) and value[:1] == ("any of",) else (value,)


def _describe(value: Shape) -> str:
    """A short name of a shape's kind, for messages (the nested fields are reported as their own lines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return "object"
    if _is_array(value):
        return "array"
    return " | ".join(_describe(option) for option in value[1:])
