"""Tool calls on ``/v1/chat/completions``: the prompt that describes the tools, the grammar that forces a call, and
the answer read back as OpenAI's ``tool_calls``. Pure: no I/O, no llama_cpp.

**Which prompt.** A model whose own chat template knows tools gets its template's tool prompt; any other model gets
the documented generic prompt. A template *knows tools* when Jinja finds ``tools`` among the variables it reads from
the caller (``jinja2.meta.find_undeclared_variables``), and it writes a call as a bare JSON object: a template that
wraps calls in tags (``<tool_call>``, ``[TOOL_CALLS]``) gets the generic prompt, since this module reads and forces
bare objects only. The call's arguments key is the one the template asks for: ``parameters`` when its text writes a
``"parameters":`` key (Llama 3.1 and 3.2: ``{"name": function name, "parameters": dictionary of argument name and
its value}``), else ``arguments``. Of the bundled models, Llama-3.2-3B-Instruct's template knows tools; SmolLM2's and
Gemma 3's do not. (:func:`template_tools` decides.)

**With the model's template.** The tools go to the template as its ``tools`` variable, in OpenAI's shape
(``{"type": "function", "function": {"name", "description", "parameters"}}``); Llama 3.2's writes them, with its
instructions, into the first user message. The history goes through the template too: an assistant turn's
``tool_calls`` as ``{"id", "type", "function": {"name", "arguments"}}`` with the arguments parsed into an object,
and a ``role: "tool"`` turn as a ``tool`` message with its ``tool_call_id`` (Llama 3.2's template writes it as an
``ipython`` turn; a result that is a JSON object or array is passed parsed, so the template writes it as JSON, not
as a quoted string). What the template refuses is a 400 naming ``messages``: Llama 3.2's takes one call per
assistant turn, and with tools needs a user message to put them in.

**The generic prompt.** A system message (appended to the conversation's first system message when there is one)
listing each tool as ``{"name", "description", "parameters"}`` and asking for a call as one JSON object,
``{"name": "<tool>", "arguments": {...}}``. Earlier calls in the history (assistant ``tool_calls``) are rendered as
those same JSON objects, and ``role: "tool"`` results as user messages ``Result of <name>: <content>``.

**tool_choice.** ``none``: the tools are not described and the answer is text. ``auto``: the answer is free; when it
is exactly such a JSON object naming a tool (a ```json fence around it is allowed; either key, ``arguments`` or
``parameters``, is read) it becomes a tool call, otherwise it is text (the arguments are not constrained: a small
model may answer in text). ``required`` and a named function: the answer is constrained by a grammar to a call of one
of the tools (of that one), in the shape the prompt asked for (``{"name", "parameters"}`` for Llama 3.2,
``{"name", "arguments"}`` otherwise), with the arguments valid against the function's ``parameters`` schema, so it
always parses; a schema the grammar cannot enforce is a 400 naming ``tools[i].function.parameters``. The template
never hears of ``tool_choice``: the grammar is what forces the call. One call per answer (``parallel_tool_calls`` is
accepted: one call is within it).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox

from innova_smollm.core.schema import DEFINITIONS, OutputConstraint, check_schema, json_schema_constraint
from innova_smollm.core.types import ChatMessage, TemplateToolCall
from innova_smollm.errors import InvalidRequestError

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

#: The key of a call's arguments in the generic prompt (OpenAI's name for them).
GENERIC_ARGUMENTS_KEY = "arguments"
#: ``"parameters":`` written in a template's text, its quotes possibly escaped inside a Jinja string.
_PARAMETERS_KEY = re.compile(r'\\?"parameters\\?"\s*:')
#: Templates that wrap a call in tags: their calls are not the bare JSON objects this module reads and forces.
_CALL_WRAPPERS = ("<tool_call>", "[TOOL_CALLS]")


@dataclass(frozen=True, kw_only=True)
class TemplateTools:
    """A chat template that knows tools, and the key under which it asks for a call's arguments."""

    arguments_key: str


