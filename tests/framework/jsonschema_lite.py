"""A validator for the part of JSON Schema (2020-12) that schemas/*.json use, so that the
tests check qvm's real output against the very files users read, without a dependency.

Supported: type (one or a list), enum, const, properties, required, additionalProperties
(false or a schema), items, minItems, minimum, maximum, minLength, pattern, anyOf, oneOf,
allOf, not, and $ref to another file of the folder ("common.json#/$defs/forward"), to a
place in the same file ("#/$defs/exit") or to a whole file ("status.json"). Anything
else in a schema is an error here, never silently ignored: a schema that asks for more
than this checks must fail loudly rather than pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# keywords that only describe, or that this validator implements
ANNOTATIONS = {"$schema", "$id", "title", "description", "$defs"}
CHECKED = {
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "minimum",
    "maximum",
    "minLength",
    "pattern",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "$ref",
}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaError(AssertionError):
    """The instance does not match; the message says where and why."""


# one unit per quantity: sizes in bytes, times in seconds (a key says so: *_bytes, *_seconds)
OTHER_UNITS = re.compile(r"_(kb|kib|mb|mib|gb|gib|ms|msec|millis)$", re.I)


def keys_in_other_units(value: Any, path: str = "$") -> list[str]:
    """Every key in ``value`` whose name says a unit other than bytes or seconds."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if OTHER_UNITS.search(key):
                found.append(f"{path}.{key}")
            found += keys_in_other_units(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += keys_in_other_units(item, f"{path}[{index}]")
    return found


def load(name: str, folder: Path = SCHEMAS) -> dict[str, Any]:
    return json.loads((folder / name).read_text())


def validate(instance: Any, name: str, folder: Path = SCHEMAS) -> None:
    """Raise SchemaError unless ``instance`` matches ``folder/name``."""
    problems = Validator(folder).problems(instance, load(name, folder), name, "$")
    problems += [
        f"{key}: a size is in bytes, a time in seconds" for key in keys_in_other_units(instance)
    ]
    if problems:
        raise SchemaError(f"{name}: " + "; ".join(problems[:5]))


class Validator:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.documents: dict[str, dict[str, Any]] = {}

    def document(self, name: str) -> dict[str, Any]:
        if name not in self.documents:
            self.documents[name] = load(name, self.folder)
        return self.documents[name]

    def resolve(self, ref: str, base: str) -> tuple[Any, str]:
        file, _, pointer = ref.partition("#")
        file = file or base
        target: Any = self.document(file)
        for part in filter(None, pointer.split("/")):
            target = target[part]
        return target, file

    def problems(self, value: Any, schema: Any, base: str, path: str) -> list[str]:
        """Every way ``value`` (at ``path``) fails ``schema`` (from the file ``base``)."""
        if schema is True or schema == {}:
            return []
        if schema is False:
            return [f"{path}: not allowed"]
        unknown = set(schema) - CHECKED - ANNOTATIONS
        if unknown:
            raise ValueError(f"{base}: {path}: keywords this validator does not check: {unknown}")
        found: list[str] = []
        if "$ref" in schema:
            target, file = self.resolve(schema["$ref"], base)
            found += self.problems(value, target, file, path)
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(TYPES[t](value) for t in types):
                return found + [f"{path}: expected {'/'.join(types)}, got {json.dumps(value)[:80]}"]
        if "enum" in schema and value not in schema["enum"]:
            found.append(f"{path}: {value!r} is not one of {schema['enum']}")
        if "const" in schema and value != schema["const"]:
            found.append(f"{path}: {value!r} is not {schema['const']!r}")
        if isinstance(value, dict):
            found += self._object(value, schema, base, path)
        if isinstance(value, list):
            if "items" in schema:
                for index, item in enumerate(value):
                    found += self.problems(item, schema["items"], base, f"{path}[{index}]")
            if len(value) < schema.get("minItems", 0):
                found.append(f"{path}: fewer than {schema['minItems']} items")
        if TYPES["number"](value):
            if "minimum" in schema and value < schema["minimum"]:
                found.append(f"{path}: {value} < {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                found.append(f"{path}: {value} > {schema['maximum']}")
        if isinstance(value, str):
            if len(value) < schema.get("minLength", 0):
                found.append(f"{path}: shorter than {schema['minLength']}")
            if "pattern" in schema and not re.search(schema["pattern"], value):
                found.append(f"{path}: {value!r} does not match {schema['pattern']}")
        for sub in schema.get("allOf", []):
            found += self.problems(value, sub, base, path)
        if "anyOf" in schema:
            results = [self.problems(value, sub, base, path) for sub in schema["anyOf"]]
            if all(results):
                found.append(f"{path}: matches none of anyOf ({min(results, key=len)[0]})")
        if "oneOf" in schema:
            results = [self.problems(value, sub, base, path) for sub in schema["oneOf"]]
            matching = sum(1 for r in results if not r)
            if matching != 1:
                detail = min(results, key=len)[0] if matching == 0 else f"{matching} match"
                found.append(f"{path}: must match exactly one of oneOf ({detail})")
        if "not" in schema and not self.problems(value, schema["not"], base, path):
            found.append(f"{path}: must not match {schema['not']}")
        return found

    def _object(self, value: dict[str, Any], schema: Any, base: str, path: str) -> list[str]:
        found = [
            f"{path}: no key {key!r}" for key in schema.get("required", []) if key not in value
        ]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                found += self.problems(item, properties[key], base, f"{path}.{key}")
            elif "additionalProperties" in schema:
                found += self.problems(
                    item, schema["additionalProperties"], base, f"{path}.{key} (not in the schema)"
                )
        return found
