"""Table tests of tests/shapes.py, the shape comparison the parity test relies on: if it called two different
answers equal, the parity test could not fail."""

from __future__ import annotations

from typing import Any

import pytest

from tests.shapes import EMPTY_ARRAY, Shape, differences, merge, shape


@pytest.mark.parametrize(("value", "expected"), [
    (None, "null"),
    (True, "boolean"),
    (0, "number"),
    (1.5, "number"),
    ("x", "string"),
    ({}, {}),
    ([], EMPTY_ARRAY),
    ({"a": 1, "b": {"c": [True]}}, {"a": "number", "b": {"c": ("array", "boolean")}}),
    ([1, 2.5], ("array", "number")),
    ([1, "x"], ("array", ("any of", "number", "string"))),
    ([{"id": "a"}, {"id": "b", "meta": {"n": 1}}], ("array", {"id": "string", "meta": {"n": "number"}})),
    ([[], [1]], ("array", ("array", "number"))),
    ([{"a": 1}, {"a": None}], ("array", {"a": ("any of", "null", "number")})),
])
def test_shape(value: Any, expected: Shape) -> None:
    assert shape(value) == expected


def test_shape_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError):
        shape({"a": object()})


def test_merge_is_symmetric_for_scalars() -> None:
    assert merge("number", "string") == merge("string", "number") == ("any of", "number", "string")
    assert merge(merge("number", "string"), "null") == ("any of", "null", "number", "string")


@pytest.mark.parametrize(("expected", "actual", "found"), [
    ({"a": 1}, {"a": 2}, []),  # values are not compared
    ({"a": 1}, {"a": "1"}, ["type $.a: number != string"]),
    ({"a": 1, "b": 1}, {"a": 1}, ["missing $.b"]),
    ({"a": 1}, {"a": 1, "c": 1}, ["extra $.c"]),
    ({"e": {"code": 400}}, {"e": {"code": "x", "param": None}}, ["extra $.e.param", "type $.e.code: number != string"]),
    ({"data": [{"id": "a"}]}, {"data": [{"id": 1}]}, ["type $.data[].id: string != number"]),
    ({"data": []}, {"data": [{"id": 1}]}, []),  # nothing known of an empty array's elements
    ({"data": [1]}, {"data": {}}, ["type $.data: array != object"]),
    ({"p": None}, {"p": {}}, ["type $.p: null != object"]),
    ([{"a": 1}], [{"a": 1}, {"a": 1, "b": True}], ["extra $[].b"]),
    ("string", [1], ["type $: string != array"]),
])
def test_differences(expected: Any, actual: Any, found: list[str]) -> None:
    assert sorted(differences(shape(expected), shape(actual))) == sorted(found)