@functools.lru_cache(maxsize=8)
def template_tools(template: str | None) -> TemplateTools | None:
    """Whether ``template`` knows tools (see the module docstring), and how it asks for a call; None: it does not,
    and the generic prompt describes the tools."""
    if not template or any(wrapper in template for wrapper in _CALL_WRAPPERS):
        return None
    # Parsed, never rendered here: the engine's formatter renders it (sandboxed, as llama.cpp's Python binding does).
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        variables = jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError:
        return None  # the engine's formatter parses it with more extensions; this one only asks about tools
    if "tools" not in variables:
        return None
    key = "parameters" if _PARAMETERS_KEY.search(template) else GENERIC_ARGUMENTS_KEY
    return TemplateTools(arguments_key=key)


@dataclass(frozen=True, kw_only=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class ToolPlan:
    """What a request with tools asks for: which tools the prompt lists, and whether a call is forced."""

    tools: tuple[ToolSpec, ...]
    #: ``none``, ``auto``, ``required`` or ``named``.
    choice: str
    #: The tools a call may name (all of them, or the named one).
    callable: tuple[ToolSpec, ...]
    #: The model's template, when it knows tools; None: the generic prompt.
    template: TemplateTools | None = None

    @property
    def arguments_key(self) -> str:
        """Where the prompt asks for a call's arguments, and so where a forced call puts them."""
        return self.template.arguments_key if self.template is not None else GENERIC_ARGUMENTS_KEY

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the model's template takes them (OpenAI's shape); None when the template gets none."""
        if self.template is None or not self.active:
            return None
        listed = []
        for tool in self.tools:
            function: dict[str, Any] = {"name": tool.name}
            if tool.description:
                function["description"] = tool.description
            function["parameters"] = dict(tool.parameters)
            listed.append({"type": "function", "function": function})
        return listed

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def constraint(self) -> OutputConstraint | None:
        """The grammar's schema when a call is forced: one object ``{"name", <arguments key>}`` per callable tool."""
        if not self.forced:
            return None
        hoisted: dict[str, dict[str, Any]] = {}
        alternatives = []
        for tool in self.callable:
            parameters = dict(tool.parameters)
            for container in DEFINITIONS:
                definitions = hoisted.setdefault(container, {})
                for name, definition in (parameters.pop(container, None) or {}).items():
                    if definitions.get(name, definition) != definition:
                        raise InvalidRequestError(
                            f"tools define {container}/{name} differently: a forced tool call cannot use both",
                            field="tools",
                        )
                    definitions[name] = definition
            key = self.arguments_key
            alternatives.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": tool.name}, key: parameters},
                    "required": ["name", key],
                    "additionalProperties": False,
                }
            )
        schema: dict[str, Any] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        # A tool's $refs point at #/$defs/...: the definitions move to the root of the call's schema.
        schema = {**schema, **{container: found for container, found in hoisted.items() if found}}
        return json_schema_constraint(schema, field="tool_choice")


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any, template: TemplateTools | None = None) -> ToolPlan | None:
    """Check ``tools`` and ``tool_choice`` (wire structs already type-checked) into a plan; None without tools.

    ``template``: the model's template when it knows tools (:func:`template_tools`), else None."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", field="tool_choice")
        return None
    specs = []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        function = tool.function
        if function.name in seen:
            raise InvalidRequestError(f"two tools are named {function.name!r}", field=f"tools[{index}].function.name")
        seen.add(function.name)
        parameters = function.parameters if function.parameters is not None else {"type": "object", "properties": {}}
        # Checked even when no call is forced: a schema the grammar cannot enforce is refused, not half-honoured.
        check_schema(parameters, field=f"tools[{index}].function.parameters")
        specs.append(ToolSpec(name=function.name, description=function.description, parameters=parameters))
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        return ToolPlan(tools=tuple(specs), choice=choice, callable=tuple(specs), template=template)
    named = [spec for spec in specs if spec.name == choice.function.name]
    if not named:
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, which is not among the tools", field="tool_choice"
        )
    return ToolPlan(tools=tuple(specs), choice="named", callable=tuple(named), template=template)


def tools_prompt(plan: ToolPlan) -> str:
    lines = ["You can call these tools:"]
    for tool in plan.tools:
        entry: dict[str, Any] = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        entry["parameters"] = tool.parameters
        lines.append(json.dumps(entry, ensure_ascii=False))
    lines.append(
        'To call a tool, answer with only one JSON object, {"name": "<tool name>", "arguments": {...}}, '
        "whose arguments follow the tool's parameters."
    )
    if plan.choice == "auto":
        lines.append("If no tool is needed, answer in plain text.")
    elif plan.choice == "required":
        lines.append("You must call one of these tools now.")
    else:
        lines.append(f"You must call the tool {plan.callable[0].name} now.")
    return "\n".join(lines)


def render_messages(
    messages: Sequence[Any], plan: ToolPlan | None, texts: Sequence[str], template: TemplateTools | None = None
) -> list[ChatMessage]:
    """The conversation for the chat template. With a ``template`` that knows tools, tool calls and tool results
    stay structured for it (the tools themselves reach it through :meth:`ToolPlan.template_tools`); otherwise they
    are written out as text, and the tools' description is a generic system message when tools are offered.

    ``messages`` are the wire messages; ``texts`` their content already read as text.
    """
    if template is not None:
        return [_structured(message, text) for message, text in zip(messages, texts, strict=True)]
    names_by_id: dict[str, str] = {}
    rendered: list[ChatMessage] = []
    for message, text in zip(messages, texts, strict=True):
        role = "system" if message.role == "developer" else message.role
        if role == "assistant" and message.tool_calls:
            calls = []
            for call in message.tool_calls:
                names_by_id[call.id] = call.function.name
                try:
                    arguments: Any = json.loads(call.function.arguments)
                except ValueError:
                    arguments = call.function.arguments
                calls.append(json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False))
            text = "\n".join([text, *calls] if text else calls)
        elif role == "tool":
            name = names_by_id.get(message.tool_call_id or "", message.tool_call_id or "a tool")
            role, text = "user", f"Result of {name}: {text}"
        rendered.append(ChatMessage(role=role, content=text))
    if plan is not None and plan.active:
        prompt = tools_prompt(plan)
        if rendered and rendered[0].role == "system":
            rendered[0] = ChatMessage(role="system", content=f"{rendered[0].content}\n\n{prompt}")
        else:
            rendered.insert(0, ChatMessage(role="system", content=prompt))
    return rendered


def _structured(message: Any, text: str) -> ChatMessage:
    role = "system" if message.role == "developer" else message.role
    calls = tuple(
        TemplateToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
        for call in message.tool_calls or ()
    )
    return ChatMessage(role=role, content=text, tool_calls=calls, tool_call_id=message.tool_call_id)


@dataclass(frozen=True, kw_only=True)
class ParsedCall:
    id: str
    name: str
    arguments: str


def parse_call(text: str, plan: ToolPlan) -> ParsedCall | None:
    """The tool call an answer makes, or None when it is text (``auto``) or does not parse."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) - {"name", "arguments", "parameters"}:
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if (
        not isinstance(name, str)
        or name not in {tool.name for tool in plan.callable}
        or not isinstance(arguments, dict)
    ):
        return None
    return ParsedCall(
        id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=json.dumps(arguments, ensure_ascii=False)
    )


def may_be_a_call(prefix: str) -> bool:
    """Whether an answer starting with ``prefix`` (some text already) could still turn out a tool call; a stream
    holds its text back while it could, and streams it live once it cannot."""
    start = prefix.lstrip()
    return start[:1] in ("{", "`") or not start
