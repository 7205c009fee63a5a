"""Fixtures of the browser end-to-end tests: the compiled default model, a live server, headless Chromium on WebGPU.

    artifact        SmolLM2's artifact dir, compiled once through runtime_py.artifacts.ensure_artifact (the user's
                    cache, or $KILN_CACHE)
    server          the demo app (runtime_py.server.create_app, native API off) on 127.0.0.1, ephemeral port, in a
                    background thread; `server.requests` lists every path it was asked for
    launch          launch(webgpu=True) -> Browser: THE place where Chromium's flags live
    browser         one WebGPU-enabled Chromium for the session; `context` one browser context (one Cache Storage)
    new_page        a page whose console errors, page errors and failed requests are recorded; they are appended to
                    the report of a failing test
    load_model      load_model(page, base_url, model, expect_state, selftest): open the demo, click Load, wait
    demo            the demo page with SmolLM2 loaded (shared by the chat tests: loading costs ~10 s on SwiftShader)

Chromium is Debian's /usr/bin/chromium ($KILN_CHROMIUM overrides); with `--enable-unsafe-webgpu` headless Chromium
gets a SwiftShader (CPU) adapter: f32 only, ~12 µs per dispatch, a few seconds per SmolLM2 token.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")
BASE_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
# SwiftShader's WebGPU adapter. Not `--use-angle=vulkan`: it hangs headless Chromium here.
WEBGPU_ARGS = ["--enable-unsafe-webgpu", "--enable-features=Vulkan"]
LOAD_TIMEOUT_MS = 180_000        # download + verify + upload + shader compile + self-test (~10 s here)
TOKEN_TIMEOUT_MS = 30_000        # one SwiftShader decode step takes ~3.5 s; prefill of a chat prompt ~20 s
SHARD_RE = re.compile(r"/shard-\d+\.bin$")

HERE = Path(__file__).resolve().parent
WEB_DEPS = HERE.parents[1] / "web" / "node_modules" / "@huggingface" / "tokenizers"


def pytest_collection_modifyitems(config, items):
    """Skip (not fail) this directory's tests on a machine without Chromium; this hook sees every collected item."""
    if Path(CHROMIUM).exists():
        return
    skip = pytest.mark.skip(reason=f"{CHROMIUM} not found (apt-get install chromium, or set KILN_CHROMIUM)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


# -- model and server ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def artifact() -> Path:
    from runtime_py.artifacts import ensure_artifact
    return ensure_artifact("smollm2")


class Server:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread, recording request paths."""

    def __init__(self, app):
        import uvicorn
        self.requests: list[str] = []
        self.ranges: list[tuple[str, str | None]] = []     # (path, Range header) of each shard request
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self._record(app), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def _record(self, app):
        async def recorder(scope, receive, send):
            if scope["type"] == "http":
                self.requests.append(scope["path"])
                if SHARD_RE.search(scope["path"]):
                    self.ranges.append((scope["path"], dict(scope["headers"]).get(b"range", b"").decode() or None))
            await app(scope, receive, send)
        return recorder

    def shard_requests(self, since: int = 0) -> list[str]:
        return [p for p in self.requests[since:] if SHARD_RE.search(p)]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="session")
def server(artifact):
    from runtime_py.server import create_app
    if not WEB_DEPS.exists():
        pytest.fail("web/node_modules is missing: run `make web` (npm install in web/)")
    s = Server(create_app(["smollm2"], native=False, log=lambda *a: None))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def bad_server(artifact, tmp_path_factory):
    """A second origin serving broken copies of the model: "corrupt" (one byte of shard-001 flipped),
    "badselftest" (good shards, the manifest's self-test logits moved by +1), "huge" (a weight part too big to bind),
    "flaky" (good, but the connection of the first download of shard-000 drops halfway), "editedshader" /
    "editedtokenizer" (one file changed after compiling), "editedmanifest" (a field changed, checksum not updated)."""
    import json

    from fastapi import FastAPI

    from runtime_py.server import WEB_DIR
    from runtime_py.static import mount_static
    root = tmp_path_factory.mktemp("bad-artifacts")

    def clone(name: str) -> Path:
        out = root / name
        shutil.copytree(artifact / "shaders", out / "shaders")
        for f in ("manifest.json", "tokenizer.json", *(p.name for p in artifact.glob("shard-*.bin"))):
            try:
                os.link(artifact / f, out / f)      # hard links: same bytes, no copy, and inside the served root
            except OSError:
                shutil.copy(artifact / f, out / f)
        return out

    corrupt = clone("corrupt")
    shard = corrupt / "shard-001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.unlink()                                  # break the hard link before writing
    shard.write_bytes(bytes(data))

    def edit_manifest(out: Path, edit, reseal: bool = True):
        """reseal: recompute manifest_sha256 (the edit is what's tested); False: the edit itself must be caught."""
        from compiler.manifest import manifest_bytes
        m = json.loads((out / "manifest.json").read_text())
        edit(m)
        (out / "manifest.json").unlink()
        data = manifest_bytes(m, check=False) if reseal else json.dumps(m, indent=1).encode()
        (out / "manifest.json").write_bytes(data)

    def edit_file(out: Path, rel: str, edit):
        data = edit((out / rel).read_bytes())
        (out / rel).unlink()                        # break the hard link / copy before writing
        (out / rel).write_bytes(data)

    badst = clone("badselftest")
    edit_manifest(badst, lambda m: m["selftest"].update(top5=[[i, v + 1.0] for i, v in m["selftest"]["top5"]]))
    huge = clone("huge")     # a weight part of 2 GiB: more than any adapter binds; must fail before downloading
    edit_manifest(huge, lambda m: next(iter(m["weights"].values()))["parts"][0].update(bytes=2 << 30))

    flaky = clone("flaky")   # good files; the first download of shard-000 is cut off halfway (see drop_once)

    # files edited after compiling (issue 9): each must be refused by its sha256 / the manifest's checksum
    editedshader = clone("editedshader")
    shader = json.loads((artifact / "manifest.json").read_text())["programs"]["decode"][-1]["kernel"]
    edit_file(editedshader, f"shaders/{shader}.wgsl", lambda b: b + b"\n// edited\n")
    editedtok = clone("editedtokenizer")
    edit_file(editedtok, "tokenizer.json", lambda b: b + b"\n")
    editedmanifest = clone("editedmanifest")     # a program parameter changed, the checksum left as it was
    edit_manifest(editedmanifest, lambda m: m["programs"]["decode"][1]["params"].__setitem__(0, 7), reseal=False)

    app = FastAPI()
    mount_static(app, WEB_DIR, {"corrupt": corrupt, "badselftest": badst, "huge": huge, "flaky": flaky,
                                "editedshader": editedshader, "editedtokenizer": editedtok,
                                "editedmanifest": editedmanifest})
    s = Server(drop_once(app, "/models/flaky/shard-000.bin"))
    yield s
    s.stop()


def drop_once(app, path: str):
    """ASGI wrapper: the first full (non-Range) GET of `path` sends half its body, then drops the connection."""
    state = {"dropped": False}

    async def wrapper(scope, receive, send):
        ranged = any(k == b"range" for k, _ in scope.get("headers", []))
        if scope["type"] != "http" or scope["path"] != path or ranged or state["dropped"]:
            return await app(scope, receive, send)
        state["dropped"] = True
        sent = {"total": None, "n": 0}

        async def cut(msg):
            if msg["type"] == "http.response.start":
                sent["total"] = int(dict(msg["headers"])[b"content-length"])
            elif msg["type"] == "http.response.body":
                sent["n"] += len(msg.get("body", b""))
                if sent["n"] > sent["total"] // 2:
                    raise ConnectionAbortedError("test: connection dropped mid-shard")
            await send(msg)
        try:
            await app(scope, receive, cut)
        except ConnectionAbortedError:
            pass    # uvicorn then closes the connection short of Content-Length: a network error in the browser
    return wrapper


# -- browser ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def playwright():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def launch(playwright):
    """launch(webgpu=True): headless Debian Chromium; the only place that knows the flags."""
    browsers = []

    def _launch(webgpu: bool = True):
        b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                       args=BASE_ARGS + (WEBGPU_ARGS if webgpu else []))
        browsers.append(b)
        return b
    yield _launch
    for b in browsers:
        b.close()


@pytest.fixture(scope="session")
def browser(launch):
    return launch(webgpu=True)


@pytest.fixture(scope="session")
def context(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 850})
    ctx.set_default_timeout(TOKEN_TIMEOUT_MS)
    yield ctx
    ctx.close()


class BrowserLog:
    """Console errors / warnings, page errors and failed requests of the pages a test opened."""

    def __init__(self):
        self.lines: list[str] = []

    def attach(self, page):
        page.on("console", lambda m: self.lines.append(f"console.{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.lines.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.lines.append(f"requestfailed: {r.url} {r.failure}"))
        return page

    def since(self, n: int) -> str:
        return "\n".join(self.lines[n:]) or "(nothing)"


@pytest.fixture(scope="session")
def browser_log() -> BrowserLog:
    return BrowserLog()


@pytest.fixture(autouse=True)
def _console_in_report(request, browser_log):
    """Appends what the browser logged during a failing test to its report."""
    start = len(browser_log.lines)
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        rep.sections.append(("browser console", browser_log.since(start)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


@pytest.fixture
def new_page(context, browser_log):
    pages = []

    def _new(ctx=None):
        page = browser_log.attach((ctx or context).new_page())
        pages.append(page)
        return page
    yield _new
    for p in pages:
        p.close()


def _load_model(page, base_url: str, model: str = "smollm2", expect_state: str = "ready", selftest: bool = True):
    """Opens the demo at `base_url`, picks `model`, clicks Load and waits for `expect_state`."""
    from playwright.sync_api import expect
    page.goto(f"{base_url}/?model={model}" + ("" if selftest else "&selftest=off"))
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    page.click("#load")
    expect(page.locator("body")).to_have_attribute("data-state", expect_state, timeout=LOAD_TIMEOUT_MS)
    return page


@pytest.fixture(scope="session")
def load_model():
    return _load_model


@pytest.fixture(scope="session")
def demo(context, server, browser_log):
    """The demo page with SmolLM2 loaded, shared by the chat tests (closed at the end of the session)."""
    page = browser_log.attach(context.new_page())
    t0 = time.monotonic()
    _load_model(page, server.url)
    page.evaluate("(s) => { window.kilnTestLoadS = s; }", time.monotonic() - t0)
    yield page
    page.close()
