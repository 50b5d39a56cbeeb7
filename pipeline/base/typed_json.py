"""Typed records <-> JSON, and the JSON Schema generated from the records' type hints.

Shared by every on-disk document family of the project (the cache format, the run record): a record is a
dataclass; `to_json` / `from_json` convert it by its fields and type hints; `schema_of` turns the same
hints into JSON Schema (draft 2020-12) definitions; a `SchemaFamily` names the documents of one published
schema file and validates data against that file, raising one SakError that names the file and the field
path of the first problem.

Field metadata understood here: `{"omit": True}` (left out of the JSON when None, optional in the
schema), `{"omit_with": "other"}` (present exactly when field `other` is), `{"doc": "..."}` (description).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from sak.pipeline.base.errors import SakError

OMIT = {"omit": True}  # field metadata: left out of the JSON when None (and optional in the schema)


def omit_with(other: str) -> dict:
    """Field metadata: present exactly when field `other` is (a null value is kept then)."""
    return {"omit_with": other}


def doc(text: str, **meta) -> dict:
    """Field metadata carrying a description into the generated schema."""
    return {"doc": text, **meta}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a record class (cached)."""
    return _hints(cls)


def _omitted(obj: Any, f: dataclasses.Field) -> bool:
    if f.metadata.get("omit"):
        return getattr(obj, f.name) is None
    if "omit_with" in f.metadata:
        return getattr(obj, f.metadata["omit_with"]) is None
    return False


def to_json(value: Any) -> Any:
    """A record (or list/dict of them) as JSON values, fields in declaration order, omissions applied."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not _omitted(value, f)
        }
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def from_json(tp: Any, data: Any) -> Any:
    """JSON values (already validated against the schema) -> an instance of type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return tp(
            **{
                f.name: from_json(hints[f.name], data[f.name])
                for f in dataclasses.fields(tp)
                if f.name in data
            }
        )
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        return from_json(next(a for a in args if a is not type(None)), data)
    if origin is list:
        return [from_json(args[0], v) for v in data]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(args[0], v) for v in data)
        return tuple(from_json(a, v) for a, v in zip(args, data))
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    if tp is float:
        return float(data)
    return data


# ------------------------------------------------------------------------------------ JSON Schema


def _record_schema(tp: type, defs: dict) -> dict:
    hints, props, required = _hints(tp), {}, []
    for f in dataclasses.fields(tp):
        props[f.name] = schema_of(hints[f.name], defs)
        if "doc" in f.metadata:
            props[f.name] = {"description": f.metadata["doc"], **props[f.name]}
        if not (f.metadata.get("omit") or "omit_with" in f.metadata):
            required.append(f.name)
    text = (tp.__doc__ or "").strip().splitlines()
    return {
        **({"description": text[0]} if text and not text[0].startswith(tp.__name__ + "(") else {}),
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def schema_of(tp: Any, defs: dict) -> dict:
    """The JSON Schema of type `tp`; records are added to `defs` by class name and referenced."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder against recursion
            defs[tp.__name__] = _record_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [schema_of(a, defs) for a in args]}
    if origin is Literal:
        return {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return {"type": "array", "items": schema_of(args[0], defs)}
    if origin is tuple:
        items = [schema_of(a, defs) for a in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin is dict:
        value = args[1]
        return (
            {"type": "object"}
            if value is Any
            else {"type": "object", "additionalProperties": schema_of(value, defs)}
        )
    simple = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is Any:
        return {}
    raise TypeError(f"no JSON Schema for type {tp!r}")


def schema_text(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


_PY_TYPES = {"integer": "int", "string": "str", "number": "float", "boolean": "bool", "object": "dict",
             "array": "list", "null": "None"}  # fmt: skip


def _json_type(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(
        type(value), "None" if value is None else type(value).__name__
    )


def _explain(error) -> str:
    if error.validator == "type":
        expected = (
            error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        )
        return f"should be {' or '.join(_PY_TYPES.get(t, t) for t in expected)}, found {_json_type(error.instance)}"
    if error.validator == "required":
        return f"is missing a required field ({error.message.split(' is a required')[0]})"
    if error.validator == "additionalProperties":
        return f"has a field the format does not define ({error.message.split('(')[-1].rstrip(')')})"
    return error.message if len(error.message) < 160 else error.message[:157] + "..."


@dataclass(frozen=True)
class SchemaFamily:
    """The documents of one published schema file.

    package / file: where the shipped schema lives (`resources.files(package) / "schema" / file`);
    documents: every top-level record; roots: those a whole file may be (the root's oneOf);
    damaged_hint: the end of a validation error ("the file is damaged or not a v1 cache file (...)").
    """

    package: str
    file: str
    schema_id: str
    title: str
    description: str
    documents: tuple[type, ...]
    roots: tuple[type, ...]
    damaged_hint: str

    def generate(self) -> dict:
        defs: dict = {}
        for cls in self.documents:
            schema_of(cls, defs)
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": self.schema_id,
            "title": self.title,
            "description": self.description,
            "oneOf": [{"$ref": f"#/$defs/{cls.__name__}"} for cls in self.roots],
            "$defs": dict(sorted(defs.items())),
        }

    def shipped_path(self) -> Path:
        return Path(str(resources.files(self.package).joinpath("schema", self.file)))

    def shipped(self) -> dict:
        return _shipped(self.package, self.file)

    def validate(self, data: Any, cls: type, path: str | Path) -> None:
        """Raise one SakError naming the file and the field path of the first schema violation."""
        from jsonschema.exceptions import best_match

        error = best_match(_validator(self.package, self.file, cls.__name__).iter_errors(data))
        if error is None:
            return
        where = ".".join(str(p) for p in error.absolute_path) or "(document)"
        raise SakError(f"{path}: field '{where}' {_explain(error)}; {self.damaged_hint}")

    def load(self, cls: type, data: Any, path: str | Path) -> Any:
        self.validate(data, cls, path)
        return from_json(cls, data)


@functools.cache
def _shipped(package: str, file: str) -> dict:
    return json.loads(resources.files(package).joinpath("schema", file).read_text())


@functools.cache
def _validator(package: str, file: str, name: str):
    from jsonschema import Draft202012Validator

    schema = _shipped(package, file)
    return Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": schema["$defs"]})
