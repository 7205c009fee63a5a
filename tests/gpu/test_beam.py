"""Beam search on the real models (runtime_py/beam_sessions.py: K sessions, KV rows copied on fork), natively and
over HTTP (use_beam_search + n / best_of / length_penalty, official `openai` client and httpx):

- with length_penalty 0 the best beam's cumulative logprob is >= greedy decoding's over the same number of tokens
  (not a theorem for K > 1 — greedy's prefix can be pruned — but what the issue asks to check on the reference
  prompts; tests/bench_beam.py reports every prompt);
- every returned beam's cumulative logprob is what the `score` program computes for its ids from scratch (the sum
  of each token's log-softmax, log P(stop) included): a wrong KV copy on a fork would change every later logit;
- `kiln run --beams --json` and HTTP return the n best, best first, equal to the native search; combinations kiln
  does not implement are refused by name (the flag / the field).
Short generations (N tokens, K <= 3): a beam step is K decode forwards.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from runtime_py.device import NoAdapterError, get_adapter

try:
    get_adapter()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

from runtime_py.beam import BeamSpec, log_softmax       # noqa: E402
from runtime_py.beam_sessions import beam_generate       # noqa: E402
from tests.conftest import fixture_json                  # noqa: E402
from tests.gpu.test_api import API_KEY, Server, _env, assert_error   # noqa: E402

N = 5
CTX = 64
SMOLLM2 = {c["name"]: c["prompt_ids"] for c in fixture_json("smollm2_transformers.json")["cases"]}
GEMMA3 = {c["name"]: c["prompt_ids"] for c in fixture_json("gemma3_transformers.json")["cases"]}
SCORE_TOL = 1e-4        # score (prefill kernels) vs decode logits: ~4e-6 measured; a wrong fork copy is ~0.1+


def run_beams(model, tok, ids, k, n=None, alpha=0.0, max_tokens=N, logprobs=-1):
    sessions = [model.session(CTX) for _ in range(k)]
    *_, done = beam_generate(sessions, tok, ids, BeamSpec(k, n or k, alpha), max_tokens=max_tokens,
                             eog_ids=tok.eog_ids, logprobs=logprobs)
    return done


def greedy_cum(model, tok, ids, max_tokens=N):
    """Greedy decoding's ids and cumulative logprob (ending at an end-of-generation token, with log P(stop))."""
    s, out, cum = model.session(CTX), [], 0.0
    s.forward(ids)
    while len(out) < max_tokens:
        lp = log_softmax(s.logits())
        t = int(np.argmax(lp))
        if t in tok.eog_ids:
            cum += np.log(np.exp(lp[list(tok.eog_ids)]).sum())     # stopping, as beam.py scores it
            break
        cum += lp[t]
        out.append(t)
        if len(out) < max_tokens:
            s.forward([t])
    return out, cum


def scored_cum(model, tok, prompt, hyp) -> float:
    """Cumulative logprob of hyp.ids after `prompt` (+ log P(stop), the EOS ids' summed probability, when it
    stopped), from one `score` pass on a fresh session."""
    seq = list(hyp.ids)
    stopped = hyp.finish_reason == "stop"
    rows = model.session(CTX).score(prompt + seq if stopped else prompt + seq[:-1])[len(prompt) - 1:]
    lps = [log_softmax(r) for r in rows]
    cum = sum(lp[t] for lp, t in zip(lps, seq))
    if stopped:
        cum += np.log(np.exp(lps[-1][list(tok.eog_ids)]).sum())
    return float(cum)


def check_search(model, tok, prompt, k, n_tokens=N):
    done = run_beams(model, tok, prompt, k, max_tokens=n_tokens)
    g_ids, g_cum = greedy_cum(model, tok, prompt, n_tokens)
    best = done.beams[0]
    print(f"K={k}: best beam {best.cum_logprob:.4f} ({best.finish_reason}, {len(best.ids)} tokens) vs greedy "
          f"{g_cum:.4f}; {done.timings['ms_per_beam_step']} ms per step, {done.timings['kv_copies']} KV copies")
    assert len(done.beams) == k and [h.score for h in done.beams] == sorted((h.score for h in done.beams),
                                                                             reverse=True)
    assert best.cum_logprob >= g_cum - 1e-6, (best, g_ids, g_cum)
    assert done.timings["kv_copies"] >= k - 1 and done.timings["forwards"] <= k * (n_tokens - 1)
    for h in done.beams:
        d = scored_cum(model, tok, prompt, h) - h.cum_logprob
        print(f"  beam {h.ids}: score pass - search = {d:.2e}")
        assert abs(d) < SCORE_TOL, h
    return done


@pytest.mark.parametrize("name,k", [("capital", 3), ("code", 2)])
def test_smollm2_best_beam_beats_greedy_and_its_scores_are_true(smollm2_model, smollm2_tokenizer, name, k):
    check_search(smollm2_model, smollm2_tokenizer, SMOLLM2[name], k)


@pytest.fixture(scope="module")
def gemma3():
    from runtime_py.artifacts import ensure_artifact
    from runtime_py.model import Model
    from runtime_py.tokenizer import Tokenizer
    from tests.models import gemma3_gguf_path
    gemma3_gguf_path()                                 # skips, naming the package, when it is not installed
    art = ensure_artifact("gemma3", log=lambda *a: None)
    model = Model(art)
    m = model.manifest
    return model, Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])


def test_gemma3_best_beam_beats_greedy_and_its_scores_are_true(gemma3):
    check_search(*gemma3, GEMMA3["capital"], 2, n_tokens=3)     # a Gemma decode step is ~3x SmolLM2's here


