"""Tools a model can call: plain Python functions offered as OpenAI tool schemas, and running the calls it makes.

    toolbox = Toolbox.from_file("my_tools.py")   # its public functions (or __all__); Toolbox([add, convert])
    toolbox.schemas                              # [{"type": "function", "function": {name, description, parameters}}]
    toolbox.check(call)  -> None, or why the call is not a valid one (unknown tool, arguments off its schema)
    toolbox.run(call)    -> the result as text for a `tool` message (JSON unless the function returns a string)
    toolbox.respond(calls) -> the `tool` messages answering a reply's calls

A call is an OpenAI tool call ({"function": {"name", "arguments": JSON string}}, as minimind.chat_template reads
them from a reply) or {"name", "arguments"}. A function's schema comes from its signature and docstring: the text
before the sections describes it; `Args:` lines (`name: text` or `name (type): text`, Google style) or
`:param name: text` lines describe the parameters; annotations give the JSON types (int integer, float number, str
string, bool boolean, list / tuple array, dict object, Optional[X] X, Literal[...] an enum); a parameter without a
default is required. A call that fails (unknown tool, arguments that do not fit, an exception in the function) is
answered {"error": "..."}, which the model reads like any result.
"""
import enum
import importlib.util
import inspect
import json
import re
import types
import typing
from collections import abc
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", tuple: "array",
              dict: "object", type(None): "null"}
SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?):\s*$")
ARGS_SECTIONS = ("Args", "Arguments", "Parameters", "Params")


def type_schema(annotation) -> dict:
    """The JSON Schema of a Python annotation ({} for none or Any)."""
    if annotation in (inspect.Parameter.empty, Any):
        return {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        kinds = {JSON_TYPES.get(type(a)) for a in args}
        return {**({"type": kinds.pop()} if len(kinds) == 1 else {}), "enum": list(args)}
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        options = [a for a in args if a is not type(None)]
        return type_schema(options[0]) if len(options) == 1 else {"anyOf": [type_schema(a) for a in options]}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return type_schema(typing.Literal[tuple(m.value for m in annotation)])
    base = origin or annotation
    if isinstance(base, type) and base is not str and issubclass(base, (abc.Sequence, abc.Set)):
        items = [a for a in args if a is not Ellipsis]
        return {"type": "array", **({"items": type_schema(items[0])} if len(items) == 1 else {})}
    if isinstance(base, type) and issubclass(base, abc.Mapping):
        return {"type": "object"}
    if base in JSON_TYPES:
        return {"type": JSON_TYPES[base]}
    raise TypeError(f"no JSON type for the annotation {annotation!r}")


def parse_docstring(doc: str):
    """(description, {parameter: description}) of a docstring: the text before its first section, and the entries
    of its Args: section (Google style) or its :param name: lines (Sphinx)."""
    description, params = [], {}
    section, current, entry_indent = None, None, None
    for line in (doc or "").splitlines():
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        header = SECTION.match(stripped)
        sphinx = re.match(r":param\s+(?:\S+\s+)?(\w+)\s*:\s*(.*)", stripped)
        if header:
            section, current, entry_indent = header.group(1), None, None
        elif sphinx:
            section, current = "sphinx", sphinx.group(1)
            params[current] = sphinx.group(2)
        elif stripped.startswith(":"):  # :returns: and the like
            section, current = "sphinx", None
        elif section is None:
            description.append(stripped)
        elif section in ARGS_SECTIONS and stripped:
            entry = re.match(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if entry and (entry_indent is None or indent <= entry_indent):
                entry_indent, current = indent, entry.group(1)
                params[current] = entry.group(2)
            elif current is not None:  # an entry's continuation line
                params[current] += " " + stripped
        elif section == "sphinx" and current is not None and stripped:
            params[current] += " " + stripped
    return " ".join(" ".join(description).split()), {k: " ".join(v.split()) for k, v in params.items()}


def function_schema(fn: Callable) -> dict:
    """The OpenAI tool schema of a plain function (see the module docstring)."""
    description, param_docs = parse_docstring(inspect.getdoc(fn) or "")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: use them as written
        hints = getattr(fn, "__annotations__", {})
    properties, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"{fn.__name__}: parameter {name} is positional-only; a tool takes keyword arguments")
        try:
            prop = type_schema(hints.get(name, p.annotation))
        except TypeError as e:
            raise TypeError(f"{fn.__name__}({name}): {e}") from None
        if name in param_docs:
            prop["description"] = param_docs[name]
        if p.default is p.empty:
            required.append(name)
        elif p.default is not None and _is_json(p.default):
            prop["default"] = json.loads(json.dumps(p.default))  # as JSON has it: a tuple is a list
        properties[name] = prop
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": fn.__name__, "description": description,
                                             "parameters": parameters}}


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def schema_errors(schema: dict, value, where: str = "arguments") -> List[str]:
    """Where `value` breaks `schema`, for the parts of JSON Schema tool parameters use: type, enum, properties,
    required, additionalProperties: false, items, anyOf. [] when it fits."""
    errors = []
    kind = schema.get("type")
    if kind is not None and not any(_is_type(value, k) for k in ([kind] if isinstance(kind, str) else kind)):
        return [f"{where} should be {kind}, got {json.dumps(value, ensure_ascii=False)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where} should be one of {schema['enum']}, got {json.dumps(value, ensure_ascii=False)}")
    if "anyOf" in schema and all(schema_errors(s, value, where) for s in schema["anyOf"]):
        errors.append(f"{where} fits none of {schema['anyOf']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where} lacks {k!r}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(props[k], v, f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where} has {k!r}, which the tool does not take")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(schema["items"], v, f"{where}[{i}]")
    return errors


