"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

They run on the same service as the native routes (same engine, admission queue, limits and cancellation) through
the same serving helper (:func:`innova_smollm.http.streaming.answer`); only the wire shapes differ. Errors under
``/v1`` answer in OpenAI's shape (:mod:`innova_smollm.http.errors` chooses the format by path).
"""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Controller, Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK

from innova_smollm.core.service import ModelService
from innova_smollm.http.openai import protocol as oai
from innova_smollm.http.openai.serving import (
    ChatAnswer,
    CompletionAnswer,
    OpenAIWire,
    messages_of,
    model_created,
    model_name,
    options_of,
    prompt_of,
    served_model,
    tool_plan_of,
)
from innova_smollm.http.openai.tools import template_tools
from innova_smollm.http.requestlog import note
from innova_smollm.http.streaming import answer


class OpenAIController(Controller):
    path = "/"
    tags = ["openai"]

    @post(
        "/chat/completions",
        summary="Chat completion (OpenAI-compatible)",
        description="The OpenAI Chat Completions API for the local model, with response_format (JSON, JSON schema) and "
        "tools. Unknown fields and fields asking for what this server does not do are 400s naming them; metadata "
        "(`model`, `user`, `metadata`, ...) is ignored; `stream: true` answers as SSE `data:` chunks ending with "
        "`data: [DONE]`.",
        status_code=HTTP_200_OK,
    )
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[oai.ChatCompletionRequest],
        service: NamedDependency[ModelService],
    ) -> oai.ChatCompletion | Response[Any]:
        template = template_tools(service.chat_template())
        plan = tool_plan_of(data, template)
        messages = messages_of(data, plan, template)
        options = options_of(data, plan)
        note(request.scope, messages=[{"role": m.role, "content": m.content} for m in messages])
        tools = plan.template_tools() if plan is not None else None
        # Rendering the template and tokenizing a long conversation is CPU work: keep it off the event loop.
        prepared = await anyio.to_thread.run_sync(service.prepare_chat, messages, options, tools)
        chat_answer = ChatAnswer(model_name(service, prepared), plan, n=prepared.n)
        wire = OpenAIWire(chat_answer, include_usage=data.include_usage)
        result: oai.ChatCompletion | Response[Any] = await answer(request, service, prepared, wire, stream=data.stream)
        return result

    @post(
        "/completions",
        summary="Text completion (OpenAI-compatible, legacy)",
        description="Continues `prompt` as raw text, without the chat template. Same conventions as chat.",
        status_code=HTTP_200_OK,
    )
    async def completions(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[oai.CompletionRequest],
        service: NamedDependency[ModelService],
    ) -> oai.Completion | Response[Any]:
        prompt = prompt_of(data)
        options = options_of(data)
        note(request.scope, prompt=prompt)
        prepared = await anyio.to_thread.run_sync(service.prepare_generate, prompt, options)
        wire = OpenAIWire(CompletionAnswer(model_name(service, prepared)), include_usage=data.include_usage)
        result: oai.Completion | Response[Any] = await answer(request, service, prepared, wire, stream=data.stream)
        return result

    @get("/models", summary="The served model (OpenAI-compatible)", sync_to_thread=False)
    def models(self, service: NamedDependency[ModelService]) -> oai.ModelList:
        return oai.ModelList(data=[oai.Model(id=served_model(service), created=model_created(service))])


router = Router(path="/v1", route_handlers=[OpenAIController])
