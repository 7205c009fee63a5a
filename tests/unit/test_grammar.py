"""Constrained decoding (runtime_py/grammar.py, llguidance) and tool calls (runtime_py/tools.py) without a GPU: the
real tokenizers (built from the GGUFs) and generate() over a mock session whose logits are noise biased towards
JSON's closing characters, so the engine alone decides validity: every output must parse and validate against its
schema (tests/fixtures/schemas.json), whatever the logits prefer.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import gguf
import jsonschema
import numpy as np
import pytest

from compiler.errors import InvalidParameterError
from compiler.tokenizer import build_tokenizer_json, tokenizer_info
from runtime_py import grammar
from runtime_py.generate import Done, generate
from runtime_py.sampling import GREEDY, Sampler, SamplingParams
from runtime_py.tokenizer import Tokenizer
from runtime_py.tools import parse_reply, plan_tools, render_messages, system_prompt, template_takes_tools
from tests.models import gemma3_gguf_path, smollm2_gguf_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCHEMAS = json.loads((FIXTURES / "schemas.json").read_text())
MODELS = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}


@functools.lru_cache(maxsize=None)
def tok(model: str) -> Tokenizer:
    reader = gguf.GGUFReader(MODELS[model]())
    return Tokenizer(build_tokenizer_json(reader), tokenizer_info(reader))


class MockSession:
    """generate()'s session: logits = seeded noise + a bonus for tokens holding `"`, `}`, `]` or `,` (so greedy
    closes strings, arrays and objects as soon as the grammar lets it), one row per position."""

    def __init__(self, tokenizer: Tokenizer, seed: int, n_logits: int | None = None):
        vocab = n_logits or tokenizer.vocab_size
        texts = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)] + [""] * (vocab - tokenizer.vocab_size)
        self.bonus = np.array([4.0 if any(c in t for c in '"}],') else 0.0 for t in texts])
        self.ctx, self.seed, self.pos, self.chunk = 4096, seed, 0, 8

    def reset(self, pos=0):
        self.pos = pos

    def forward(self, ids):
        self.pos += len(ids)

    def logits(self):
        return np.random.default_rng([self.seed, self.pos]).normal(size=self.bonus.shape) + self.bonus

    def next_token(self):
        raise AssertionError("a constrained generation must take the CPU sampling path")


def run(model: str, params: SamplingParams, seed: int = 0, max_tokens: int = 96, n_logits=None) -> Done:
    t = tok(model)
    out = list(generate(MockSession(t, seed, n_logits), t, [1, 2, 3], params, max_tokens=max_tokens,
                        eog_ids=t.eog_ids))
    return out[-1]


def schema_params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(**{**GREEDY.__dict__, **kw,
                             "response_format": {"type": "json_schema", "json_schema": {"name": "t",
                                                                                        "schema": schema}}})


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", SCHEMAS["cases"], ids=[c["name"] for c in SCHEMAS["cases"]])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schema_outputs_validate(model, case, temperature):
    for seed in range(3):
        done = run(model, schema_params(case["schema"], temperature=temperature, seed=seed), seed)
        assert done.finish_reason == "stop", done      # the grammar ended it: the value is complete
        jsonschema.validate(json.loads(done.text), case["schema"])


@pytest.mark.parametrize("model", MODELS)
def test_json_object_parses(model):
    for seed in range(3):
        done = run(model, SamplingParams(**{**GREEDY.__dict__, "response_format": {"type": "json_object"}}), seed,
                   max_tokens=400)
        if done.finish_reason == "stop":
            assert isinstance(json.loads(done.text), dict)
        else:   # free JSON from noise may run long: what there is must still be a JSON prefix (object opened)
            assert done.finish_reason == "length" and done.text.startswith("{")


def test_regex_and_gbnf():
    d = run("smollm2", SamplingParams(**{**GREEDY.__dict__, "regex": r"[0-9]{3}-[a-z]{2}"}))
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", d.text) and d.finish_reason == "stop"
    g = 'root ::= "yes" | "no" | "maybe " num\nnum ::= [0-9]'
    for seed in range(4):
        d = run("gemma3", SamplingParams(**{**GREEDY.__dict__, "grammar": g}), seed)
        assert re.fullmatch(r"yes|no|maybe [0-9]", d.text), d.text


def test_mask_excludes_padding_logits():
    # the model's logits row may be wider than the tokenizer's vocabulary: padding ids are never chosen
    d = run("smollm2", schema_params(SCHEMAS["cases"][0]["schema"]), n_logits=tok("smollm2").vocab_size + 64)
    jsonschema.validate(json.loads(d.text), SCHEMAS["cases"][0]["schema"])


@pytest.mark.parametrize("bad", SCHEMAS["invalid"])
def test_invalid_schema_is_refused(bad):
    with pytest.raises(InvalidParameterError, match="grammar engine rejected") as e:
        grammar.constraint_for(schema_params(bad), tok("smollm2"))
    assert e.value.param == "response_format"


@pytest.mark.parametrize("field,value", [("grammar", "root ::= ("), ("grammar", "root ::= undefined_rule"),
                                         ("regex", "(unclosed")])
def test_invalid_grammar_is_refused(field, value):
    with pytest.raises(InvalidParameterError) as e:
        grammar.constraint_for(SamplingParams(**{field: value}), tok("smollm2"))
    assert e.value.param == field


def test_unsatisfiable_state_ends_with_grammar_reason(monkeypatch):
    # byte-level vocabularies can spell any text, so a dead end is forced: the engine in an error state (a token it
    # does not allow consumed behind generate's back) admits no token, and generation ends, finish_reason "grammar"
    real = grammar.constraint_for(SamplingParams(regex="[a-z]{5}"), tok("smollm2"))

    class Poisoned:
        def matcher(self):
            m = real.matcher()
            bad = tok("smollm2").encode("7", add_special_bos=False)[0]
            orig = m.consume
            m.consume = lambda t: orig(t) and not m.m.consume_token(bad)
            return m
    import runtime_py.generate as gen
    monkeypatch.setattr(gen, "constraint_for", lambda p, t: Poisoned())
    d = run("smollm2", SamplingParams(**{**GREEDY.__dict__, "regex": "[a-z]{5}"}))
    assert d.finish_reason == grammar.FINISH_GRAMMAR and len(d.ids) == 1


def test_compiled_once_per_grammar_and_tokenizer():
    p = schema_params(SCHEMAS["cases"][1]["schema"])
    a, b = grammar.constraint_for(p, tok("smollm2")), grammar.constraint_for(p, tok("smollm2"))
    assert a._proto is b._proto
    assert grammar.constraint_for(p, tok("gemma3"))._proto is not a._proto


def test_request_fields():
    p = SamplingParams.from_request({"response_format": {"type": "json_object"}})
    assert p.constrained and p.response_format == {"type": "json_object"}
    assert not SamplingParams.from_request({"response_format": {"type": "text"}}).constrained
    for bad, param in [({"response_format": {"type": "xml"}}, "response_format"),
                       ({"response_format": {"type": "json_schema"}}, "response_format"),
                       ({"response_format": "json"}, "response_format"),
                       ({"grammar": 5}, "grammar"),
                       ({"grammar": 'root ::= "a"', "regex": "a"}, "regex")]:
        with pytest.raises(InvalidParameterError) as e:
            SamplingParams.from_request(bad)
        assert e.value.param == param


def test_sampler_mask_is_respected():
    logits = np.arange(10, dtype=np.float64)
    mask = np.zeros(10, bool)
    mask[[2, 5]] = True
    assert Sampler(GREEDY).sample(logits, [], mask) == 5
    s = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3))
    assert {s.sample(logits, [], mask) for _ in range(50)} == {2, 5}


# -- tools ---------------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                          "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}, "auto"])
def test_tool_reply_is_a_valid_call(choice):
    plan = plan_tools([WEATHER, TIME], choice)
    for seed in range(3):
        done = run("smollm2", SamplingParams(**{**GREEDY.__dict__, "response_format": plan.response_format}), seed,
                   max_tokens=200)
        assert done.finish_reason == "stop", done
        content, calls = parse_reply(done.text, plan)
        if choice == "auto" and not calls:
            assert isinstance(content, str)
            continue
        assert len(calls) == 1 and content is None
        f = calls[0]["function"]
        schema = {"get_weather": WEATHER, "get_time": TIME}[f["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(f["arguments"]), schema)
        if isinstance(choice, dict):
            assert f["name"] == "get_time"


def test_tool_choice_validation():
    assert plan_tools(None, None) is None and plan_tools([WEATHER], "none") is None
    for tools, choice, param in [([WEATHER], "sometimes", "tool_choice"), (None, "required", "tool_choice"),
                                 ([{"type": "retrieval"}], None, "tools.0"),
                                 ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
                                 ([WEATHER, WEATHER], None, "tools")]:
        with pytest.raises(InvalidParameterError) as e:
            plan_tools(tools, choice)
        assert e.value.param == param


def test_conversation_rendered_back():
    plan = plan_tools([WEATHER], "auto")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"}]
    out = render_messages(msgs, plan)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and system_prompt(plan) in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_call": {"name": "get_weather",
                                                           "arguments": {"city": "Paris", "unit": "C"}}}
    assert json.loads(out[3]["content"]) == {"tool_response": {"name": "get_weather", "content": "21 C, sunny"}}


def test_template_tools_detection():
    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
