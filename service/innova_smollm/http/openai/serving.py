"""The OpenAI API mapped onto the service: requests to options and messages, outcomes to answers and stream chunks.

Decisions a caller may need to know are in :mod:`innova_smollm.http.openai.protocol`'s docstring.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import msgspec

from innova_smollm.core.schema import OutputConstraint
from innova_smollm.core.service import (
    Choice,
    Chunk,
    ModelService,
    Outcome,
    Prepared,
    RequestOptions,
    joined_by_choice,
)
from innova_smollm.core.types import ChatMessage, FinishReason, TokenLogprob
from innova_smollm.errors import InvalidRequestError
from innova_smollm.http.constraints import constraint_of, logit_bias_of
from innova_smollm.http.errors import ErrorFormat, openai_error
from innova_smollm.http.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ContentPart,
    Delta,
    FunctionCall,
    FunctionDelta,
    OpenAIFinishReason,
    Sampling,
    TokenLogprobOut,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from innova_smollm.http.openai.tools import (
    ParsedCall,
    TemplateTools,
    ToolPlan,
    may_be_a_call,
    parse_call,
    plan_tools,
    render_messages,
)
from innova_smollm.http.streaming import frame

DONE = b"data: [DONE]\n\n"


#: Per refused field, the values that ask for nothing (and so may be sent), and what the refusal says.
_HARMLESS: dict[str, tuple[tuple[object, ...], str]] = {
    "functions": ((None, []), "function calls are not supported"),
    "function_call": ((None, "none"), "function calls are not supported"),
    "audio": ((None,), "this model reads and writes text only"),
    "modalities": ((None, ["text"]), "this model writes text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "this model does not reason before answering"),
    "verbosity": ((None,), "verbosity is not supported"),
    "web_search_options": ((None,), "this server does not search the web"),
    "echo": ((None, False), "echoing the prompt is not supported"),
    "best_of": ((None, 1), "the server does not pick the best of several answers (n returns them all)"),
    "suffix": ((None, ""), "insertion (suffix) is not supported"),
}

#: The same for fields of a message.
_HARMLESS_IN_MESSAGES: dict[str, tuple[tuple[object, ...], str]] = {
    "refusal": ((None,), "refusals are not supported"),
    "audio": ((None,), "this model reads text only"),
    "function_call": ((None,), "function calls are not supported"),
}


def _refuse_what_is_asked(owner: object, rules: dict[str, tuple[tuple[object, ...], str]], prefix: str = "") -> None:
    for name, (harmless, why) in rules.items():
        value = getattr(owner, name, None)
        if not any(value == ok and type(value) is type(ok) for ok in harmless):
            raise InvalidRequestError(f"{prefix}{name}={value!r} is not supported: {why}", field=f"{prefix}{name}")


def tool_plan_of(request: ChatCompletionRequest, template: TemplateTools | None = None) -> ToolPlan | None:
    """``template``: the model's chat template when it knows tools (:func:`.tools.template_tools`)."""
    return plan_tools(request.tools, request.tool_choice, template)


def _logprobs_of(request: Sampling) -> int | None:
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", field="top_logprobs")
        return (request.top_logprobs or 0) if request.logprobs else None
    assert isinstance(request, CompletionRequest)
    return request.logprobs


def options_of(request: Sampling, plan: ToolPlan | None = None) -> RequestOptions:
    _refuse_what_is_asked(request, _HARMLESS)
    n = request.n or 1
    if n > 1 and plan is not None and plan.active:
        raise InvalidRequestError(
            f"n={n} cannot be combined with tools: an answer that may be a tool call has one choice", field="n"
        )
    if isinstance(request, ChatCompletionRequest):
        for index, message in enumerate(request.messages):
            _refuse_what_is_asked(message, _HARMLESS_IN_MESSAGES, f"messages[{index}].")
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    defaults = RequestOptions()
    return RequestOptions(
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        top_k=defaults.top_k if request.top_k is None else request.top_k,
        min_p=defaults.min_p if request.min_p is None else request.min_p,
        repeat_penalty=defaults.repeat_penalty if request.repeat_penalty is None else request.repeat_penalty,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        logit_bias=logit_bias_of(request.logit_bias),
        stop=tuple(stop),
        seed=None if request.seed is None else request.seed % 2**32,
        constraint=_constraint(request, plan),
        logprobs=_logprobs_of(request),
        n=n,
    )


def _constraint(request: Sampling, plan: ToolPlan | None) -> OutputConstraint | None:
    constraint = constraint_of(request.response_format)
    if plan is None or not plan.forced:
        return constraint
    if constraint is not None:
        raise InvalidRequestError(
            "response_format cannot constrain an answer that must be a tool call (tool_choice required or named)",
            field="response_format",
        )
    return plan.constraint()


