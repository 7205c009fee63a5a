"""The browser's mirrors of runtime_py, run in the page against the Python originals (no GPU work, a few seconds):

    web/sampler.js    == runtime_py/sampling.py   same ids for the same seed, across the sampling chain
    web/tokenizer.js  == llama.cpp's ids          tests/fixtures/smollm2_tokenizer.json (control tokens parsed)
    web/chat.js       == runtime_py/chat.py       the model's template and the fallback ones
    web/generate.js   == runtime_py/generate.py   StopStrings
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLING_CASES = [
    {},
    {"top_k": 0},
    {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "temperature": 1.5},
    {"top_k": 5, "temperature": 2.0},
    {"top_p": 0.5, "min_p": 0.2, "top_k": 100},
    {"repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3},
    {"temperature": 0.0},
    {"temperature": 0.0, "repeat_penalty": 1.5},
]


@pytest.fixture(scope="module")
def page(context, server, browser_log):
    p = browser_log.attach(context.new_page())
    p.goto(server.url)
    yield p
    p.close()


def test_sampler_matches_python(page):
    from runtime_py.sampling import Mulberry32, Sampler, SamplingParams
    rng = np.random.default_rng(0)
    cases = []
    for i, kw in enumerate(SAMPLING_CASES):
        logits = (rng.normal(size=4096) * 3).astype(np.float32)
        logits[rng.integers(0, 4096, 8)] = logits.max()          # ties at the top: order must be stable
        history = [int(x) for x in rng.integers(0, 4096, 80)] + [int(np.argmax(logits))]
        s = Sampler(SamplingParams(seed=1000 + i, **kw))
        cases.append({"kw": kw, "seed": 1000 + i, "logits": logits.tolist(), "history": history,
                      "ids": [s.sample(logits, history) for _ in range(25)]})
    rand = Mulberry32(42)
    want_rand = [rand.next() for _ in range(100)]
    got = page.evaluate("""async ({cases}) => {
        const {Sampler, SamplingParams, Mulberry32} = await import('/web/sampler.js');
        const r = new Mulberry32(42);
        return {rand: Array.from({length: 100}, () => r.next()),
                ids: cases.map((c) => {
                  const s = new Sampler(new SamplingParams({...c.kw, seed: c.seed}));
                  const logits = Float32Array.from(c.logits);
                  return Array.from({length: 25}, () => s.sample(logits, c.history));
                })};
    }""", {"cases": cases})
    assert got["rand"] == want_rand
    for c, ids in zip(cases, got["ids"]):
        assert ids == c["ids"], c["kw"]


def test_tokenizer_matches_llamacpp(page):
    ref = json.loads((FIXTURES / "smollm2_tokenizer.json").read_text(encoding="utf-8"))
    got = page.evaluate("""async (cases) => {
        const lib = await import('@huggingface/tokenizers');
        const {Tokenizer} = await import('/web/tokenizer.js');
        const info = (await (await fetch('/models/smollm2/manifest.json')).json()).tokenizer;
        const tok = await Tokenizer.load(lib, '/models/smollm2/tokenizer.json', info);
        return cases.map((c) => ({ids: tok.encode(c.text), text: tok.decode(c.ids)}));
    }""", ref["cases_special"])
    for case, g in zip(ref["cases_special"], got):
        assert g["ids"] == case["ids"], case["text"]
        assert g["text"] == case["text"]


def test_chat_templates_match_python(page, artifact):
    from runtime_py.chat import CHATML_TEMPLATE, GEMMA_TEMPLATE, render_chat
    manifest = json.loads((artifact / "manifest.json").read_text())
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "What is 2+2?"}]]
    cases = [{"template": t, "messages": msgs, "want": render_chat(t, msgs, bos_token="<s>", eos_token="</s>")}
             for t in (manifest["chat_template"], CHATML_TEMPLATE, GEMMA_TEMPLATE) for msgs in convs]
    got = page.evaluate("""async (cases) => {
        const jinja = await import('@huggingface/jinja');
        const {renderChat} = await import('/web/chat.js');
        return cases.map((c) => renderChat(jinja, c.template, c.messages, {bos_token: '<s>', eos_token: '</s>'}));
    }""", cases)
    assert got == [c["want"] for c in cases]
    js_fallbacks = page.evaluate("""async () => {
        const c = await import('/web/chat.js');
        return [c.CHATML_TEMPLATE, c.GEMMA_TEMPLATE];
    }""")
    assert js_fallbacks == [CHATML_TEMPLATE, GEMMA_TEMPLATE], "web/chat.js fallback templates drifted from chat.py"


def test_stop_strings_match_python(page):
    from runtime_py.generate import StopStrings
    cases = [
        (["\n\n"], ["Hello", " world", "\n", "\nmore"]),
        (["END", "STOP"], ["a S", "TO", "P b END"]),
        (["ab", "b"], ["xa", "b"]),                      # one delta completes both: the earliest wins
        (["<|im_end|>"], ["Paris", ".", "<|im", "_end|>", "tail"]),
        (["zz"], ["no stop here", " at all z"]),
        ([], ["plain", " text"]),
    ]
    want = []
    for stops, deltas in cases:
        s, out = StopStrings(stops), []
        for d in deltas:
            text, cut = s.feed(d)
            out.append([text, cut])
            if cut:
                break
        else:
            out.append([s.flush(), False])
        want.append(out)
    got = page.evaluate("""async (cases) => {
        const {StopStrings} = await import('/web/generate.js');
        return cases.map(([stops, deltas]) => {
            const s = new StopStrings(stops), out = [];
            for (const d of deltas) {
                const [text, cut] = s.feed(d);
                out.push([text, cut]);
                if (cut) return out;
            }
            out.push([s.flush(), false]);
            return out;
        });
    }""", [list(c) for c in cases])
    assert got == want
