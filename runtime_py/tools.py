"""OpenAI tool calls (`tools`, `tool_choice`) on any chat model. Mirrors web/tools.js.

The call format is llama.cpp's "generic" one, for every model: the whole reply is one JSON object, either a call
or (tool_choice "auto" only) a plain answer,

    {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    {"response": "It is sunny."}

and the grammar engine holds the model to it (runtime_py/grammar.py): the reply is constrained by one JSON Schema
whose `arguments` are each function's own `parameters` schema, so a call's arguments always validate. The tools are
described in a system message (TOOLS_PROMPT: their names, descriptions and parameter schemas, and the format); when
the model's chat template handles tools itself (it reads `tools`), it also gets them as `tools=` and renders them its
own way. Earlier turns are rendered back in the same format: an assistant message with `tool_calls` becomes its
`{"tool_call": ...}` JSON text, a `role: "tool"` result becomes a user turn `{"tool_response": {"name", "content"}}`
(templates such as Gemma's accept only user/assistant turns), consecutive user turns are merged.

    plan = plan_tools(tools, tool_choice)            # None: no tools in play (absent, or tool_choice "none")
    messages = render_messages(messages, plan)       # what the chat template sees
    params.response_format = plan.response_format    # the reply's grammar
    content, calls = parse_reply(text, plan)         # calls: [{"id", "type": "function", "function": {...}}]
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from compiler.errors import InvalidParameterError

TOOLS_PROMPT = ("You can call these tools (JSON Schema of each one's arguments):\n{tools}\n\n"
                "Reply with one JSON object and nothing else: {format}")
FORMAT_CALL = '{"tool_call": {"name": <tool name>, "arguments": <its arguments>}} to call a tool'
FORMAT_ANSWER = '{"response": <your answer as a string>} to answer directly'


@dataclass
class ToolPlan:
    tools: list[dict]               # the request's tools (OpenAI shape)
    functions: list[dict]           # their "function" objects: name, description, parameters
    choice: str                     # "auto" | "required" | a function name
    response_format: dict           # the JSON Schema the reply is constrained to


def _fail(msg: str, param: str = "tools"):
    raise InvalidParameterError(msg, param=param)


def plan_tools(tools, tool_choice) -> ToolPlan | None:
    """The request's tools + tool_choice, validated. None when the reply is plain text (no tools, or "none")."""
    if tool_choice is not None and not tools and tool_choice != "none":
        _fail("tool_choice needs tools", "tool_choice")
    if not tools or tool_choice == "none":
        return None
    if not isinstance(tools, list):
        _fail("tools must be a list")
    funcs = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            _fail(f"tools.{i} must be {{\"type\": \"function\", \"function\": {{...}}}} (only function tools exist)",
                  f"tools.{i}")
        if not isinstance(f.get("name"), str) or not f["name"]:
            _fail(f"tools.{i}.function.name must be a non-empty string", f"tools.{i}.function.name")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            _fail(f"tools.{i}.function.parameters must be a JSON Schema object", f"tools.{i}.function.parameters")
        funcs.append({"name": f["name"], "description": f.get("description") or "", "parameters": params})
    names = [f["name"] for f in funcs]
    if len(set(names)) != len(names):
        _fail("tool names must be unique")
    if tool_choice is None or tool_choice == "auto":
        choice = "auto"
    elif tool_choice == "required":
        choice = "required"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict) and tool_choice["function"].get("name") in names:
        choice = tool_choice["function"]["name"]
    else:
        _fail('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": '
              '<one of the tools>}}', "tool_choice")
    calls = [{"type": "object", "properties": {
        "name": {"const": f["name"]}, "arguments": f["parameters"]},
        "required": ["name", "arguments"], "additionalProperties": False}
        for f in funcs if choice in ("auto", "required") or f["name"] == choice]
    call = {"type": "object", "properties": {"tool_call": calls[0] if len(calls) == 1 else {"anyOf": calls}},
            "required": ["tool_call"], "additionalProperties": False}
    schema = call if choice != "auto" else {"anyOf": [call, {
        "type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
        "additionalProperties": False}]}
    return ToolPlan(tools, funcs, choice, {"type": "json_schema", "json_schema": {"name": "tool_reply",
                                                                                  "schema": schema}})


def template_takes_tools(template: str | None) -> bool:
    """Does the chat template render `tools` itself? (It mentions the variable: HF templates that support tool use
    all read `tools`; a template that ignores it would drop them, so then only the system message carries them.)"""
    return isinstance(template, str) and "tools" in template


def system_prompt(plan: ToolPlan) -> str:
    described = "\n".join(json.dumps(f, ensure_ascii=False) for f in plan.functions
                          if plan.choice in ("auto", "required") or f["name"] == plan.choice)
    fmt = FORMAT_CALL if plan.choice != "auto" else f"{FORMAT_CALL}, or {FORMAT_ANSWER}"
    return TOOLS_PROMPT.format(tools=described, format=fmt)


def render_messages(messages: list[dict], plan: ToolPlan | None) -> list[dict]:
    """Messages (role, content, tool_calls, tool_call_id, name) -> plain {role, content} turns for the template:
    the tools' system message first (merged with the request's own system message), earlier calls and results in
    the generic JSON format."""
    names = {}      # tool_call_id -> function name, for results that do not repeat it
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                names[c.get("id")] = fn.get("name")
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except (TypeError, json.JSONDecodeError):
                    _fail("an assistant message's tool_calls[].function.arguments must be a JSON string",
                          "messages")
                calls.append({"name": fn.get("name"), "arguments": args})
            # one call per turn is what the format holds; several are rendered one JSON object per line
            content = "\n".join(json.dumps({"tool_call": c}, ensure_ascii=False) for c in calls)
        elif role == "tool":
            role = "user"
            content = json.dumps({"tool_response": {"name": m.get("name") or names.get(m.get("tool_call_id")),
                                                    "content": content}}, ensure_ascii=False)
        if out and role == "user" and out[-1]["role"] == "user" and m["role"] == "tool":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + content}
        else:
            out.append({"role": role, "content": content})
    if plan is not None:
        sp = system_prompt(plan)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + sp}
        else:
            out.insert(0, {"role": "system", "content": sp})
    return out


def parse_reply(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated reply. A reply cut short (max_tokens) is returned as content, as is."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    if isinstance(obj, dict) and isinstance(obj.get("tool_call"), dict):
        c = obj["tool_call"]
        return None, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": c.get("name"),
                                    "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}]
    if isinstance(obj, dict) and isinstance(obj.get("response"), str):
        return obj["response"], []
    return text, []
