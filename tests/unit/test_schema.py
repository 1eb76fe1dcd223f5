"""Which JSON schemas the grammar can enforce (core.schema), and the request fields that ask for a constraint."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from innova_smollm.core.schema import ConstraintKind, check_schema
from innova_smollm.errors import InvalidRequestError
from innova_smollm.http.constraints import constraint_of, logit_bias_of
from innova_smollm.http.native.protocol import ResponseFormat

FIELD = "response_format.json_schema.schema"

PYDANTIC_LIKE = {
    "$defs": {
        "Step": {
            "properties": {
                "action": {"enum": ["call", "email", "visit"], "title": "Action", "type": "string"},
                "days": {"title": "Days", "type": "integer"},
            },
            "required": ["action", "days"],
            "title": "Step",
            "type": "object",
            "additionalProperties": False,
        }
    },
    "properties": {
        "need": {"description": "What the client needs", "title": "Need", "type": "string", "maxLength": 40},
        "urgent": {"title": "Urgent", "type": "boolean"},
        "steps": {"items": {"$ref": "#/$defs/Step"}, "title": "Steps", "type": "array", "maxItems": 3},
        "budget": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None, "title": "Budget"},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["need", "urgent", "steps", "budget", "when"],
    "title": "Plan",
    "type": "object",
    "additionalProperties": False,
}


def test_a_pydantic_style_schema_passes_without_its_annotations() -> None:
    cleaned = check_schema(PYDANTIC_LIKE, field=FIELD)
    assert "title" not in cleaned
    assert "description" not in cleaned["properties"]["need"]
    assert cleaned["properties"]["budget"] == {"anyOf": [{"type": "number"}, {"type": "null"}]}
    assert cleaned["$defs"]["Step"]["properties"]["action"] == {"enum": ["call", "email", "visit"]}
    assert cleaned["properties"]["steps"]["items"] == {"$ref": "#/$defs/Step"}


def test_an_object_with_properties_gets_no_extra_keys_unless_it_asks_for_them() -> None:
    named = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert check_schema(named, field=FIELD)["additionalProperties"] is False
    assert "additionalProperties" not in check_schema({"type": "object"}, field=FIELD)
    open_ = {**named, "additionalProperties": True}
    assert check_schema(open_, field=FIELD)["additionalProperties"] is True


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": "string"},
        {"type": ["string", "null"]},
        {"const": 3},
        {"enum": ["a", 1, None]},
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"type": "string", "minLength": 1, "maxLength": 5},
        {"type": "string", "format": "uuid"},
        {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 2, "uniqueItems": False},
        {"type": "integer", "minimum": 0, "exclusiveMaximum": 10, "multipleOf": 2},
        {"type": "number", "minimum": -1.5, "maximum": 2.5},
        {"type": "object", "properties": {"a": {"type": "integer", "exclusiveMaximum": 3}}},
    ],
)
def test_enforceable_schemas_pass(schema: dict[str, Any]) -> None:
    check_schema(schema, field=FIELD)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"$ref": "https://example.com/schema.json"}, "remote"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
        ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "`if`"),
        ({"not": {"type": "null"}}, "`not`"),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "string", "format": "uuid4"}, "uuid4"),
        ({"type": "array", "items": {}, "contains": {"const": 1}, "minContains": 2}, "contains"),
        ({"type": "string", "minimum": 0}, "minimum"),
        ({"minimum": 0}, "minimum"),
        ({"type": "number", "multipleOf": 0.1}, "multipleOf"),
        ({"type": "integer", "maximum": "3"}, "maximum"),
        ({"type": "string", "pattern": "^a+$"}, "pattern"),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
        ({"allOf": [{"type": "string"}]}, "allOf"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "['b']"),
        ({"type": "object", "minProperties": 1}, "minProperties"),
        ({"type": "string", "nullable": True}, "nullable"),
        ({"$ref": "#/$defs/Missing"}, "points to nothing"),
        ({"type": "string", "enum": ["a", 1]}, "not of type string"),
        ({"type": "strin"}, "`type`"),
        ({"type": ["string", "null"], "maxLength": 3}, "maxLength"),
        ({"anyOf": [{"type": "string"}], "type": "string"}, "`type`"),
        ({"$ref": "#/$defs/A", "maxLength": 2, "$defs": {"A": {"type": "string"}}}, "maxLength"),
        ({"type": "array", "minItems": 1}, "items"),
        ({"type": "object", "properties": {"a": {"type": "boolean", "exclusiveMaximum": 3}}}, "/properties/a"),
        ({"x-custom": 1}, "x-custom"),
        ("not a schema", "JSON object"),
    ],
)
def test_what_the_grammar_cannot_enforce_is_refused_by_name(schema: Any, named: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_schema(schema, field=FIELD)
    assert caught.value.field == FIELD
    assert named in caught.value.message


def _format(body: dict[str, Any]) -> ResponseFormat:
    return msgspec.convert(body, ResponseFormat)


def test_response_format_types() -> None:
    assert constraint_of(_format({"type": "text"})) is None
    assert constraint_of(None) is None
    json_object = constraint_of(_format({"type": "json_object"}))
    assert json_object is not None and json_object.kind is ConstraintKind.JSON_OBJECT
    schema = constraint_of(_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}))
    assert schema is not None and schema.kind is ConstraintKind.JSON_SCHEMA
    assert schema.schema == {"type": "string"} and schema.field == FIELD
    # llama-cpp-python's shape
    legacy = constraint_of(_format({"type": "json_object", "schema": {"type": "integer"}}))
    assert legacy is not None and legacy.kind is ConstraintKind.JSON_SCHEMA
    grammar = constraint_of(None, 'root ::= "yes"')
    assert grammar is not None and grammar.kind is ConstraintKind.GRAMMAR


@pytest.mark.parametrize(
    ("body", "grammar", "field"),
    [
        ({"type": "yaml"}, None, "response_format.type"),
        ({"type": "json_schema"}, None, "response_format.json_schema"),
        ({"type": "json_object", "json_schema": {"schema": {}}}, None, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "^a"}}}, None, FIELD),
        ({"type": "json_object"}, 'root ::= "a"', "grammar"),
    ],
)
def test_response_format_refusals_name_the_field(body: dict[str, Any], grammar: str | None, field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        constraint_of(_format(body), grammar)
    assert caught.value.field == field


def test_logit_bias_keys_are_token_ids() -> None:
    assert logit_bias_of({"12": -100, "7": 2.5}) == ((12, -100.0), (7, 2.5))
    assert logit_bias_of(None) == ()
    with pytest.raises(InvalidRequestError) as caught:
        logit_bias_of({"hello": 1})
    assert caught.value.field == "logit_bias.hello"
