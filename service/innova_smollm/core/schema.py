"""Output constraints: which JSON schemas the service can enforce token by token, and a 400 for the rest.

The grammar that constrains an answer comes from llguidance's JSON schema compiler (called inside the engine
package). It refuses most keywords it does not implement, but silently ignores others (``nullable``,
``patternProperties``, ``x-...`` extensions), and its support differs from the keywords' full meaning in places.
:func:`check_schema` lets through only what it enforces, so an answer that finishes with ``stop`` always validates
against the schema the caller sent; anything else is an :class:`InvalidRequestError` naming the construct and where
it is. Never a silent loosening: a constraint the grammar may make *tighter* than the schema (JSON written in one
layout, without free whitespace; an object with ``properties`` and no ``additionalProperties`` gets no extra keys)
still validates.

Annotations (``title``, ``description``, ``default``, ``examples``...) change nothing in what validates and are
dropped from the schema handed to the compiler. This module is pure: no llama_cpp.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from innova_smollm.errors import InvalidRequestError

#: Keywords that annotate and never change what validates.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
#: Containers of named subschemas, kept so that ``$ref`` can point into them.
DEFINITIONS = ("$defs", "definitions")

TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})

#: ``format`` values the constraint engine enforces; any other is refused (it would be ignored).
STRING_FORMATS = frozenset({"date", "time", "date-time", "uuid"})

#: What each kind of schema may hold besides annotations and ``type``.
_OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYS = frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems"})
_STRING_KEYS = frozenset({"format", "minLength", "maxLength"})
_NUMBER_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})

#: Why a well-known keyword is refused, for the message.
_WHY = {
    "oneOf": "the grammar cannot make the alternatives exclusive; use anyOf",
    "allOf": "the grammar cannot intersect schemas; merge them into one",
    "not": "the grammar cannot exclude a schema",
    "if": "conditional schemas cannot be enforced",
    "then": "conditional schemas cannot be enforced",
    "else": "conditional schemas cannot be enforced",
    "pattern": "regular expressions are not enforced",
    "patternProperties": "property-name patterns are not enforced",
    "propertyNames": "property-name schemas are not enforced",
    "minimum": "numeric bounds apply to a schema of type number or integer",
    "maximum": "numeric bounds apply to a schema of type number or integer",
    "exclusiveMinimum": "numeric bounds apply to a schema of type number or integer",
    "exclusiveMaximum": "numeric bounds apply to a schema of type number or integer",
    "multipleOf": "multiples apply to a schema of type number or integer",
    "minProperties": "property counts are not enforced",
    "maxProperties": "property counts are not enforced",
    "contains": "contains is not enforced",
    "minContains": "contains is not enforced",
    "maxContains": "contains is not enforced",
    "uniqueItems": "unique items are not enforced",
    "dependentRequired": "dependencies are not enforced",
    "dependentSchemas": "dependencies are not enforced",
    "dependencies": "dependencies are not enforced",
    "unevaluatedProperties": "unevaluated keywords are not enforced",
    "unevaluatedItems": "unevaluated keywords are not enforced",
    "contentEncoding": "content encodings are not enforced",
    "contentMediaType": "content media types are not enforced",
    "contentSchema": "content schemas are not enforced",
    "$dynamicRef": "dynamic references are not supported",
    "$anchor": "anchors are not supported; use $ref to #/$defs/...",
    "nullable": 'it is OpenAPI, not JSON Schema; use "type": ["...", "null"] or anyOf',
}


class ConstraintKind(StrEnum):
    JSON_OBJECT = "json_object"  #: any JSON object
    JSON_SCHEMA = "json_schema"  #: JSON valid against a schema
    GRAMMAR = "grammar"  #: a raw GBNF grammar


@dataclass(frozen=True, kw_only=True)
class OutputConstraint:
    """What the answer must be, as the caller asked for it; the service turns it into a checked grammar."""

    kind: ConstraintKind
    #: The request field that asked for it, for error messages (``response_format``, ``grammar``...).
    field: str
    #: JSON_SCHEMA: the schema as checked and stripped of annotations (what the compiler gets).
    schema: Mapping[str, Any] | None = None
    #: JSON_SCHEMA: the schema as the caller sent it (what the answer validates against).
    original_schema: Mapping[str, Any] | None = None
    #: GRAMMAR: the GBNF text.
    grammar: str | None = None


def json_schema_constraint(schema: Any, *, field: str) -> OutputConstraint:
    """Check a caller's schema and keep it for the compiler (see :func:`check_schema`)."""
    return OutputConstraint(
        kind=ConstraintKind.JSON_SCHEMA, field=field, schema=check_schema(schema, field=field), original_schema=schema
    )


