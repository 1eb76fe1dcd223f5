"""The production shape (Llama-3.2-3B-Instruct Q4_K_M, random weights) loads, renders, tokenizes and sizes its KV.

Seconds when the model is cached (``.venv/bin/python scripts/fetch_model.py llama32-3b-shape`` builds it in
minutes); skipped when it is not, unless this tier is selected (``pytest -m production_shape``), which builds it.
Its answers are noise: nothing here looks at what it generates, only at what the shape decides.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import production_shape as ps  # scripts/ is not a package
from innova_smollm.engine.scheduler import GGUFEngine
from tests.servers import LiveServer, make_settings, serve_in_thread

pytestmark = [pytest.mark.system, pytest.mark.production_shape, pytest.mark.timeout(1800)]

BOS, START_HEADER, END_HEADER, EOT = 128000, 128006, 128007, 128009
#: The unit tier's copy of Llama 3.2's template (tests/unit/test_tools.py renders tools with it).
TEMPLATE_FIXTURE = Path(__file__).resolve().parents[1] / "unit" / "data" / "llama-3.2-3b-instruct.jinja"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        # An enum keeps the forced call a few tokens long whatever the noise model prefers.
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]},
    },
}
SYSTEM, USER, ASSISTANT, DOUBLE_NEWLINE = 9125, 882, 78191, 271


@pytest.fixture(scope="module")
def shape_model(request: pytest.FixtureRequest) -> Path:
    # Size and record only: the sha256 of 2 GB is fetch_model.py's job, and this tier should take seconds.
    cached = ps.cached_model(verify_sha256=False)
    if cached is not None:
        return cached
    if "production_shape" not in (request.config.option.markexpr or ""):
        pytest.skip(
            "the production-shaped model is not built: run `.venv/bin/python scripts/fetch_model.py "
            "llama32-3b-shape` (minutes), or select this tier with `-m production_shape` to build it"
        )
    return ps.build(ps.default_cache_dir())


@pytest.fixture(scope="module")
def vocab(shape_model: Path) -> Iterator[Any]:
    """The model's tokenizer and metadata only (``vocab_only``): no weights are read."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(shape_model), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def test_the_file_is_the_production_size_and_passes_check_model(shape_model: Path) -> None:
    size = shape_model.stat().st_size
    assert abs(size - ps.REAL_FILE_SIZE) <= ps.SIZE_TOLERANCE, size
    meta = ps.run_check_model(shape_model)
    assert meta.get("architecture") == "llama"
    assert meta.get("quantization") == "Q4_K_M"
    assert meta.get("vocab_size") == 128256
    assert meta.get("parameters") == ps.parameter_count(ps.tensor_table())
    assert meta.get("n_ctx_train") == 131072
    assert meta.get("has_chat_template") is True


def test_the_llama_3_2_template_renders_a_chat_into_its_header_tokens(vocab: Any) -> None:
    from llama_cpp import llama_chat_format

    template = vocab.metadata["tokenizer.chat_template"]
    assert template.startswith("{{- bos_token }}") and "<|start_header_id|>" in template
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>", add_generation_prompt=True
    )
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]
    prompt = formatter(messages=messages).prompt
    assert re.fullmatch(
        r"<\|begin_of_text\|><\|start_header_id\|>system<\|end_header_id\|>\n\n"
        r"Cutting Knowledge Date: December 2023\nToday Date: \d\d \w\w\w \d{4}\n\n"
        r"You are terse\.<\|eot_id\|>"
        r"<\|start_header_id\|>user<\|end_header_id\|>\n\nSay hello\.<\|eot_id\|>"
        r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n",
        prompt,
    ), prompt
    tokens = vocab.tokenize(prompt.encode(), add_bos=False, special=True)
    assert tokens[:5] == [BOS, START_HEADER, SYSTEM, END_HEADER, DOUBLE_NEWLINE]
    assert tokens[-5:] == [EOT, START_HEADER, ASSISTANT, END_HEADER, DOUBLE_NEWLINE]
    assert [tokens.count(t) for t in (BOS, START_HEADER, END_HEADER, EOT)] == [1, 3, 3, 2]
    assert USER in tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # From llama.cpp's own tokenizer test for this vocabulary (models/ggml-vocab-llama-bpe.gguf.inp/.out).
        ("Hello world", [9906, 1917]),
        (" Hello world", [22691, 1917]),
        ("Hello, world!", [9906, 11, 1917, 0]),
        (" this is 🦙.cpp", [420, 374, 11410, 99, 247, 13, 11055]),
        ("w048 7tuijk dsdfhu", [86, 23904, 220, 22, 83, 2005, 42908, 11729, 3013, 17156]),
    ],
)
def test_tokens_count_as_llama_3s_tokenizer_counts_them(vocab: Any, text: str, expected: list[int]) -> None:
    assert vocab.tokenize(text.encode(), add_bos=False, special=False) == expected
    assert vocab.tokenize(text.encode(), add_bos=True, special=False) == [BOS, *expected]


