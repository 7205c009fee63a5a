"""Gemma 3 270M (Q4_K_M) in the browser: the split 178 MB embedding, K-quant shaders, SentencePiece tokenizer.

Greedy ids from the demo page (SwiftShader) must equal runtime_py's on the same artifact. Gemma is ~5x SmolLM2's
work per token and SwiftShader is slow, so the check is a short one: the self-test plus a chat turn of 4 greedy
tokens (the gemma chat template fallback in chat.js must give the same prompt ids as runtime_py/chat.py).
"""
from __future__ import annotations

import pytest

from tests.models import gemma3_gguf_path

N_TOKENS = 4
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GEMMA_TIMEOUT_MS = 600_000


@pytest.fixture(scope="module")
def gemma_artifact():
    gemma3_gguf_path()   # skips with the install hint when the gemma package is absent
    from runtime_py.artifacts import ensure_artifact
    return ensure_artifact("gemma3", log=lambda *a: None)


@pytest.fixture(scope="module")
def gemma_server(gemma_artifact):
    from runtime_py.server import create_app
    from tests.e2e.conftest import Server
    s = Server(create_app(["gemma3"], native=False, log=lambda *a: None))
    yield s
    s.stop()


def native_greedy(art, messages) -> tuple[list[int], list[int]]:
    from runtime_py.generate import Done, generate
    from runtime_py.model import Model
    from runtime_py.sampling import GREEDY
    from runtime_py.tokenizer import Tokenizer
    model = Model(art)
    m = model.manifest
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    from runtime_py.chat import chat_prompt_ids
    # no template in this GGUF: the compiler wrote llama.cpp's gemma template into the manifest
    ids = chat_prompt_ids(tok, m, messages)
    for ev in generate(model.session(ctx=64), tok, ids, GREEDY, max_tokens=N_TOKENS, eog_ids=tok.eog_ids):
        if isinstance(ev, Done):
            return ids, ev.ids


def test_gemma3_chat_greedy_matches_native(new_page, gemma_server, gemma_artifact, load_model):
    page = new_page()
    page.set_default_timeout(GEMMA_TIMEOUT_MS)
    from playwright.sync_api import expect
    page.goto(f"{gemma_server.url}/?model=gemma3")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.click("#load")
    expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=GEMMA_TIMEOUT_MS)
    st = page.evaluate("window.kiln.engine.selftest")
    assert st["ok"], st
    r = page.evaluate("""async (messages) => {
        const r = await window.kiln.engine.chat.completions.create({messages, temperature: 0, max_tokens: %d});
        return {...r.kiln, text: r.choices[0].message.content};
    }""" % N_TOKENS, MESSAGES)
    want_prompt, want = native_greedy(gemma_artifact, MESSAGES)
    print(f"gemma browser timings {r['timings']}, ids {r['ids']}")
    assert r["prompt_ids"] == want_prompt, "tokenizer.js disagrees with runtime_py/tokenizer.py (BOS, SentencePiece)"
    assert r["ids"] == want