def check_schema(schema: Any, *, field: str) -> dict[str, Any]:
    """The schema without annotations, when every construct in it can be enforced; else InvalidRequestError."""
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{field} must be a JSON object (a JSON schema)", field=field)
    checker = _Checker(schema, field)
    cleaned = checker.visit(schema, "#")
    for container in DEFINITIONS:
        if container in schema:
            definitions = schema[container]
            if not isinstance(definitions, Mapping):
                checker.refuse(f"#/{container}", f"`{container}` must be an object of named schemas")
            cleaned[container] = {
                name: checker.visit(sub, f"#/{container}/{name}") for name, sub in definitions.items()
            }
    checker.check_refs(cleaned)
    return cleaned


class _Checker:
    def __init__(self, root: Mapping[str, Any], field: str) -> None:
        self.root = root
        self.field = field
        self.refs: list[tuple[str, str]] = []

    def refuse(self, path: str, why: str) -> None:
        raise InvalidRequestError(
            f"{self.field}: the schema at {path} cannot be enforced: {why}", field=self.field, schema_path=path
        )

    def refuse_keyword(self, path: str, keyword: str) -> None:
        why = _WHY.get(keyword, "the keyword is not supported")
        self.refuse(path, f"`{keyword}` is not supported ({why})")

    def visit(self, schema: Any, path: str) -> dict[str, Any]:
        if schema is True or (isinstance(schema, Mapping) and not schema):
            return {}
        if not isinstance(schema, Mapping):
            self.refuse(path, "a subschema must be a JSON object (or true)")
        keys = {k: v for k, v in schema.items() if k not in ANNOTATIONS and k not in DEFINITIONS}
        if path != "#" and any(k in schema for k in DEFINITIONS):
            self.refuse(path, "`$defs` is supported at the root of the schema only")
        for keyword in keys:
            if keyword in _WHY and keyword not in _OBJECT_KEYS | _ARRAY_KEYS | _STRING_KEYS | _NUMBER_KEYS:
                self.refuse_keyword(path, keyword)
        type_ = keys.get("type")
        if type_ is not None and not (
            (isinstance(type_, str) and type_ in TYPES)
            or (isinstance(type_, list) and type_ and all(isinstance(t, str) and t in TYPES for t in type_))
        ):
            self.refuse(path, f"`type` must be one of {sorted(TYPES)} or a non-empty list of them, not {type_!r}")
        if "$ref" in keys:
            return self._ref(keys, path)
        if "anyOf" in keys:
            return self._any_of(keys, path)
        if isinstance(type_, list):
            self._only(keys, {"type"}, path, "next to a list of types")
            return {"type": list(dict.fromkeys(type_))}
        if "const" in keys or "enum" in keys:
            return self._values(keys, path)
        if type_ == "object" or (type_ is None and ("properties" in keys or "additionalProperties" in keys)):
            return self._object(keys, path)
        if type_ == "array" or (type_ is None and ("items" in keys or "prefixItems" in keys)):
            return self._array(keys, path)
        if type_ == "string":
            return self._string(keys, path)
        if type_ in ("number", "integer"):
            return self._number(keys, path, type_)
        if type_ in ("boolean", "null"):
            self._only(keys, {"type"}, path, f"in a schema of type {type_}")
            return {"type": type_}
        if type_ is None:
            self._only(keys, set(), path, "in a schema without a type")
            return {}
        raise AssertionError(f"unhandled schema {keys!r}")  # pragma: no cover - every type is handled above

    def _only(self, keys: Mapping[str, Any], allowed: set[str] | frozenset[str], path: str, where: str) -> None:
        for keyword in keys:
            if keyword not in allowed:
                why = _WHY.get(keyword, f"it is not supported {where}")
                self.refuse(path, f"`{keyword}` is not supported ({why})")

    def _ref(self, keys: Mapping[str, Any], path: str) -> dict[str, Any]:
        self._only(keys, {"$ref"}, path, "next to $ref (only annotations may sit beside a reference)")
        ref = keys["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.refuse(path, f"`$ref` {ref!r} is not a local reference (#/...): remote schemas are never fetched")
        self.refs.append((ref, path))
        return {"$ref": ref}

    def _any_of(self, keys: Mapping[str, Any], path: str) -> dict[str, Any]:
        self._only(keys, {"anyOf"}, path, "next to anyOf (only annotations may sit beside it)")
        options = keys["anyOf"]
        if not isinstance(options, list) or not options:
            self.refuse(path, "`anyOf` must be a non-empty list of schemas")
        return {"anyOf": [self.visit(option, f"{path}/anyOf/{i}") for i, option in enumerate(options)]}

    def _values(self, keys: Mapping[str, Any], path: str) -> dict[str, Any]:
        keyword = "const" if "const" in keys else "enum"
        self._only(keys, {keyword, "type"}, path, f"next to {keyword}")
        values = [keys["const"]] if keyword == "const" else keys["enum"]
        if not isinstance(values, list) or not values:
            self.refuse(path, "`enum` must be a non-empty list")
        type_ = keys.get("type")
        for value in values:
            if type_ is not None and not _is_of_type(value, type_):
                self.refuse(path, f"{keyword} value {value!r} is not of type {type_}")
        return {keyword: keys[keyword]}

    def _object(self, keys: Mapping[str, Any], path: str) -> dict[str, Any]:
        self._only(keys, _OBJECT_KEYS | {"type"}, path, "in an object schema")
        out: dict[str, Any] = {"type": "object"}
        properties = keys.get("properties", {})
        if not isinstance(properties, Mapping):
            self.refuse(path, "`properties` must be an object")
        required = keys.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            self.refuse(path, "`required` must be a list of property names")
        missing = [name for name in required if name not in properties]
        if missing:
            self.refuse(path, f"required properties {missing} are not in `properties`")
        if properties:
            out["properties"] = {name: self.visit(sub, f"{path}/properties/{name}") for name, sub in properties.items()}
        if required:
            out["required"] = list(required)
        if "additionalProperties" not in keys and properties:
            # Tighter than the schema, on purpose: a small model offered any extra key keeps inventing keys until
            # max_tokens cuts the answer. An object with named properties gets those only (as llama.cpp's
            # converter does); one without any stays open.
            out["additionalProperties"] = False
        elif "additionalProperties" in keys:
            extra = keys["additionalProperties"]
            if isinstance(extra, bool):
                out["additionalProperties"] = extra
            else:
                out["additionalProperties"] = self.visit(extra, f"{path}/additionalProperties")
                if not out["additionalProperties"]:
                    out["additionalProperties"] = True
        return out

    def _array(self, keys: Mapping[str, Any], path: str) -> dict[str, Any]:
        self._only(keys, _ARRAY_KEYS | {"type"}, path, "in an array schema")
        if keys.get("uniqueItems", False) is not False:
            self.refuse_keyword(path, "uniqueItems")
        out: dict[str, Any] = {"type": "array"}
        for bound in ("minItems", "maxItems"):
            value = keys.get(bound)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                self.refuse(path, f"`{bound}` must be a non-negative integer")
        if keys.get("minItems", 0) > keys.get("maxItems", keys.get("minItems", 0)):
            self.refuse(path, "`minItems` is above `maxItems`")
        if "prefixItems" in keys:
            tuple_items = keys["prefixItems"]
            if not isinstance(tuple_items, list) or not tuple_items:
                self.refuse(path, "`prefixItems` must be a non-empty list of schemas")
            if keys.get("items", False) is not False:
                self.refuse(path, "`items` beside `prefixItems` is not supported (only `items: false`)")
            if "minItems" in keys or "maxItems" in keys:
                self.refuse(path, "`minItems`/`maxItems` beside `prefixItems` are not supported")
            out["prefixItems"] = [self.visit(s, f"{path}/prefixItems/{i}") for i, s in enumerate(tuple_items)]
            return out
        items = keys.get("items")
        if isinstance(items, list):
            self.refuse(path, "`items` as a list is draft-4 tuple syntax; use `prefixItems`")
        if items is None or items is True:
            if "minItems" in keys or "maxItems" in keys:
                self.refuse(path, "`minItems`/`maxItems` need an `items` schema")
            return out
        if items is False:
            self.refuse(path, "`items: false` without `prefixItems` is not supported")
        out["items"] = self.visit(items, f"{path}/items")
        for bound in ("minItems", "maxItems"):
            if bound in keys:
                out[bound] = keys[bound]
        return out

    def _number(self, keys: Mapping[str, Any], path: str, type_: str) -> dict[str, Any]:
        self._only(keys, _NUMBER_KEYS | {"type"}, path, f"in a schema of type {type_}")
        out: dict[str, Any] = {"type": type_}
        for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            value = keys.get(bound)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.refuse(path, f"`{bound}` must be a number")
            out[bound] = value
        if "multipleOf" in keys:
            value = keys["multipleOf"]
            # Only whole divisors: a fractional one (0.1) is checked by validators in binary floating point, where
            # 0.3 is not a multiple of 0.1, so an answer the grammar allows could fail the caller's validation.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self.refuse(
                    path, "`multipleOf` must be a positive whole number (fractional multiples are not enforced)"
                )
            out["multipleOf"] = value
        return out

    def _string(self, keys: Mapping[str, Any], path: str) -> dict[str, Any]:
        self._only(keys, _STRING_KEYS | {"type"}, path, "in a string schema")
        out: dict[str, Any] = {"type": "string"}
        if "format" in keys:
            format_ = keys["format"]
            if format_ not in STRING_FORMATS:
                self.refuse(path, f"`format` {format_!r} is not enforced (supported: {sorted(STRING_FORMATS)})")
            if "minLength" in keys or "maxLength" in keys:
                self.refuse(path, "`minLength`/`maxLength` beside `format` are not supported")
            out["format"] = format_
            return out
        for bound in ("minLength", "maxLength"):
            value = keys.get(bound)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self.refuse(path, f"`{bound}` must be a non-negative integer")
            out[bound] = value
        if out.get("minLength", 0) > out.get("maxLength", out.get("minLength", 0)):
            self.refuse(path, "`minLength` is above `maxLength`")
        return out

    def check_refs(self, cleaned: Mapping[str, Any]) -> None:
        for ref, path in self.refs:
            target: Any = cleaned
            for part in ref.removeprefix("#").split("/")[1:] if ref != "#" else []:
                name = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, Mapping) or name not in target:
                    self.refuse(path, f"`$ref` {ref!r} points to nothing in this schema")
                target = target[name]
            if ref == "#" or not isinstance(target, Mapping):
                self.refuse(path, f"`$ref` {ref!r} must point to a subschema, such as #/$defs/<name>")


def _is_of_type(value: Any, type_: Any) -> bool:
    types = type_ if isinstance(type_, list) else [type_]
    checks = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }
    return any(checks[t](value) for t in types if t in checks)
