"""Decode speed of the browser runtime next to the native one, measured in the same run on this machine, plus a
screenshot of the demo mid-chat. Prints; asserts nothing.

    .venv/bin/python tests/e2e/bench_browser.py [--tokens 16] [--swiftshader] [--screenshot /tmp/kiln-demo.png]

    native      runtime_py (wgpu-py) on the default Vulkan adapter (lavapipe on a CPU-only machine)
    native-ss   the same on SwiftShader (--swiftshader: Chromium's Vulkan ICD via VK_ICD_FILENAMES), so the browser
                is compared with the very same Vulkan implementation
    browser     web/ in headless Chromium (WebGPU on SwiftShader), greedy through engine.completions.create
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SWIFTSHADER_ICD = "/usr/lib/chromium/vk_swiftshader_icd.json"
PROMPT = "Once upon a time, in a small village,"
CHAT = "What is the capital of France? Answer in one sentence."


def _conftest():
    spec = importlib.util.spec_from_file_location("kiln_e2e_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def native(art: Path, tokens: int) -> dict:
    from runtime_py.generate import Done, generate
    from runtime_py.model import Model
    from runtime_py.sampling import GREEDY
    from runtime_py.tokenizer import Tokenizer
    t0 = time.perf_counter()
    model = Model(art)
    load_s = time.perf_counter() - t0
    m = model.manifest
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    s = model.session(ctx=256)
    for ev in generate(s, tok, tok.encode(PROMPT), GREEDY, max_tokens=tokens):
        if isinstance(ev, Done):
            return {"load_s": round(load_s, 2), **ev.timings, "ids": ev.ids,
                    "adapter": model.device.adapter.info.get("device", "")}


def native_swiftshader(art: Path, tokens: int) -> dict:
    env = {**os.environ, "VK_ICD_FILENAMES": SWIFTSHADER_ICD}
    out = subprocess.run([sys.executable, "-m", "runtime_py.cli", "run", str(art), "--prompt", PROMPT,
                          "--temperature", "0", "-n", str(tokens), "--json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return {**d["timings"], "ids": d["ids"], "adapter": "SwiftShader (native)"}


def browser(art: Path, tokens: int, screenshot: str) -> dict:
    from playwright.sync_api import expect, sync_playwright

    from runtime_py.server import create_app
    cf = _conftest()
    server = cf.Server(create_app([str(art)], native=False, log=lambda *a: None))
    model_id = art.name
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=cf.CHROMIUM, headless=True, args=cf.BASE_ARGS + cf.WEBGPU_ARGS)
            page = b.new_page(viewport={"width": 1100, "height": 850})
            page.on("console", lambda m: print(f"  console.{m.type}: {m.text}", file=sys.stderr)
                    if m.type == "error" else None)
            t0 = time.perf_counter()
            page.goto(f"{server.url}/?model={model_id}")
            expect(page.locator("body")).to_have_attribute("data-state", "idle")
            page.click("#load")
            expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=cf.LOAD_TIMEOUT_MS)
            load_s = time.perf_counter() - t0
            info = page.evaluate("window.kiln.engine.info")
            r = page.evaluate("""async ([prompt, n]) => (await window.kiln.engine.completions.create(
                {prompt, temperature: 0, max_tokens: n})).kiln""", [PROMPT, tokens])
            # the demo mid-chat, for a look at the page
            page.locator("#settings").evaluate("d => { d.open = true; }")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#prompt", CHAT)
            page.click("#send")
            expect(page.locator(".msg.assistant.streaming")).to_contain_text(" ", timeout=300_000)
            page.wait_for_function("document.querySelector('.msg.assistant.streaming')?.textContent.length > 20",
                                   timeout=300_000)
            page.screenshot(path=screenshot, full_page=True)
            page.click("#stop")
            expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=120_000)
            b.close()
    finally:
        server.stop()
    return {"load_s": round(load_s, 2), **r["timings"], "ids": r["ids"], "adapter": info["adapter"],
            "selftest_max_diff": info["selftest"].get("max_diff")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--swiftshader", action="store_true", help="also run the native runtime on SwiftShader (slow)")
    ap.add_argument("--screenshot", default="/tmp/kiln-demo.png")
    a = ap.parse_args()
    from runtime_py.artifacts import ensure_artifact
    art = ensure_artifact("smollm2")
    rows = {"native": native(art, a.tokens)}
    if a.swiftshader and Path(SWIFTSHADER_ICD).exists():
        rows["native-ss"] = native_swiftshader(art, a.tokens)
    rows["browser"] = browser(art, a.tokens, a.screenshot)
    print(f"\nSmolLM2-135M Q4_1, greedy, prompt of {rows['native']['prompt_tokens']} tokens, {a.tokens} new tokens "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'runtime':10s} {'adapter':32s} {'load s':>7s} {'ttft s':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['adapter'][:32]:32s} {r.get('load_s', float('nan')):7.2f} {r['ttft_s']:7.2f} "
              f"{r['prefill_tok_s']:14.2f} {r['decode_tok_s'] or 0:13.2f}")
    same = all(r["ids"] == rows["native"]["ids"] for r in rows.values())
    print(f"greedy ids identical across runtimes: {same}")
    if not same:
        for name, r in rows.items():
            print(f"  {name}: {r['ids']}")
    print(f"screenshot: {a.screenshot}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