def test_length_penalty_and_logprobs(smollm2_model, smollm2_tokenizer):
    """The same search with length_penalty 1 ranks by cum / len; per-token logprobs add up to the cumulative one."""
    done = run_beams(smollm2_model, smollm2_tokenizer, SMOLLM2["capital"], 2, alpha=1.0, max_tokens=3, logprobs=2)
    for h in done.beams:
        n = len(h.ids) + (h.finish_reason == "stop")
        assert abs(h.score - h.cum_logprob / n) < 1e-12
        assert [t for t, _, _ in h.logprobs] == h.ids and all(len(alts) == 2 for _, _, alts in h.logprobs)
        if h.finish_reason == "length":
            assert abs(sum(lp for _, lp, _ in h.logprobs) - h.cum_logprob) < 1e-9


# -- HTTP ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


PROMPT = "The capital of France is"
_native = {}


def native_prompt_beams(model, tok):
    """K = 2, 3 tokens, length_penalty 0 on PROMPT, natively (what HTTP and the CLI must return), computed once."""
    if not _native:
        _native["done"] = run_beams(model, tok, tok.encode(PROMPT), 2, max_tokens=3)
    return _native["done"]


def test_cli_beams_json(smollm2_model, smollm2_tokenizer):
    out = subprocess.run([sys.executable, "-m", "runtime_py.cli", "run", "smollm2", "-p", PROMPT, "--beams", "2",
                          "-n", "3", "--length-penalty", "0", "--json"], env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    native = native_prompt_beams(smollm2_model, smollm2_tokenizer)
    assert [(b["ids"], b["text"], b["finish_reason"]) for b in d["beams"]] == \
        [(h.ids, t, h.finish_reason) for h, t in zip(native.beams, native.texts)]
    assert d["ids"] == native.ids and d["timings"]["beams"] == 2 and len(d["top_logprobs"]) == len(native.ids)
    for args, flag in ((["--temperature", "0.7"], "--temperature"), (["--speculate", "ngram"], "--speculate")):
        bad = subprocess.run([sys.executable, "-m", "runtime_py.cli", "run", "smollm2", "-p", "x", "--beams", "2",
                              *args], env=_env(), capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and flag in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_http_completion_beams_equal_native(server, smollm2_model, smollm2_tokenizer):
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=300, max_retries=0)
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, n=2,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.0,
                                              "return_token_ids": True})
    native = native_prompt_beams(smollm2_model, smollm2_tokenizer)
    got = [(c.model_extra["token_ids"], c.text, c.finish_reason) for c in r.choices]
    assert got == [(h.ids, t, h.finish_reason) for h, t in zip(native.beams, native.texts)]
    np.testing.assert_allclose([c.model_extra["cumulative_logprob"] for c in r.choices],
                               [h.cum_logprob for h in native.beams], atol=1e-6)
    assert r.usage.completion_tokens == sum(len(h.ids) for h in native.beams)


def test_http_chat_beams_n_of_best_of(server, http_client):
    r = http_client.post("/v1/chat/completions", json={
        "model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2,
        "use_beam_search": True, "n": 2, "best_of": 3, "logprobs": True, "top_logprobs": 1})
    assert r.status_code == 200, r.text
    d = r.json()
    cs = d["choices"]
    assert [c["index"] for c in cs] == [0, 1] and cs[0]["beam_score"] >= cs[1]["beam_score"]
    for c in cs:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length") and c["cumulative_logprob"] <= 0
        assert all(len(e["top_logprobs"]) == 1 for e in c["logprobs"]["content"])
    assert d["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in cs)


@pytest.fixture(scope="module")
def http_client(server):
    import httpx
    with httpx.Client(base_url=server.url, timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


BEAM = {"use_beam_search": True, "n": 2, "max_tokens": 2}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": "smollm2", "prompt": "hi"}
REFUSED = [
    ("/v1/completions", {**COMP, **BEAM, "stream": True}, "stream"),
    ("/v1/chat/completions", {**CHAT, **BEAM, "stream": True}, "stream"),
    ("/v1/chat/completions", {**CHAT, **BEAM, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, **BEAM, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {**COMP, **BEAM, "regex": "a+"}, "regex"),
    ("/v1/completions", {**COMP, **BEAM, "temperature": 0.7}, "temperature"),
    ("/v1/completions", {**COMP, **BEAM, "top_p": 0.5}, "top_p"),
    ("/v1/completions", {**COMP, **BEAM, "stop": ["."]}, "stop"),
    ("/v1/completions", {**COMP, **BEAM, "best_of": 1}, "n"),
    ("/v1/completions", {**COMP, **BEAM, "n": 17}, "n"),
    ("/v1/completions", {**COMP, **BEAM, "early_stopping": True}, "early_stopping"),
    ("/v1/completions", {**COMP, "length_penalty": 0.5}, "length_penalty"),
    ("/v1/chat/completions", {**CHAT, "best_of": 2}, "best_of"),
    ("/v1/completions", {**COMP, **BEAM, "length_penalty": "long"}, "length_penalty"),
    # with length_penalty > 0 the search runs to max_tokens: the default (the rest of the context) is refused
    ("/v1/completions", {**COMP, "use_beam_search": True, "n": 2}, "max_tokens"),
]


@pytest.mark.parametrize("path,body,param", REFUSED, ids=[f"{p.split('/')[2][:4]}-{f}" for p, _, f in REFUSED])
def test_http_beam_refusals_name_the_field(http_client, path, body, param):
    assert_error(http_client.post(path, json=body), 400, param=param)