def test_special_tokens_are_llama_3_2_instructs(vocab: Any) -> None:
    assert vocab.n_vocab() == 128256
    assert (vocab.token_bos(), vocab.token_eos()) == (BOS, EOT)
    assert vocab.detokenize([EOT], special=True) == b"<|eot_id|>"


def test_kv_cache_bytes_per_cell_follow_the_shape(shape_model: Path) -> None:
    """28 layers x 8 KV heads x (128 + 128) x 2 bytes = 114,688 per cell, by the metadata and by the state size."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(shape_model), n_ctx=64, n_batch=64, n_threads=2, verbose=False)
    try:
        model, ctx = llama.model, llama.ctx
        n_layer, n_head_kv = llama_cpp.llama_model_n_layer(model), llama_cpp.llama_model_n_head_kv(model)
        head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
        assert (n_layer, n_head_kv, head_dim) == (28, 8, 128)
        per_cell = n_layer * n_head_kv * (head_dim + head_dim) * 2
        assert per_cell == ps.LLAMA32_3B.kv_bytes_per_cell() == 114_688
        # Measured: a sequence's saved state grows by one cell's K and V (plus its position) per token.
        tokens = [BOS, *range(1000, 1015)]
        llama.eval(tokens[:8])
        size_8 = llama_cpp.llama_state_seq_get_size(ctx, 0)
        llama.eval(tokens[8:])
        size_16 = llama_cpp.llama_state_seq_get_size(ctx, 0)
        grown = (size_16 - size_8) / 8
        assert per_cell <= grown <= per_cell + 16, grown
    finally:
        llama.close()


def test_the_unit_tiers_template_is_the_ggufs(vocab: Any) -> None:
    assert vocab.metadata["tokenizer.chat_template"] == TEMPLATE_FIXTURE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shape_server(shape_model: Path) -> Iterator[LiveServer]:
    settings = make_settings(shape_model, parallel=1, max_tokens=64)
    engine = GGUFEngine(settings)
    try:
        with serve_in_thread(settings, engine=engine) as server:
            yield server
    finally:
        engine.close()


def test_the_production_shape_takes_short_steps(shape_server: LiveServer) -> None:
    """The step rule for a model of 1B parameters and more: 128 tokens per decode call (a 57 MiB smaller compute
    buffer than 512, prefill as fast; engine/step_size.py)."""
    info = shape_server.get("/innova/api/smollm/info").json()
    assert info["parameters"] >= 3_000_000_000
    assert info["step_tokens"] == 128


def test_tools_go_through_llama_3_2s_template_and_a_forced_call_takes_its_shape(
    shape_server: LiveServer, vocab: Any
) -> None:
    """The service renders the tools, an earlier call and its result with the model's own template (the prompt it
    decodes has exactly the tokens of that rendering), and a forced call comes back parsed from the
    ``{"name", "parameters"}`` shape that template asks for."""
    from llama_cpp import llama_chat_format

    history: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 18}'},
        {"role": "user", "content": "And in Oslo?"},
    ]
    response = shape_server.post(
        "/v1/chat/completions",
        json={
            "messages": history,
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 48,
            "temperature": 0,
        },
        timeout=900,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    # What Hugging Face and llama.cpp hand the template: the call's arguments as an object, the result as sent.
    as_template_takes_it = [
        history[0],
        {**history[1], "tool_calls": [{**history[1]["tool_calls"][0], "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {**history[2], "content": {"celsius": 18}},
        history[3],
    ]  # fmt: skip
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=vocab.metadata["tokenizer.chat_template"], eos_token="<|eot_id|>", bos_token="<|begin_of_text|>"
    )
    prompt = formatter(messages=as_template_takes_it, tools=[WEATHER_TOOL]).prompt
    assert "Given the following functions" in prompt and "<|start_header_id|>ipython<|end_header_id|>" in prompt
    expected = vocab.tokenize(prompt.encode(), add_bos=False, special=True)
    assert body["usage"]["prompt_tokens"] == len(expected)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