def messages_of(
    request: ChatCompletionRequest, plan: ToolPlan | None = None, template: TemplateTools | None = None
) -> list[ChatMessage]:
    for index, message in enumerate(request.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError("a tool message needs tool_call_id", field=f"messages[{index}].tool_call_id")
        if message.role != "tool" and message.tool_call_id is not None:
            raise InvalidRequestError("tool_call_id belongs on tool messages", field=f"messages[{index}].tool_call_id")
        if message.role != "assistant" and message.tool_calls:
            raise InvalidRequestError("tool_calls belong on assistant messages", field=f"messages[{index}].tool_calls")
    texts = [_text_of(m.content, index) for index, m in enumerate(request.messages)]
    return render_messages(request.messages, plan, texts, template)


def _text_of(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part_index, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"content part of type {part.type!r} is not supported: this model reads text parts only",
                field=f"messages[{index}].content[{part_index}]",
            )
        texts.append(part.text)
    return "".join(texts)


def prompt_of(request: CompletionRequest) -> str:
    if isinstance(request.prompt, str):
        return request.prompt
    if len(request.prompt) != 1:
        raise InvalidRequestError(
            f"prompt holds {len(request.prompt)} strings: this server completes exactly one prompt per request",
            field="prompt",
        )
    return request.prompt[0]


_FINISH_REASONS: dict[FinishReason, OpenAIFinishReason] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.TIMEOUT: "length",
    FinishReason.CANCELLED: "stop",
}


def finish_reason_of(reason: FinishReason) -> OpenAIFinishReason:
    return _FINISH_REASONS[reason]


def _token_text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs_of(entries: Sequence[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if entries is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=_token_text(entry.token),
                logprob=entry.logprob,
                bytes=list(entry.token),
                top_logprobs=[
                    TopLogprob(token=_token_text(token), logprob=logprob, bytes=list(token))
                    for token, logprob in entry.top
                ],
            )
            for entry in entries
        ]
    )


def completion_logprobs_of(entries: Sequence[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    """OpenAI's legacy logprobs; ``offset``: where the first token's text starts in the answer (streamed chunks)."""
    if entries is None:
        return None
    tokens = [_token_text(entry.token) for entry in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[{_token_text(token): logprob for token, logprob in entry.top} for entry in entries],
        text_offset=offsets,
    )


def usage_of(outcome: Outcome) -> Usage:
    # The prompt was decoded once whatever n is; the completion tokens are all choices'.
    return Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
    )


def choices_of(outcome: Outcome) -> tuple[Choice, ...]:
    return outcome.choices or (
        Choice(
            index=0,
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            completion_tokens=outcome.completion_tokens,
            logprobs=outcome.logprobs,
        ),
    )


class Answer:
    """One answer's id, creation time and model name, shared by all of its stream chunks.

    A stream sends each token's log probabilities in the chunk that carries its text (as OpenAI does); those of
    tokens whose text never came (a stop string cut it) ride on the choice's last chunk, the one with
    ``finish_reason``. ``sent`` counts, by choice, the entries already sent.
    """

    prefix = "answer"

    def __init__(self, model: str) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self._sent_logprobs: dict[int, int] = {}

    def _chunk_logprobs(self, chunk: Chunk) -> Sequence[TokenLogprob] | None:
        if chunk.logprobs is not None:
            self._sent_logprobs[chunk.choice] = self._sent_logprobs.get(chunk.choice, 0) + len(chunk.logprobs)
        return chunk.logprobs

    def _unsent_logprobs(self, choice: Choice) -> Sequence[TokenLogprob] | None:
        if not choice.logprobs:
            return None
        unsent = choice.logprobs[self._sent_logprobs.get(choice.index, 0) :]
        return unsent or None


class ChatAnswer(Answer):
    """A chat answer; with tools offered, the text may turn out a tool call (see :mod:`.tools`; one choice only)."""

    prefix = "chatcmpl"

    def __init__(self, model: str, plan: ToolPlan | None = None, n: int = 1) -> None:
        super().__init__(model)
        self._n = n
        self._plan = plan if plan is not None and plan.active else None
        #: Streamed text held back while it may still be a tool call, and its tokens' log probabilities.
        self._held: list[Chunk] | None = [] if self._plan is not None else None

    def _call(self, choice: Choice) -> ParsedCall | None:
        if self._plan is None or choice.finish_reason is not FinishReason.STOP:
            return None
        return parse_call(choice.text, self._plan)

    def whole(self, outcome: Outcome) -> ChatCompletion:
        choices = []
        for choice in choices_of(outcome):
            call = self._call(choice)
            if call is None:
                message = AssistantMessage(content=choice.text)
                reason = finish_reason_of(choice.finish_reason)
            else:
                tool_call = ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                message, reason = AssistantMessage(content=None, tool_calls=[tool_call]), "tool_calls"
            choices.append(
                ChatChoice(
                    index=choice.index,
                    message=message,
                    finish_reason=reason,
                    logprobs=chat_logprobs_of(choice.logprobs),
                )
            )
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_of(outcome)
        )

    def opening(self) -> list[ChatCompletionChunk]:
        # OpenAI opens a stream with the role, then sends content deltas, then an empty delta with finish_reason.
        return [
            self._chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
            for index in range(self._n)
        ]

    def text(self, chunk: Chunk) -> ChatCompletionChunk | None:
        if self._held is not None:
            self._held.append(chunk)
            held = "".join(part.text for part in self._held)
            if may_be_a_call(held):
                return None  # sent as a call or as text once the answer is complete
            chunk = joined_by_choice(self._held)[0]
            self._held = None
        logprobs = chat_logprobs_of(self._chunk_logprobs(chunk))
        return self._chunk([ChunkChoice(index=chunk.choice, delta=Delta(content=chunk.text), logprobs=logprobs)])

    def closing_chunks(self, outcome: Outcome) -> list[ChatCompletionChunk]:
        chunks = []
        for choice in choices_of(outcome):
            call = self._call(choice) if self._held is not None else None
            if call is not None:
                # OpenAI's shape: the call's id, type and name first, then its arguments.
                head = ToolCallDelta(index=0, id=call.id, type="function", function=FunctionDelta(name=call.name))
                arguments = ToolCallDelta(index=0, function=FunctionDelta(arguments=call.arguments))
                chunks.append(self._chunk([ChunkChoice(index=choice.index, delta=Delta(tool_calls=[head]))]))
                chunks.append(self._chunk([ChunkChoice(index=choice.index, delta=Delta(tool_calls=[arguments]))]))
                reason: OpenAIFinishReason = "tool_calls"
            else:
                if self._held:
                    held = joined_by_choice(self._held)[0]
                    logprobs = chat_logprobs_of(self._chunk_logprobs(held))
                    delta = Delta(content=held.text)
                    chunks.append(self._chunk([ChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)]))
                reason = finish_reason_of(choice.finish_reason)
            self._held = None
            last = ChunkChoice(
                index=choice.index,
                delta=Delta(),
                finish_reason=reason,
                logprobs=chat_logprobs_of(self._unsent_logprobs(choice)),
            )
            chunks.append(self._chunk([last]))
        return chunks

    def usage(self, outcome: Outcome) -> ChatCompletionChunk:
        return self._chunk([], usage_of(outcome))

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


