"""Speculative decoding in the browser (web/speculate.js, the mirror of runtime_py/speculate.py): an engine created
with {speculate: "ngram"} gives, greedily, the same ids as the demo's plain engine and as native plain greedy, on a
repetitive prompt where prompt lookup drafts (so score passes and rewinds really run); usage.speculative reports the
acceptance. A short generation: a score pass costs several decode steps on SwiftShader."""
from __future__ import annotations

import pytest

N_TOKENS = 10
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3,"


@pytest.fixture(scope="module")
def native_greedy(artifact):
    from runtime_py.device import NoAdapterError
    from runtime_py.generate import generate
    from runtime_py.model import Model
    from runtime_py.sampling import GREEDY
    from runtime_py.speculate import NgramDrafter
    from runtime_py.tokenizer import Tokenizer
    try:
        model = Model(artifact)
    except NoAdapterError as e:
        pytest.skip(f"no native WebGPU adapter for the parity reference: {e}")
    m = model.manifest
    tok = Tokenizer(artifact / m["tokenizer"]["file"], m["tokenizer"])
    ids = tok.encode(PROMPT)
    plain = list(generate(model.session(ctx=128), tok, ids, GREEDY, max_tokens=N_TOKENS))[-1]
    spec = list(generate(model.session(ctx=128), tok, ids, GREEDY, max_tokens=N_TOKENS, speculate=NgramDrafter()))[-1]
    assert spec.ids == plain.ids, (spec.ids, plain.ids)
    return ids, plain.ids, spec.timings


def test_browser_speculation_is_plain_greedy(demo, native_greedy):
    prompt_ids, want, native_t = native_greedy
    r = demo.evaluate("""async ([prompt, n]) => {
        const api = await import('/web/api.js');
        const req = {prompt, temperature: 0, max_tokens: n};
        const plain = await window.kiln.engine.completions.create(req);
        const engine = await api.createEngine("/models/smollm2/", {speculate: "ngram", selftest: "off"});
        try {
          const spec = await engine.completions.create(req);
          return {plain: plain.kiln, spec: spec.kiln, usage: spec.usage};
        } finally {
          engine.unload();
        }
    }""", [PROMPT, N_TOKENS])
    assert r["plain"]["prompt_ids"] == prompt_ids == r["spec"]["prompt_ids"]
    assert r["plain"]["ids"] == want, f"browser plain {r['plain']['ids']} != native {want}"
    assert r["spec"]["ids"] == want, f"browser speculative {r['spec']['ids']} != plain {want}"
    t = r["spec"]["timings"]
    assert t["speculate"] == "ngram" and t["draft_tokens"] > 0 and t["passes"] < N_TOKENS - 1, t
    assert r["usage"]["speculative"]["accepted_tokens"] == t["accepted_tokens"], r["usage"]
    print(f"browser acceptance {t['acceptance_rate']} over {t['passes']} passes; native {native_t['acceptance_rate']}")


def test_draft_model_is_refused_by_name(demo):
    got = demo.evaluate("""async () => {
        const api = await import('/web/api.js');
        try {
          await api.createEngine("/models/smollm2/", {speculate: "smollm2"});
          return null;
        } catch (e) {
          return [e.constructor.name, e.param ?? null, e.message];
        }
    }""")
    assert got[:2] == ["InvalidParameterError", "speculate"] and "natively" in got[2], got


def test_drafter_and_draft_length_match_python(demo):
    """NgramDrafter.draft and DraftLength's k after each outcome, web/speculate.js against runtime_py/speculate.py."""
    import numpy as np
    from runtime_py.speculate import PASS_COST, DraftLength, NgramDrafter
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 4, size=int(n)).tolist() for n in rng.integers(1, 40, size=30)]
    outcomes = [(int(d), int(rng.integers(0, d + 1))) if d else (0, int(rng.integers(0, 2)))
                for d in rng.integers(0, 8, size=60)]             # (drafted, kept) passes; drafted 0: a probe
    got = demo.evaluate("""async ([histories, outcomes]) => {
        const m = await import('/web/speculate.js');
        const d = new m.NgramDrafter(5);
        const drafts = histories.map((h) => d.draft(h, 5));
        const ks = [];
        for (const cls of ["cpu", "gpu"]) {
          const L = new m.DraftLength(7, m.PASS_COST[cls]);
          for (const [drafted, kept] of outcomes) {
            if (drafted) L.update(drafted, kept); else L.probe(kept === 1);
            ks.push(L.k());
          }
        }
        return {drafts, ks};
    }""", [histories, outcomes])
    d = NgramDrafter(5)
    assert got["drafts"] == [d.draft(h, 5) for h in histories]
    ks = []
    for cls in ("cpu", "gpu"):
        length = DraftLength(7, PASS_COST[cls])
        for drafted, kept in outcomes:
            length.update(drafted, kept) if drafted else length.probe(kept == 1)
            ks.append(length.k())
    assert got["ks"] == ks and len(set(ks)) > 2, ks