def _is_type(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    python = {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}.get(kind)
    return python is not None and isinstance(value, python)


def call_parts(call: dict):
    """(name, arguments as an object, or None when they are not a JSON object) of a tool call."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return fn.get("name"), None
    return fn.get("name"), args if isinstance(args, dict) else None


class Toolbox:
    """Python functions offered to a model as tools, by name."""

    def __init__(self, functions: Sequence[Callable]):
        self.functions: Dict[str, Callable] = {}
        for fn in functions:
            if fn.__name__ in self.functions:
                raise ValueError(f"two tools are named {fn.__name__}")
            self.functions[fn.__name__] = fn
        self.schemas = [function_schema(fn) for fn in self.functions.values()]
        self._schema = {s["function"]["name"]: s["function"]["parameters"] for s in self.schemas}

    @classmethod
    def from_file(cls, path) -> "Toolbox":
        """The public functions defined in the Python file `path` (those in its __all__, if it has one)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--tools {path}: no such file")
        spec = importlib.util.spec_from_file_location(f"minimind_tools_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"--tools {path}: {type(e).__name__}: {e}") from None
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, f in vars(module).items() if inspect.isfunction(f) and not n.startswith("_")
                     and f.__module__ == module.__name__]
        functions = [getattr(module, n, None) for n in names]
        bad = [n for n, f in zip(names, functions) if not inspect.isfunction(f)]
        if bad or not functions:
            raise ValueError(f"--tools {path}: " + (f"{bad} in __all__ are not functions" if bad else
                                                    "no public functions (def name(...)) to offer as tools"))
        try:
            return cls(functions)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--tools {path}: {e}") from None

    def subset(self, names: Sequence[str]) -> "Toolbox":
        unknown = [n for n in names if n not in self.functions]
        if unknown:
            raise KeyError(f"no tools named {unknown}; the toolbox has {sorted(self.functions)}")
        return Toolbox([self.functions[n] for n in names])

    def check(self, call: dict) -> Optional[str]:
        """None when `call` names one of these tools with arguments that fit its schema and signature; else why not."""
        name, args = call_parts(call)
        if name not in self.functions:
            return f"no tool named {name!r} (the tools are {sorted(self.functions)})"
        if args is None:
            return f"{name}: the arguments are not a JSON object"
        errors = schema_errors(self._schema[name], args)
        if errors:
            return f"{name}: " + "; ".join(errors)
        try:
            inspect.signature(self.functions[name]).bind(**args)
        except TypeError as e:
            return f"{name}: {e}"
        return None

    def run(self, call: dict) -> str:
        """Call the tool: its result as text (a string as it is, anything else as JSON), or {"error": ...}."""
        problem = self.check(call)
        if problem is None:
            name, args = call_parts(call)
            try:
                result = self.functions[name](**args)
            except Exception as e:
                problem = f"{name} failed: {type(e).__name__}: {e}"
        if problem is not None:
            result = {"error": problem}
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)

    def respond(self, calls: Sequence[dict]) -> List[dict]:
        """The `tool` messages answering `calls` (OpenAI tool calls), in order."""
        return [{"role": "tool", "tool_call_id": c.get("id", ""), "content": self.run(c)} for c in calls]
