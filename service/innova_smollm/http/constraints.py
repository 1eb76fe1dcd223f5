"""Request fields shared by both APIs that need more than a type check: ``response_format``, ``grammar`` and
``logit_bias``, turned into the service's options (a 400 naming the field when they ask for what cannot be done)."""

from __future__ import annotations

from collections.abc import Mapping

from innova_smollm.core.schema import ConstraintKind, OutputConstraint, json_schema_constraint
from innova_smollm.errors import InvalidRequestError
from innova_smollm.http.native.protocol import ResponseFormat

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def constraint_of(response_format: ResponseFormat | None, grammar: str | None = None) -> OutputConstraint | None:
    """The output constraint a request asks for, or None for free text."""
    if grammar is not None:
        if response_format is not None and response_format.type != "text":
            raise InvalidRequestError(
                "grammar and response_format both constrain the answer: send one of them", field="grammar"
            )
        return OutputConstraint(kind=ConstraintKind.GRAMMAR, field="grammar", grammar=grammar)
    if response_format is None:
        return None
    kind = response_format.type
    if kind not in RESPONSE_FORMAT_TYPES:
        raise InvalidRequestError(
            f"response_format.type {kind!r} is not supported (supported: {', '.join(RESPONSE_FORMAT_TYPES)})",
            field="response_format.type",
        )
    if kind == "text":
        if response_format.json_schema is not None or response_format.schema is not None:
            raise InvalidRequestError(
                "response_format of type text takes no schema", field="response_format.json_schema"
            )
        return None
    if kind == "json_object":
        if response_format.json_schema is not None:
            raise InvalidRequestError(
                "response_format.json_schema goes with type json_schema, not json_object",
                field="response_format.json_schema",
            )
        if response_format.schema is not None:
            return json_schema_constraint(response_format.schema, field="response_format.schema")
        return OutputConstraint(kind=ConstraintKind.JSON_OBJECT, field="response_format")
    if response_format.schema is not None:
        raise InvalidRequestError(
            "with type json_schema the schema goes in response_format.json_schema.schema",
            field="response_format.schema",
        )
    spec = response_format.json_schema
    if spec is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs json_schema: {name, schema, strict}",
            field="response_format.json_schema",
        )
    if spec.schema is None:
        return OutputConstraint(kind=ConstraintKind.JSON_OBJECT, field="response_format.json_schema")
    return json_schema_constraint(spec.schema, field="response_format.json_schema.schema")


def logit_bias_of(logit_bias: Mapping[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as (id, bias) pairs; a key that is not a token id is a 400 naming it."""
    if not logit_bias:
        return ()
    pairs = []
    for key, bias in logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys are token ids (integers as strings), not {key!r}", field=f"logit_bias.{key}"
            ) from None
        pairs.append((token, float(bias)))
    return tuple(pairs)
