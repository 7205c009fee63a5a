"""Constrained output and tool calls in the browser (web/grammar.js: @mlc-ai/web-xgrammar in wasm; web/tools.js)
against the native runtime (runtime_py/grammar.py: llguidance; runtime_py/tools.py) on SmolLM2: the same ids for the
same request where both engines give the same masks (json_object, a regex), a JSON Schema output that validates, a
grammar the engine rejects is an InvalidParameterError naming the field (the stream too), tools.js renders and parses
as tools.py, a tool call's arguments validate (speculation: test_speculate_browser.py). Short generations: SwiftShader takes
seconds per token.
"""
from __future__ import annotations

import json

import jsonschema
import pytest

N_TOKENS = 10
CASES = [   # (prompt, request fields): both engines' masks agree along these outputs
    ("A JSON object describing a cat:", {"response_format": {"type": "json_object"}, "temperature": 0}),
    ("Is the sky blue? Answer:", {"regex": " ?(yes|no), because [a-z ]+", "temperature": 0.8, "seed": 3}),
]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def page(context, server, browser_log):
    p = browser_log.attach(context.new_page())
    p.goto(server.url)
    yield p
    p.close()


@pytest.fixture(scope="module")
def native(artifact):
    """native(prompt, fields) -> (ids, finish_reason) of runtime_py for the same completion request."""
    from runtime_py.device import NoAdapterError
    from runtime_py.generate import Done, generate
    from runtime_py.model import Model
    from runtime_py.sampling import SamplingParams
    from runtime_py.tokenizer import Tokenizer
    try:
        model = Model(artifact)
    except NoAdapterError as e:
        pytest.skip(f"no native WebGPU adapter for the parity reference: {e}")
    m = model.manifest
    tok = Tokenizer(artifact / m["tokenizer"]["file"], m["tokenizer"])
    session = model.session(ctx=256)

    def run(prompt: str, fields: dict):
        params = SamplingParams.from_request(fields)
        for ev in generate(session, tok, tok.encode(prompt), params, max_tokens=N_TOKENS, eog_ids=tok.eog_ids):
            if isinstance(ev, Done):
                return ev.ids, ev.finish_reason
    return run


def complete(demo, prompt: str, fields: dict, n: int = N_TOKENS) -> dict:
    return demo.evaluate("""async ([prompt, fields, n]) => {
        const r = await window.kiln.engine.completions.create({prompt, max_tokens: n, ...fields});
        return {ids: r.kiln.ids, text: r.choices[0].text, finish: r.choices[0].finish_reason};
    }""", [prompt, fields, n])


@pytest.mark.parametrize("prompt,fields", CASES, ids=["json_object-greedy", "regex-seeded"])
def test_constrained_output_equals_native(demo, native, prompt, fields):
    got = complete(demo, prompt, fields)
    want_ids, want_finish = native(prompt, fields)
    assert got["ids"] == want_ids and got["finish"] == want_finish, (got, want_ids, want_finish)


def test_json_schema_output_validates(demo):
    # forced text (the keys) may be split into more tokens than natively (see web/grammar.js): a larger budget
    got = complete(demo, "Is it ok? As JSON:", {"temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}}, 24)
    assert got["finish"] == "stop", got
    jsonschema.validate(json.loads(got["text"]), SCHEMA)


def test_rejected_grammar_is_an_invalid_parameter(demo):
    got = demo.evaluate("""async () => {
        const fail = async (req) => {
          try {
            await window.kiln.engine.completions.create({prompt: "x", max_tokens: 2, ...req});
            return null;
          } catch (e) {
            return [e.constructor.name, e.param ?? null, e.message];
          }
        };
        return [await fail({grammar: "root ::= undefined_rule"}), await fail({grammar: "root ::= (", stream: true}),
                await fail({response_format: {type: "json_schema", json_schema: {name: "x",
                                                                                 schema: {type: "objectx"}}}}),
                await fail({regex: "(("})];
    }""")
    for g, field in zip(got, ["grammar", "grammar", "response_format", "regex"]):
        assert g is not None and g[:2] == ["InvalidParameterError", field], got
        assert "the grammar engine rejected it" in g[2] and len(g[2]) > 35, g
    assert "undefined_rule" in got[0][2], got[0]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TOOL_CASES = [   # (tools, tool_choice, messages): web/tools.js against runtime_py/tools.py
    ([WEATHER], "required", [{"role": "user", "content": "Weather in Oslo?"}]),
    ([WEATHER, {"type": "function", "function": {"name": "now"}}], None,
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time?"}]),
    ([WEATHER], {"type": "function", "function": {"name": "get_weather"}},
     [{"role": "user", "content": "Paris?"},
      {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
          "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"}]),
    ([WEATHER], "none", [{"role": "user", "content": "Hi"}]),
    ([WEATHER], "sometimes", [{"role": "user", "content": "Hi"}]),
    ([{"type": "function", "function": {"name": ""}}], None, [{"role": "user", "content": "Hi"}]),
    (None, "required", [{"role": "user", "content": "Hi"}]),
]


def test_tools_js_is_tools_py(page):
    from compiler.errors import InvalidParameterError
    from runtime_py.tools import parse_reply, plan_tools, render_messages
    want = []
    for tools, choice, messages in TOOL_CASES:
        try:
            plan = plan_tools(tools, choice)
        except InvalidParameterError as e:
            want.append(["error", e.param])
            continue
        full = [{"name": None, "tool_call_id": None, "tool_calls": None, **m} for m in messages]
        want.append([plan.response_format if plan else None, render_messages(full, plan)])
    got = page.evaluate("""async (cases) => {
        const t = await import('/web/tools.js');
        return cases.map(([tools, choice, messages]) => {
          try {
            const plan = t.planTools(tools, choice);
            return [plan ? plan.response_format : null, t.renderMessages(messages, plan)];
          } catch (e) {
            return ["error", e.param];
          }
        });
    }""", [list(c) for c in TOOL_CASES])
    assert got == want
    plan = plan_tools([WEATHER], "required")
    for text in ['{"tool_call":{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}}}',
                 '{"response":"hi"}', '{"tool_call":', "plain"]:
        js = page.evaluate("""async ([text, tools]) => {
            const t = await import('/web/tools.js');
            return t.parseReply(text, t.planTools(tools, "required"));
        }""", [text, [WEATHER]])
        content, calls = parse_reply(text, plan)
        assert js[0] == content and [c["function"] for c in js[1]] == [c["function"] for c in calls]


def test_tool_call_in_the_browser(demo):
    got = demo.evaluate("""async (tool) => {
        const r = await window.kiln.engine.chat.completions.create({
          messages: [{role: "user", content: "What is the weather in Paris?"}], tools: [tool],
          tool_choice: "required", temperature: 0, max_tokens: 60});
        return r.choices[0];
    }""", WEATHER)
    assert got["finish_reason"] == "tool_calls" and got["message"]["content"] is None, got
    call = got["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
