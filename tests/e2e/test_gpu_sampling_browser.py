"""Seeded sampling on the GPU, in the browser (web/engine.js decodeSample + web/generate.js on SwiftShader) equals
native (runtime_py on this machine's adapter) for the same artifact and seed: both replay the same `sample` program
with the same Mulberry32 seed, so a difference is a runtime bug or a kernel that is not robust across adapters."""
from __future__ import annotations

import pytest

N_TOKENS = 12
PROMPT = "Once upon a time, in a small village by the sea,"
REQUEST = dict(temperature=0.7, top_p=0.9, seed=1)


@pytest.fixture(scope="module")
def native_sampled(artifact):
    from runtime_py.device import NoAdapterError
    from runtime_py.generate import generate
    from runtime_py.model import Model
    from runtime_py.sampling import SamplingParams
    from runtime_py.tokenizer import Tokenizer
    try:
        model = Model(artifact)
    except NoAdapterError as e:
        pytest.skip(f"no native WebGPU adapter for the parity reference: {e}")
    m = model.manifest
    tok = Tokenizer(artifact / m["tokenizer"]["file"], m["tokenizer"])
    s = model.session(ctx=256)
    assert s.gpu_sampling()
    ids = tok.encode(PROMPT)
    done = list(generate(s, tok, ids, SamplingParams.from_request(REQUEST), max_tokens=N_TOKENS, logprobs=3))
    return ids, done[-1].ids, [e.top_logprobs for e in done[:-1] if e.id >= 0]


def test_seeded_gpu_sampling_matches_native(demo, native_sampled):
    prompt_ids, want, want_lp = native_sampled
    r = demo.evaluate("""async ([prompt, req, n]) => {
        const r = await window.kiln.engine.completions.create({prompt, ...req, max_tokens: n, logprobs: 3});
        return {...r.kiln, text: r.choices[0].text, logprobs: r.choices[0].logprobs};
    }""", [PROMPT, REQUEST, N_TOKENS])
    assert r["prompt_ids"] == prompt_ids
    assert r["ids"] == want, f"browser {r['ids']} != native {want}"
    content = r["logprobs"]["content"]
    assert len(content) == len(want_lp)
    # the model's own top-3 at each step, computed on each GPU: the same WGSL, but SwiftShader and lavapipe differ in
    # FMA contraction and transcendental precision, ~1e-3 after 30 layers (measured: 1.02e-3 at worst); the ids above
    # are exact, and a wrong kernel is off by far more than this
    for entry, native in zip(content, want_lp):
        got = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(got) == 3 and all(abs(a - b) < 2e-3 for a, (_, b) in zip(got, native)), (got, native)
