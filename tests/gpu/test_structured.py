"""Structured output and tool calls on the real models (smollm2, gemma3), natively (`kiln run --json-schema`) and
over HTTP with the official `openai` client: every output parses and validates against its schema
(tests/fixtures/schemas.json); json_object parses; tool calls come back as `tool_calls` whose arguments validate,
streaming and not; a two-step conversation with a `tool` result works. Greedy, short generations: the grammar ends
them as soon as the JSON is complete (MAX_TOKENS is a guard, not the expected length).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from runtime_py.device import NoAdapterError, get_adapter

try:
    get_adapter()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

from tests.gpu.test_api import _env     # noqa: E402 — same environment as the API tests

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = json.loads((ROOT / "tests/fixtures/schemas.json").read_text())
MODELS = ["smollm2", "gemma3"]
MAX_TOKENS = 64
KEY = "k"
LAUNCHER = r"""
import socket, sys, uvicorn
from runtime_py.server import create_app
app = create_app(sys.argv[2:], api_key=sys.argv[1], log=lambda *a: print(*a, file=sys.stderr))
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client():
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, KEY, *MODELS], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"server did not start ({line!r})"
    url = f"http://127.0.0.1:{int(line)}"
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, "server did not answer /health"
        time.sleep(0.3)
    yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=600, max_retries=0)
    proc.terminate()
    proc.wait(10)


def chat(client, model, content, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=MAX_TOKENS, **kw)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", SCHEMAS["cases"], ids=[c["name"] for c in SCHEMAS["cases"]])
def test_http_schema_outputs_validate(client, model, case):
    r = chat(client, model, case["prompt"], response_format={
        "type": "json_schema", "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True}})
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    jsonschema.validate(json.loads(c.message.content), case["schema"])


@pytest.mark.parametrize("model", MODELS)
def test_http_json_object_parses(client, model):
    # json_object leaves the contents free: a model may fill an array until max_tokens. A reply that stopped is a
    # whole object; one cut short must say "length" with exactly max_tokens tokens (never "stop" on a partial one).
    r = chat(client, model, 'Reply with a JSON object: {"name": <your name>}.', response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict), r
    else:
        assert c.finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS, r
        assert c.message.content.startswith("{"), r


@pytest.mark.parametrize("model", MODELS)
def test_http_json_object_cut_short_says_length(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object with one key."}], temperature=0,
        max_tokens=3, response_format={"type": "json_object"})
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 3, r
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.message.content)


@pytest.mark.parametrize("model", MODELS)
def test_cli_schema_outputs_validate(model, tmp_path):
    for case in SCHEMAS["cases"]:
        f = tmp_path / f"{case['name']}.json"
        f.write_text(json.dumps(case["schema"]))
        out = subprocess.run([sys.executable, "-m", "runtime_py.cli", "run", model, "--chat", "-p", case["prompt"],
                              "--temperature", "0", "-n", str(MAX_TOKENS), "--json-schema", str(f), "--json"],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        d = json.loads(out.stdout)
        assert d["finish_reason"] == "stop", d
        jsonschema.validate(json.loads(d["text"]), case["schema"])


@pytest.mark.parametrize("model", MODELS)
def test_tool_call_and_second_step(client, model):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=MAX_TOKENS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    msgs += [c.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, light rain"}]
    r2 = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], tool_choice="none",
                                        temperature=0, max_tokens=24)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls


@pytest.mark.parametrize("model", MODELS)
def test_tool_call_streamed(client, model):
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Oslo, in celsius?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=MAX_TOKENS,
        stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
