"""The int8-activation programs in the browser (`?activations=int8`: web/engine.js choosePrograms on SwiftShader, WGSL
dot4I8Packed through Chromium's Tint) run, pass their own self-test reference (manifest selftest.int8_top5, recorded
natively by runtime_py/artifacts.py) and give the native int8 path's greedy tokens: same WGSL, same choice."""
from __future__ import annotations

import pytest

N_TOKENS = 8
PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def native_int8(artifact):
    from runtime_py.device import NoAdapterError
    from runtime_py.generate import Done, generate
    from runtime_py.model import Model
    from runtime_py.sampling import GREEDY
    from runtime_py.tokenizer import Tokenizer
    try:
        model = Model(artifact, activations="int8")
    except NoAdapterError as e:
        pytest.skip(f"no native WebGPU adapter for the parity reference: {e}")
    assert model.activations == "int8", model.activations_note   # lavapipe has dot4I8Packed
    m = model.manifest
    tok = Tokenizer(artifact / m["tokenizer"]["file"], m["tokenizer"])
    done = [e for e in generate(model.session(ctx=256), tok, tok.encode(PROMPT), GREEDY, max_tokens=N_TOKENS)
            if isinstance(e, Done)][-1]
    return done.ids


def test_int8_activations_in_the_browser(new_page, server, native_int8):
    from playwright.sync_api import expect
    page = new_page()
    page.goto(f"{server.url}/?model=smollm2&activations=int8")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.click("#load")
    expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=300_000)   # + the int8 self-test run
    info = page.evaluate("window.kiln.engine.info")
    assert info["activations"] == "int8", info.get("activations_note")   # SwiftShader + Tint have dot4I8Packed
    st = info["selftest"]
    assert st["ok"] and st["activations"] == "int8", st
    r = page.evaluate("""async ([prompt, n]) => {
        const r = await window.kiln.engine.completions.create({prompt, temperature: 0, max_tokens: n});
        return r.kiln;
    }""", [PROMPT, N_TOKENS])
    assert r["ids"] == native_int8, f"browser {r['ids']} != native {native_int8}"
