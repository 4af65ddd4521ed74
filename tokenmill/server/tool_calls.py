"""OpenAI tools on /v1/chat/completions: the prompt, the grammar that enforces a call, the parsing.

The model is told about the tools by its chat template when the template takes ``tools``; otherwise a
system message describes them in the Hermes format (``<tool_call>{"name": ..., "arguments": ...}
</tool_call>``), which Qwen 2.5, Hermes and SmolLM3 templates use too. Then, by ``tool_choice``:

- ``"none"``: the tools are not shown; plain text.
- ``"auto"`` (the default with tools): the model decides; its text is parsed for Hermes tool calls
  (as vLLM's ``hermes`` tool parser does); text before the first call is the message content.
- ``"required"``: a grammar (JSON schema) forces a JSON array of one or more
  ``{"name": <one of the tools>, "arguments": <its parameters' schema>}`` (one only when
  ``parallel_tool_calls`` is false).
- ``{"type": "function", "function": {"name": N}}``: a grammar forces N's arguments (its
  parameters' schema); the output is that one call.

Answers carry ``message.tool_calls`` and ``finish_reason: "tool_calls"``; streams send OpenAI's
tool-call deltas (see ``ToolStream``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.server.protocol import ApiError

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(_CLOSE) + r"|$)", re.DOTALL)
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolPlan:
    """The request's tools and how the answer must use them."""

    functions: list[dict[str, Any]]  # OpenAI's "function" objects: name, description, parameters
    mode: str  # "none" | "auto" | "required" | "function"
    name: str | None = None  # mode "function": the one to call
    parallel: bool = True

    @staticmethod
    def from_body(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
        """Validate ``tools`` / ``tool_choice``; None when the request has no tools. ApiError (400) names
        the field at fault."""
        if tools is None:
            if tool_choice not in (None, "none"):
                raise ApiError(400, "tool_choice needs tools", param="tool_choice")
            return None
        functions = [_function(i, t) for i, t in enumerate(tools if isinstance(tools, list) else [None])]
        if not functions:
            raise ApiError(400, "tools must be a non-empty list", param="tools")
        names = [f["name"] for f in functions]
        if len(set(names)) != len(names):
            raise ApiError(400, "tools: function names must be unique", param="tools")
        parallel = True if parallel_tool_calls is None else parallel_tool_calls
        if tool_choice is None or tool_choice in ("none", "auto", "required"):
            return ToolPlan(functions, tool_choice or "auto", parallel=parallel)
        name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
        if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": ...}}', param="tool_choice")
        if name not in names:
            raise ApiError(400, f"tool_choice: no tool named {name!r} in tools", param="tool_choice")
        return ToolPlan(functions, "function", name, parallel)

    # ---- the prompt -------------------------------------------------------------------------------

    def conversation(self, messages: list[dict[str, Any]], chat_template: str | None
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(messages, extra template variables): the tools through the template's ``tools`` when it takes
        them, else described in a system message."""
        if self.mode == "none":
            return messages, {}
        if chat_template and "tools" in chat_template:
            return messages, {"tools": [{"type": "function", "function": f} for f in self.functions]}
        described = "\n".join(json.dumps({"type": "function", "function": f}) for f in self.functions)
        system = ("You are a function calling AI model. You may call one or more functions to assist with the "
                  f"user query. Here are the available tools: <tools>\n{described}\n</tools>\nFor each function "
                  "call, return a json object with the function name and arguments within <tool_call></tool_call> "
                  'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n\n" + system}, *messages[1:]], {}
        return [{"role": "system", "content": system}, *messages], {}

    # ---- the grammar ------------------------------------------------------------------------------

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The constraint that enforces a call ("required", a named function); None when the model is free."""
        if self.mode == "function":
            return StructuredOutputsParams(json=self._parameters(self.name))
        if self.mode != "required":
            return None
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": f["name"]}, "arguments": self._parameters(f["name"])}}
                 for f in self.functions]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def _parameters(self, name: str | None) -> dict[str, Any]:
        return next(f for f in self.functions if f["name"] == name).get("parameters") or _EMPTY_PARAMETERS

    # ---- the answer -------------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output. A forced call that did not complete (a length cut)
        stays text."""
        if self.mode == "function":
            return (None, [ToolCall(self.name, text)]) if _is_json(text) else (text, [])
        if self.mode == "required":
            try:
                calls = [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(text)]
            except (ValueError, TypeError, KeyError):
                return text, []
            return None, calls
        if self.mode == "auto":
            return self._parse_hermes(text)
        return text, []

    def _parse_hermes(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(_OPEN)
        if start < 0:
            return text, []
        names = {f["name"] for f in self.functions}
        calls = []
        for body in _CALL_RE.findall(text[start:]):
            try:
                call = json.loads(body)
                name, arguments = call["name"], call.get("arguments", {})
            except (ValueError, TypeError, KeyError):
                return text, []  # not a well-formed call: leave the text as it is
            if name not in names or not isinstance(arguments, dict):
                return text, []
            calls.append(ToolCall(name, json.dumps(arguments, ensure_ascii=False)))
        content = text[:start].strip()
        return content or None, calls


def _function(i: int, tool: Any) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ApiError(400, f'{param} must be {{"type": "function", "function": {{"name", "parameters"}}}}',
                       param=param)
    function = tool["function"]
    if not isinstance(function.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", function["name"]):
        raise ApiError(400, f"{param}.function.name must be 1-64 letters, digits, '_', '.' or '-'",
                       param=f"{param}.function.name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ApiError(400, f"{param}.function.parameters must be a JSON schema object",
                       param=f"{param}.function.parameters")
    return {k: v for k, v in function.items() if k in ("name", "description", "parameters")}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def history_message(message: dict[str, Any], tool_calls: list[dict[str, Any]] | None,
                    tool_call_id: str | None, template_takes_tools: bool) -> dict[str, Any]:
    """An earlier assistant call or tool result, in the form the chat template expects: as is (plus
    ``tool_calls`` with parsed arguments) for a template that takes tools, else as Hermes text."""
    if template_takes_tools:
        if tool_calls:
            calls = [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in tool_calls]
            return {**message, "tool_calls": calls}
        return {**message, "tool_call_id": tool_call_id} if tool_call_id else message
    if tool_calls:
        text = "\n".join(f"{_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c)})}\n"
                         f"{_CLOSE}" for c in tool_calls)
        return {**message, "content": (message["content"] + "\n" if message["content"] else "") + text}
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    return message


def _arguments(call: dict[str, Any]) -> Any:
    arguments = call["function"].get("arguments", "{}")
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


class ToolStream:
    """One streamed choice of a request with tools: which text goes out as content now and which
    deltas carry the calls.

    A named function streams its arguments as they are generated. "required" and "auto" send each
    call whole when the output is finished (the text of a call is not valid JSON until it ends);
    "auto" streams the content before the first ``<tool_call>`` and holds back a tail that may start one.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self._sent = 0  # characters of text already sent as content (auto)
        self._call: ToolCall | None = None  # the named function's call, once started

    def delta(self, new_text: str) -> dict[str, Any] | None:
        """The delta for newly generated text (None: nothing to send yet)."""
        self.text += new_text
        if self.plan.mode == "function":
            if not new_text:
                return None
            if self._call is None:
                self._call = ToolCall(self.plan.name, new_text)
                return {"tool_calls": [{"index": 0, **self._call.to_dict()}]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": new_text}}]}
        if self.plan.mode == "required":
            return None
        if self.plan.mode == "auto":
            return self._content_until_call()
        return {"content": new_text} if new_text else None

    def _content_until_call(self) -> dict[str, Any] | None:
        start = self.text.find(_OPEN)
        end = start if start >= 0 else len(self.text) - _partial_open(self.text)
        if end <= self._sent:
            return None
        content, self._sent = self.text[self._sent:end], end
        return {"content": content}

    def finish(self) -> tuple[dict[str, Any] | None, bool]:
        """(the last delta, whether the choice made tool calls) once the output is complete."""
        if self.plan.mode == "function":
            return None, self._call is not None and _is_json(self.text)
        _, calls = self.plan.parse(self.text)
        if not calls:  # what was held back is text after all
            rest = self.text[self._sent:]
            return ({"content": rest} if rest else None), False
        # the content before the first call (auto) is already out
        return {"tool_calls": [{"index": i, **c.to_dict()} for i, c in enumerate(calls)]}, True


def _partial_open(text: str) -> int:
    """Length of the longest tail of text that begins ``<tool_call>``."""
    for n in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-n:]):
            return n
    return 0