class CompletionAnswer(Answer):
    prefix = "cmpl"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        #: By choice, the characters of text sent so far (where the next chunk's text_offset starts).
        self._offsets: dict[int, int] = {}

    def whole(self, outcome: Outcome) -> Completion:
        choices = [
            CompletionChoice(
                index=choice.index,
                text=choice.text,
                finish_reason=finish_reason_of(choice.finish_reason),
                logprobs=completion_logprobs_of(choice.logprobs),
            )
            for choice in choices_of(outcome)
        ]
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_of(outcome))

    def opening(self) -> list[Completion]:
        return []

    def text(self, chunk: Chunk) -> Completion:
        offset = self._offsets.get(chunk.choice, 0)
        logprobs = completion_logprobs_of(self._chunk_logprobs(chunk), offset)
        self._offsets[chunk.choice] = offset + len(chunk.text)
        return self._chunk(chunk.choice, chunk.text, None, logprobs=logprobs)

    def closing_chunks(self, outcome: Outcome) -> list[Completion]:
        return [
            self._chunk(
                choice.index,
                "",
                finish_reason_of(choice.finish_reason),
                logprobs=completion_logprobs_of(self._unsent_logprobs(choice), self._offsets.get(choice.index, 0)),
            )
            for choice in choices_of(outcome)
        ]

    def usage(self, outcome: Outcome) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage_of(outcome))

    def _chunk(
        self,
        index: int,
        text: str,
        finish_reason: OpenAIFinishReason | None,
        logprobs: CompletionLogprobs | None = None,
    ) -> Completion:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])


class OpenAIWire:
    """An answer's framing as :class:`innova_smollm.http.streaming.Wire` wants it: ``data:`` chunks, then
    ``data: [DONE]``; a failure after the 200 travels as a ``data: {"error"}`` chunk before ``[DONE]``."""

    def __init__(self, answer: ChatAnswer | CompletionAnswer, *, include_usage: bool) -> None:
        # An instance attribute: a function kept on the class would be bound to the instance when looked up.
        self.error_format: ErrorFormat = openai_error
        self._answer = answer
        self._include_usage = include_usage

    def whole(self, outcome: Outcome) -> msgspec.Struct:
        return self._answer.whole(outcome)

    def opening(self) -> Sequence[bytes]:
        return [frame(None, chunk) for chunk in self._answer.opening()]

    def text(self, chunk: Chunk) -> bytes:
        framed = self._answer.text(chunk)
        return b"" if framed is None else frame(None, framed)

    def closing(self, outcome: Outcome) -> Sequence[bytes]:
        frames = [frame(None, chunk) for chunk in self._answer.closing_chunks(outcome)]
        if self._include_usage:
            frames.append(frame(None, self._answer.usage(outcome)))
        return [*frames, DONE]

    def failure(self, error_body: object) -> Sequence[bytes]:
        return [frame(None, error_body), DONE]


def served_model(service: ModelService) -> str:
    meta = service.metadata()
    return meta.name if meta is not None else service.settings.model_name


def model_name(service: ModelService, prepared: Prepared) -> str:
    return str(service.model_info(prepared.source)["model_name"])


def model_created(service: ModelService) -> int:
    try:
        return int(service.settings.model_path.stat().st_mtime)
    except OSError:
        return 0
