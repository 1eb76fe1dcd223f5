"""Warm prompts (SMOLLM_WARM_PROMPTS): prompt starts decoded at start-up, whose KV states every request beginning with
them gets back instead of decoding them, with the real engine and model behind real uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from innova_smollm.core.types import ChatMessage
from innova_smollm.engine.saved_states import common_prefix_length
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.errors import ModelLoadError
from innova_smollm.settings import WarmKind, WarmPrompt
from tests.servers import API, LiveServer, make_settings, serve_in_thread

SYSTEM = (
    "You are the KORYXA assistant. You read a need described by a small business and propose up to three concrete "
    "actions, each with a short reason. Answer briefly, in plain words, and never invent figures."
)
TEXT_START = "Here is a list of useful kitchen tools, one per line, each with what it is for:\n"
QUESTIONS = ("Name a fruit.", "What is rain?", "Say hi to me.")
#: How far the first answer token's log probabilities may move when the prefix was decoded in another batch shape
#: (the last bits of a logit; measured a few hundredths), as in tests/integration/test_shared_prefixes.py.
LOGPROB_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def warm_engine(model_path: Path) -> Iterator[GGUFEngine]:
    warm = (WarmPrompt(WarmKind.SYSTEM, SYSTEM), WarmPrompt(WarmKind.TEXT, TEXT_START))
    loaded = GGUFEngine(make_settings(model_path, parallel=2, warm_prompts=warm))
    yield loaded
    loaded.close()


def chat(server: LiveServer, question: str) -> dict[str, float]:
    """Ask ``question`` after SYSTEM; returns the first answer token's five most likely tokens and log probabilities."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    body = {"messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    reply = server.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    first = reply.json()["choices"][0]["logprobs"]["content"][0]
    return {entry["token"]: float(entry["logprob"]) for entry in first["top_logprobs"]}


def assert_same_distribution(warm: dict[str, float], cold: dict[str, float]) -> None:
    """The first token's distribution over warm cells is the one decoded from nothing, within LOGPROB_TOLERANCE; a
    wrong or misplaced cell would give another distribution altogether. (Greedy text is too fragile to compare:
    one near-tie, and a batch shape's last bits pick the other word.)"""
    both = warm.keys() & cold.keys()
    assert len(both) >= 4, (warm, cold)
    assert all(abs(warm[token] - cold[token]) < LOGPROB_TOLERANCE for token in both), (warm, cold)


def warm_system_tokens(engine: GGUFEngine) -> int:
    """How many tokens every conversation with SYSTEM shares, whatever its question."""
    rendered = [
        engine.tokenize_chat([ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=q)])
        for q in QUESTIONS
    ]
    return min(common_prefix_length(rendered[0], other) for other in rendered[1:])


def test_a_warm_system_prompt_spares_every_conversation_that_starts_with_it(
    warm_engine: GGUFEngine, engine: GGUFEngine, model_path: Path
) -> None:
    shared = warm_system_tokens(warm_engine)
    assert shared > 40, "the system prompt should be most of each prompt"
    assert warm_engine.prompt_tokens_prefilled == 0, "warming is not a request"
    with serve_in_thread(make_settings(model_path, parallel=2), engine=warm_engine) as server:
        warm_answers = []
        for question in QUESTIONS:
            reused, restored = warm_engine.prompt_tokens_reused, warm_engine.states_restored
            warm_answers.append(chat(server, question))
            assert warm_engine.prompt_tokens_reused - reused >= shared
            if question == QUESTIONS[0]:
                # Nothing ran before: the prefix can only have come from the warm state.
                assert warm_engine.states_restored == restored + 1
    with serve_in_thread(make_settings(model_path, parallel=2), engine=engine) as cold_server:
        cold_answers = [chat(cold_server, question) for question in QUESTIONS]
    for warm, cold in zip(warm_answers, cold_answers, strict=True):
        assert_same_distribution(warm, cold)


def test_a_warm_text_start_spares_generate_prompts_that_begin_with_it(
    warm_engine: GGUFEngine, model_path: Path
) -> None:
    start = len(warm_engine.tokenize(TEXT_START))
    with serve_in_thread(make_settings(model_path, parallel=2), engine=warm_engine) as server:
        for tool in ("whisk", "grater"):
            reused = warm_engine.prompt_tokens_reused
            reply = server.post(
                f"{API}/generate", json={"prompt": TEXT_START + f"- {tool}:", "max_tokens": 6, "temperature": 0}
            )
            assert reply.status_code == 200, reply.text
            # The start's last token may merge with what follows; all tokens before it come from the warm state.
            assert warm_engine.prompt_tokens_reused - reused >= start - 1


def test_the_warm_states_stay_after_other_prompts_took_every_sequence(
    warm_engine: GGUFEngine, model_path: Path
) -> None:
    with serve_in_thread(make_settings(model_path, parallel=2), engine=warm_engine) as server:
        for other in ("Count to five.", "Spell cat.", "Name a colour."):
            reply = server.post(f"{API}/chat", json={"messages": [{"role": "user", "content": other}], "max_tokens": 4})
            assert reply.status_code == 200
        reused, restored = warm_engine.prompt_tokens_reused, warm_engine.states_restored
        chat(server, "What is snow?")
    assert warm_engine.prompt_tokens_reused - reused >= warm_system_tokens(warm_engine)
    assert warm_engine.states_restored == restored + 1


def test_warm_prompts_that_do_not_fit_stop_start_up_with_what_to_change(model_path: Path) -> None:
    long_system = "You answer questions about kitchens. " * 40  # about 280 tokens: 6 MiB of KV for this model
    with pytest.raises(ModelLoadError, match="SMOLLM_PROMPT_CACHE_MB"):
        GGUFEngine(
            make_settings(model_path, prompt_cache_mb=1, warm_prompts=(WarmPrompt(WarmKind.SYSTEM, long_system),))
        )
    beyond_window = "word " * 1100  # past make_settings' n_ctx of 1024
    with pytest.raises(ModelLoadError, match=r"entry 0 \(text\) is \d+ tokens, more than the window"):
        GGUFEngine(make_settings(model_path, warm_prompts=(WarmPrompt(WarmKind.TEXT, beyond_window),)))
