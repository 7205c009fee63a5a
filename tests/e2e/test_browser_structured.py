"""Constrained output in the browser (web/grammar.js, @mlc-ai/web-xgrammar in wasm) against the native runtime
(runtime_py/grammar.py, llguidance) on SmolLM2: the same ids for the same request where both engines give the same
masks (json_object, a regex: checked token by token in tests/unit/test_grammar.py's terms below), a JSON Schema output
that validates, and a grammar the engine rejects is an InvalidParameterError naming the field (the stream too).
Short generations: SwiftShader takes seconds per token.
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
