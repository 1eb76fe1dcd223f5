"""Output constraints, enforced with llguidance: JSON schemas and GBNF grammars to token masks and forced tokens.

Why llguidance rather than llama.cpp's grammar sampler (measured on SmolLM2's 49k vocabulary, see
docs/performance.md): llama.cpp's sampler checks a grammar token by token, so a rejected token costs a pass over the
whole vocabulary (about 5 ms on an idle core, 15 ms on a busy one), while llguidance computes the whole mask of allowed
tokens in tens of microseconds; and llguidance says which tokens the grammar forces next (keys, punctuation, the
tail of an enum value), which the scheduler appends without sampling them (jump-forward).

The schema reaching here has passed :func:`innova_smollm.core.schema.check_schema`, which lets through only the
constructs enforced here; llguidance refuses any keyword it does not implement (it is not run ``lenient``), and
that refusal is a 400 as well. A raw GBNF grammar is parsed by llama.cpp first (its syntax is llama.cpp's: see
:func:`innova_smollm.engine.sampling.grammar_error`), then converted to llguidance's Lark form.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

import llama_cpp
from llguidance import LLMatcher, LLTokenizer
from llguidance.gbnf_to_lark import gbnf_to_lark
from llguidance.llamacpp import lltokenizer_from_vocab

from innova_smollm.errors import InvalidRequestError

#: Any JSON object, for ``response_format: {"type": "json_object"}``.
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}

#: JSON is written in one layout: ``", "`` between items, ``": "`` after keys, no other whitespace. A small model
#: cannot run away in blank lines, and every separator is forced, so the scheduler appends it without sampling.
JSON_OPTIONS: Mapping[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

#: Most forced tokens appended to a sequence in one step (the rest follow in the next): bounds a step's batch.
MAX_FORCED_PER_STEP = 32


class Constraints:
    """One engine's llguidance tokenizer (built once from the model's vocabulary) and the grammars it checks.

    Every method is safe beside the engine thread: the tokenizer is read-only once built.
    """

    def __init__(self, vocab: Any, *, token_slices: bool = True) -> None:
        """``token_slices``: llguidance's slicer, which precomputes token subsets (free string content, mostly) so
        that a mask inside a JSON string costs ~0.1 ms instead of ~1 ms on Llama 3's 128k vocabulary, for ~31 MiB
        of memory there (measured 2026-12-06). Worth it where a step is a few milliseconds (the 135M model), not
        where it is ~110 ms (the 3B model, whose memory budget is tight): the engine turns it off for large models."""
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        # Every end-of-generation token ends a constrained answer too (SmolLM2 ends its turns with <|im_end|>,
        # which is not its EOS), so the mask lets all of them through once the grammar is complete.
        ends = [token for token in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, token)]
        with warnings.catch_warnings():
            # llguidance 1.9 reads token attributes through llama_cpp's deprecated llama_token_get_attr (the same
            # call as llama_vocab_get_attr); the warning is about its code, not ours.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer: LLTokenizer = lltokenizer_from_vocab(
                vocab, eos_token=ends or None, slices=None if token_slices else []
            )
        self.n_vocab = n_vocab

    def json_schema(self, schema: Mapping[str, Any] | None) -> str:
        """llguidance's grammar of JSON valid against ``schema``; any JSON object when ``schema`` is None."""
        try:
            grammar = LLMatcher.grammar_from_json_schema(
                json.dumps(ANY_OBJECT if schema is None else schema),
                overrides=dict(JSON_OPTIONS),  # type: ignore[arg-type]
            )
        except ValueError as exc:
            raise InvalidRequestError(f"the JSON schema could not be turned into a grammar: {exc}") from None
        self._check(grammar, "the JSON schema")
        return grammar

    def gbnf(self, text: str) -> str:
        """llguidance's grammar of a GBNF text that llama.cpp has parsed (root rule ``root``)."""
        try:
            lark = gbnf_to_lark(text)
        except Exception as exc:  # the converter raises bare Exceptions for grammar errors
            raise InvalidRequestError(f"the GBNF grammar could not be converted: {exc}") from None
        grammar = LLMatcher.grammar_from_lark(lark)
        self._check(grammar, "the GBNF grammar")
        return grammar

    def _check(self, grammar: str, what: str) -> None:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidRequestError(f"{what} cannot be enforced: {messages[0] if messages else 'invalid'}")

    def matcher(self, grammar: str) -> LLMatcher:
        """A new matcher at the start of ``grammar`` (checked by json_schema or gbnf: it starts without error)."""
        return LLMatcher(self.tokenizer, grammar, log_level=0)
