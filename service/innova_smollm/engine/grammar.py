"""JSON schema to GBNF, with llama.cpp's own converter (the copy llama-cpp-python ships).

The schema reaching here has passed :func:`innova_smollm.core.schema.check_schema`, which lets through only the
constructs this converter enforces and drops annotations; any answer the grammar allows validates against it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

from innova_smollm.errors import InvalidRequestError

#: Any JSON object, for ``response_format: {"type": "json_object"}``: the converter's own object rule, whose
#: whitespace is at most one space, so a small model cannot run away in blank lines.
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}


def json_schema_gbnf(schema: Mapping[str, Any] | None) -> str:
    """The GBNF (root rule ``root``) of JSON valid against ``schema``; any JSON object when ``schema`` is None."""
    try:
        return str(json_schema_to_gbnf(json.dumps(ANY_OBJECT if schema is None else schema)))
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        # check_schema should have refused it; say so rather than fail the request with a 500.
        raise InvalidRequestError(f"the JSON schema could not be turned into a grammar: {exc}") from None
