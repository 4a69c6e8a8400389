"""Tool calls in OpenAI's format: the tools' rendering into the prompt, the grammar of a required or
named call, and the parsing of the model's calls out of its text.

A model whose chat template renders tools (it mentions `tools`) gets them through the template;
another gets them in a system message in the Hermes format (what Qwen and Hermes models are trained
on): the tools as JSON inside <tools></tools>, and calls answered as <tool_call>{"name": ...,
"arguments": {...}}</tool_call>. tool_choice "auto" lets the model choose and parses such calls from
its text; "required" constrains the output to a JSON array of one or more calls, and a named
function to that function's arguments (vLLM's way), so the arguments always parse.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from splitserve.engine.structured import Grammar

from .errors import invalid
from .limits import preview

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's function names
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: str  # a JSON schema, as JSON text

    def json(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": json.loads(self.parameters)}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none", "auto", "required", or "named"
    name: str | None = None  # the named function

    @property
    def active(self) -> bool:
        return self.mode != "none"


def parse_tools(tools: list[Any], choice: Any) -> tuple[tuple[Tool, ...], ToolChoice]:
    """OpenAI's tools and tool_choice (default: "auto" with tools, "none" without); ApiError when bad."""
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid(f"'tools' must be a list of at most {MAX_TOOLS} functions", "tools")
    parsed = tuple(_tool(t) for t in tools)
    if len({t.name for t in parsed}) != len(parsed):
        raise invalid("tool names must be unique", "tools")
    if choice is None:
        return parsed, ToolChoice("auto" if parsed else "none")
    if choice in ("none", "auto", "required"):
        if choice != "none" and not parsed:
            raise invalid(f"tool_choice '{choice}' needs tools", "tool_choice")
        return parsed, ToolChoice(choice)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise invalid("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}", "tool_choice")
    if name not in {t.name for t in parsed}:
        raise invalid(f"tool_choice names a function that is not in tools: {preview(name)}", "tool_choice")
    return parsed, ToolChoice("named", name)


def _tool(value: Any) -> Tool:
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(function, dict):
        raise invalid("each tool must be {'type': 'function', 'function': {...}}", "tools")
    name, description = function.get("name"), function.get("description", "")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise invalid("a function name must be 1 to 64 of a-z, A-Z, 0-9, _ and -", "tools")
    if not isinstance(description, str) or not isinstance(parameters, dict):
        raise invalid("a function's description must be a string and its parameters an object", "tools")
    return Tool(name, description, json.dumps(parameters))


def parse_call_history(calls: Any) -> tuple[ToolCall, ...]:
    """An assistant message's tool_calls, sent back with the conversation."""
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise invalid(f"'tool_calls' must be a list of at most {MAX_TOOLS} calls", "messages")
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str) and isinstance(call.get("id", ""), str)):
            raise invalid("each tool call needs an id and a function with a name and arguments (a string)",
                          "messages")
        parsed.append(ToolCall(call.get("id", ""), function["name"], function["arguments"]))
    return tuple(parsed)


def call_grammar(tools: tuple[Tool, ...], choice: ToolChoice) -> Grammar | None:
    """The output a required or named choice must be: a JSON array of calls, or the arguments."""
    if choice.mode == "named":
        return Grammar(json_schema=next(t.parameters for t in tools if t.name == choice.name))
    if choice.mode != "required":
        return None
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)}}
             for t in tools]
    return Grammar(json_schema=json.dumps({"type": "array", "minItems": 1, "items": {"anyOf": calls}}))


