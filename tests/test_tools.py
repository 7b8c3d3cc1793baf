"""Tools (minimind.tools): a function's OpenAI schema read off its signature and docstring, arguments checked
against it, calls run with their failures answered as errors, a --tools file loaded."""
import enum
import json
from typing import Dict, List, Literal, Optional, Tuple

import pytest

from minimind.tools import Toolbox, function_schema, parse_docstring, schema_errors


class Unit(enum.Enum):
    KM = "km"
    MILE = "mile"


def convert(value: float, unit: Unit, to: Literal["km", "mile"] = "km", precision: int = 2,
            tags: Optional[List[str]] = None, extra: Dict[str, int] | None = None, pair: Tuple[int, int] = (1, 2),
            anything=None, *rest, **more):
    """Convert a length
    between units.

    Args:
        value: the number
            to convert
        unit (Unit): its unit
        to: the unit wanted

    Returns:
        the converted length
    """
    return value


def test_a_function_schema_from_signature_and_docstring():
    schema = function_schema(convert)
    assert schema["type"] == "function" and schema["function"]["name"] == "convert"
    assert schema["function"]["description"] == "Convert a length between units."
    params = schema["function"]["parameters"]
    assert params["type"] == "object" and params["required"] == ["value", "unit"]
    assert params["properties"] == {
        "value": {"type": "number", "description": "the number to convert"},
        "unit": {"type": "string", "enum": ["km", "mile"], "description": "its unit"},
        "to": {"type": "string", "enum": ["km", "mile"], "description": "the unit wanted", "default": "km"},
        "precision": {"type": "integer", "default": 2},
        "tags": {"type": "array", "items": {"type": "string"}},
        "extra": {"type": "object"},
        "pair": {"type": "array", "default": [1, 2]},
        "anything": {}}
    json.dumps(schema)  # it is JSON


def test_sphinx_docstrings_and_bad_annotations():
    assert parse_docstring("Add.\n:param x: first\n:param int y: second\n    continued\n:returns: the sum") == (
        "Add.", {"x": "first", "y": "second continued"})

    def f(x: object):
        pass

    def g(x, /):
        pass
    with pytest.raises(TypeError, match=r"f\(x\): no JSON type"):
        function_schema(f)
    with pytest.raises(TypeError, match="positional-only"):
        function_schema(g)


def test_schema_errors():
    schema = function_schema(convert)["function"]["parameters"]
    assert schema_errors(schema, {"value": 3, "unit": "km"}) == []
    assert schema_errors(schema, {"value": "3", "unit": "yard", "precision": 2.5, "tags": ["a", 1]}) == [
        'arguments.value should be number, got "3"', 'arguments.unit should be one of [\'km\', \'mile\'], got "yard"',
        "arguments.precision should be integer, got 2.5", "arguments.tags[1] should be string, got 1"]
    assert schema_errors(schema, {"value": True, "unit": "km"}) == ["arguments.value should be number, got true"]
    assert schema_errors({"type": "object", "properties": {}, "additionalProperties": False}, {"x": 1}) == [
        "arguments has 'x', which the tool does not take"]


def add(a: int, b: int = 0) -> int:
    """Add."""
    return a + b


def fail(x: str) -> str:
    """Always fails."""
    raise ValueError(f"cannot do {x}")


def test_calls_are_checked_run_and_answered():
    box = Toolbox([add, fail])
    assert box.check({"name": "add", "arguments": {"a": 1}}) is None
    assert box.check({"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}) is None
    assert box.check({"name": "sub", "arguments": {}}) == "no tool named 'sub' (the tools are ['add', 'fail'])"
    assert box.check({"name": "add", "arguments": "[1]"}) == "add: the arguments are not a JSON object"
    assert box.check({"name": "add", "arguments": {"a": 1, "c": 2}}) == \
        "add: got an unexpected keyword argument 'c'"
    assert box.run({"name": "add", "arguments": {"a": 2, "b": 3}}) == "5"
    assert json.loads(box.run({"name": "fail", "arguments": {"x": "it"}})) == {
        "error": "fail failed: ValueError: cannot do it"}
    assert box.respond([{"id": "call_1", "function": {"name": "add", "arguments": '{"a": 1}'}}]) == [
        {"role": "tool", "tool_call_id": "call_1", "content": "1"}]
    assert [s["function"]["name"] for s in box.subset(["fail"]).schemas] == ["fail"]
    with pytest.raises(KeyError, match="sub"):
        box.subset(["sub"])
    with pytest.raises(ValueError, match="two tools are named add"):
        Toolbox([add, add])


def test_a_tools_file_offers_its_all_or_its_public_functions(tmp_path):
    (tmp_path / "a.py").write_text("import json\nfrom os.path import join\n\ndef f(x: int):\n    return x\n\n"
                                   "def g():\n    return 1\n\ndef _h():\n    pass\n")
    assert list(Toolbox.from_file(tmp_path / "a.py").functions) == ["f", "g"]  # not imported ones, not _h
    (tmp_path / "b.py").write_text("__all__ = ['g']\ndef f():\n    pass\ndef g():\n    pass\n")
    assert list(Toolbox.from_file(tmp_path / "b.py").functions) == ["g"]
    (tmp_path / "c.py").write_text("__all__ = ['X']\nX = 1\n")
    with pytest.raises(ValueError, match=r"c.py: \['X'\] in __all__ are not functions"):
        Toolbox.from_file(tmp_path / "c.py")
    (tmp_path / "d.py").write_text("def f(x: object):\n    pass\n")
    with pytest.raises(ValueError, match=r"d.py: f\(x\): no JSON type"):
        Toolbox.from_file(tmp_path / "d.py")
