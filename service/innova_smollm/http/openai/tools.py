"""Tool calls on ``/v1/chat/completions``: the prompt that describes the tools, the grammar that forces a call, and
the answer read back as OpenAI's ``tool_calls``. Pure: no I/O, no llama_cpp.

**Prompt.** Neither bundled model's chat template knows tools, so every model gets the same documented generic
prompt: a system message (appended to the conversation's first system message when there is one) listing each tool
as ``{"name", "description", "parameters"}`` and asking for a call as one JSON object,
``{"name": "<tool>", "arguments": {...}}``. Earlier calls in the history (assistant ``tool_calls``) are rendered as
those same JSON objects, and ``role: "tool"`` results as user messages ``Result of <name>: <content>``.

**tool_choice.** ``none``: the tools are not described and the answer is text. ``auto``: the answer is free; when it
is exactly such a JSON object naming a tool (a ```json fence around it is allowed) it becomes a tool call, otherwise it
is text (the arguments are not constrained: a small model may answer in text). ``required`` and a named function: the
answer is constrained by a grammar to a call of one of the tools (of that one), with ``arguments`` valid against the
function's ``parameters`` schema, so it always parses; a schema the grammar cannot enforce is a 400 naming
``tools[i].function.parameters``. One call per answer (``parallel_tool_calls`` is accepted: one call is within it).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from innova_smollm.core.schema import DEFINITIONS, OutputConstraint, check_schema, json_schema_constraint
from innova_smollm.core.types import ChatMessage
from innova_smollm.errors import InvalidRequestError

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


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

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def constraint(self) -> OutputConstraint | None:
        """The grammar's schema when a call is forced: one object ``{"name", "arguments"}`` per callable tool."""
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
            alternatives.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": tool.name}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema: dict[str, Any] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        # A tool's $refs point at #/$defs/...: the definitions move to the root of the call's schema.
        schema = {**schema, **{container: found for container, found in hoisted.items() if found}}
        return json_schema_constraint(schema, field="tool_choice")


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """Check ``tools`` and ``tool_choice`` (wire structs already type-checked) into a plan; None without tools."""
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
        return ToolPlan(tools=tuple(specs), choice=choice, callable=tuple(specs))
    named = [spec for spec in specs if spec.name == choice.function.name]
    if not named:
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, which is not among the tools", field="tool_choice"
        )
    return ToolPlan(tools=tuple(specs), choice="named", callable=tuple(named))


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


def render_messages(messages: Sequence[Any], plan: ToolPlan | None, texts: Sequence[str]) -> list[ChatMessage]:
    """The conversation as plain (role, content) messages for any chat template: tool calls and tool results
    written out as text, and the tools' description as a system message when tools are offered.

    ``messages`` are the wire messages; ``texts`` their content already read as text.
    """
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