def system_prompt(tools: tuple[Tool, ...]) -> str:
    """The Hermes-format tools message, for templates that do not render tools themselves."""
    listed = "\n".join(json.dumps(t.json()) for t in tools)
    return ("You may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\nFor each "
            "function call, return a json object with function name and arguments within <tool_call>"
            "</tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def call_text(calls: tuple[ToolCall, ...]) -> str:
    """An earlier assistant turn's calls as the model writes them (Hermes format)."""
    return "\n".join(f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': json_or_text(c.arguments)})}\n"
                     "</tool_call>" for c in calls)


def json_or_text(text: str) -> Any:
    """A call's arguments as templates take them: parsed when they are JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def extract_calls(text: str, tools: tuple[Tool, ...],
                  choice: ToolChoice) -> tuple[str | None, tuple[ToolCall, ...]]:
    """(the message's content, its tool calls) from the model's text under choice."""
    if choice.mode == "named":
        return None, (_new_call(choice.name, text),)
    if choice.mode == "required":
        try:
            calls = json.loads(text)
        except ValueError:
            return text, ()  # cut short (max_tokens): no call to report
        return None, tuple(_new_call(c["name"], json.dumps(c["arguments"])) for c in calls)
    names = {t.name for t in tools}
    calls = [call for body in _CALL.findall(text) if (call := _parse_call(body, names)) is not None]
    if not calls:
        return text, ()
    content = _CALL.sub("", text).strip()
    return content or None, tuple(calls)


def final_calls(text: str, tools: tuple[Tool, ...], choice: ToolChoice,
                finish: str) -> tuple[str | None, tuple[ToolCall, ...], str]:
    """(content, tool calls, finish_reason) of a choice's whole text: a choice cut short by
    max_tokens keeps its text as content (a named call's arguments stay its call), and one that made
    calls finishes with "tool_calls" (a named one with its own reason, as OpenAI)."""
    if finish == "length" and choice.mode != "named":
        return text, (), finish
    content, calls = extract_calls(text, tools, choice)
    return content, calls, "tool_calls" if calls and choice.mode != "named" else finish


def _parse_call(body: str, names: set[str]) -> ToolCall | None:
    """The call a <tool_call> block's JSON makes; None for broken JSON or an unknown function."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict):
        return _new_call(call["name"], json.dumps(call.get("arguments", {})))
    return None


def _new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(f"call_{secrets.token_hex(12)}", name, arguments)


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
Delta = dict[str, Any]  # one entry of a streamed delta's tool_calls


@dataclass
class CallStream:
    """One streamed choice's text, turned into content and tool-call deltas as it comes (OpenAI's
    streaming shape): a named call's arguments go out piece by piece under its first delta's id and
    name; with "auto", content streams until a <tool_call> opens, and each call goes out whole once
    its block closes (a block that is not a call goes out as content); a required call's JSON array
    is held until the choice ends. Text that may begin a <tool_call> tag, and whitespace-only content,
    wait for what follows."""

    tools: tuple[Tool, ...]
    choice: ToolChoice
    held: str = ""  # required: everything; auto: a possible tag start, or an open block's body
    blank: str = ""  # auto: whitespace-only content, sent only once more content follows
    in_call: bool = False
    searched: int = 0  # an open block's body holds no closing tag before this (each piece is scanned once)
    calls: list[ToolCall] = field(default_factory=list)  # sent so far

    def feed(self, text: str) -> tuple[str, list[Delta]]:
        """(content, tool-call deltas) to send now for the next piece of the choice's text."""
        if self.choice.mode == "named":
            return "", self._arguments(text)
        self.held += text
        return ("", []) if self.choice.mode == "required" else self._auto()

    def finish(self, reason: str) -> tuple[str, list[Delta], str]:
        """What is left to send when the choice ends, and its finish_reason."""
        if self.choice.mode == "named":
            return "", [] if self.calls else self._arguments(""), reason
        if self.choice.mode == "required":
            content, calls, reason = final_calls(self.held, self.tools, self.choice, reason)
            return content or "", [_whole(i, c) for i, c in enumerate(calls)], reason
        left = (_OPEN if self.in_call else "") + self.held
        # Without a call the content is the whole text, trailing whitespace too (as unstreamed);
        # after calls, whitespace alone is what separated them, which unstreamed content strips.
        content = self.blank + left if left.strip() or not self.calls else ""
        return content, [], "tool_calls" if self.calls and reason == "stop" else reason

    def _arguments(self, text: str) -> list[Delta]:
        if self.calls:
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        self.calls.append(_new_call(self.choice.name, ""))
        return [_whole(0, ToolCall(self.calls[0].id, self.choice.name, text))]

    def _auto(self) -> tuple[str, list[Delta]]:
        content, deltas, names = "", [], {t.name for t in self.tools}
        while True:
            if self.in_call:
                end = self.held.find(_CLOSE, max(0, self.searched - len(_CLOSE) + 1))
                if end < 0:
                    self.searched = len(self.held)
                    break
                body, self.held, self.in_call, self.searched = self.held[:end], self.held[end + len(_CLOSE):], False, 0
                call = _parse_call(body.strip(), names)
                if call is None:
                    content += self._content(_OPEN + body + _CLOSE)
                else:
                    deltas.append(_whole(len(self.calls), call))
                    self.calls.append(call)
                continue
            start = self.held.find(_OPEN)
            if start >= 0:
                content += self._content(self.held[:start])
                self.held, self.in_call = self.held[start + len(_OPEN):], True
                continue
            keep = next((n for n in range(min(len(_OPEN) - 1, len(self.held)), 0, -1)
                         if _OPEN.startswith(self.held[-n:])), 0)
            content += self._content(self.held[:len(self.held) - keep])
            self.held = self.held[len(self.held) - keep:]
            break
        return content, deltas

    def _content(self, text: str) -> str:
        """text to send as content now: whitespace alone waits for more."""
        if not text.strip():
            self.blank += text
            return ""
        text, self.blank = self.blank + text, ""
        return text


def _whole(index: int, call: ToolCall) -> Delta:
    return {"index": index, **call.json()}
