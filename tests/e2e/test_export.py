"""`kiln export` in the browser: the static site served by nginx (web/deploy/nginx.conf) and by `python -m http.server`
under a sub-path, the models on a second origin through CORS, and hosts that send wrong MIME types.

Each host gets a browser context of its own (its own Cache Storage). On every host the demo loads, passes its
self-test and generates the native runtime's greedy ids; a second load makes no shard requests (the runtime's Cache
API). Requests are read from the servers' own logs, so they include the worker's fetches.

nginx runs in the foreground as this user: its own nginx.conf around the sample `server` block (listen and root
replaced), pid, logs and temp files in a tmp dir, 127.0.0.1 on a free port.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "web" / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SUB = "apps/kiln"                      # the sub-path the site is served under
SHARD = re.compile(r"/shard-\d+\.[0-9a-f]{16}\.bin$")
PROMPT = "The capital of France is"
N_TOKENS = 4                           # ~3.5 s per SwiftShader decode step
GENERATE_TIMEOUT_S = 120
LOAD_TIMEOUT_S = 180                   # download + verify + upload + shader compile + self-test
START_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path):
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not start on port {port}:\n{log.read_text() if log.exists() else ''}")


class Host:
    """A static web server subprocess on 127.0.0.1:<port> serving `root`; `requests()` reads its access log."""
    url: str
    proc: subprocess.Popen
    log: Path
    line: re.Pattern

    def requests(self) -> list[str]:
        """Request paths (no query) in arrival order."""
        text = self.log.read_text() if self.log.exists() else ""
        return [m.group(1).split("?")[0] for m in self.line.finditer(text)]

    def shard_requests(self, since: int = 0) -> list[str]:
        return [p for p in self.requests()[since:] if SHARD.search(p)]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Nginx(Host):
    line = re.compile(r"^GET (\S+) \d+$", re.M)

    def __init__(self, work: Path, root: Path, site: str | None = None, edit=lambda conf: conf):
        """site: a `server` block with {port} and {root} (default: the sample config with its listen and root
        replaced, then passed through `edit`)."""
        if not Path(NGINX).exists():
            pytest.fail("nginx not found: `make system` installs it (apt-get install nginx)")
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        if site is None:
            site = SAMPLE.read_text()
            for old, new in (("listen 8080;", f"listen 127.0.0.1:{port};"), ("root /srv/www;", f"root {root};")):
                assert site.count(old) == 1, f"{SAMPLE}: expected one `{old}` line to replace"
                site = site.replace(old, new)
            site = edit(site)
        else:
            site = site.format(port=port, root=root)
        self.root = root
        (work / "site.conf").write_text(site)
        self.log = work / "access.log"
        errors = work / "error.log"
        (work / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {errors} warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 64; }}
http {{
    log_format kiln '$request_method $request_uri $status';
    access_log {self.log} kiln;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/site.conf;
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(errors)],
                                     stdout=subprocess.DEVNULL, stderr=open(errors, "ab"))
        wait_listening(port, self.proc, "nginx", errors)
        self.url = f"http://127.0.0.1:{port}"


class HttpServer(Host):
    line = re.compile(r'"GET (\S+) HTTP/[\d.]+" \d+', re.M)

    def __init__(self, work: Path, root: Path):
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.log = work / "http.server.log"
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1",
                                      "--directory", str(root), str(port)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_listening(port, self.proc, "python -m http.server", self.log)
        self.url = f"http://127.0.0.1:{port}"


def kiln_export(out: Path, *extra: str):
    r = subprocess.run([sys.executable, "-m", "runtime_py.cli", "export", str(out), "smollm2", *extra],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def www(artifact, tmp_path_factory) -> Path:
    """`kiln export <www>/apps/kiln smollm2`: the same artifact the native runtime and the other e2e tests use."""
    root = tmp_path_factory.mktemp("www")
    site = kiln_export(root / SUB)
    m = json.loads((site / "models" / "smollm2" / "manifest.json").read_text())
    for i, s in enumerate(m["shards"]):     # hard links of the compiled shards, not copies
        exported = site / "models" / "smollm2" / s["file"]
        assert os.stat(exported).st_ino == os.stat(artifact / f"shard-{i:03d}.bin").st_ino
    return root


@pytest.fixture(scope="module")
def hosts(www, tmp_path_factory):
    started = []

    def start(cls, *args):
        h = cls(*args)
        started.append(h)
        return h
    yield start
    for h in started:
        h.stop()


@pytest.fixture(scope="module")
def nginx(hosts, www, tmp_path_factory):
    return hosts(Nginx, tmp_path_factory.mktemp("nginx"), www)


@pytest.fixture(scope="module")
def native_ids(artifact):
    """Greedy ids of runtime_py for PROMPT (and the prompt's ids), the reference the browser must equal."""
    from runtime_py.generate import Done, generate
    from runtime_py.model import Model
    from runtime_py.sampling import GREEDY
    from runtime_py.tokenizer import Tokenizer
    model = Model(artifact)
    m = model.manifest
    tok = Tokenizer(artifact / m["tokenizer"]["file"], m["tokenizer"])
    prompt_ids = tok.encode(PROMPT)
    for ev in generate(model.session(ctx=128), tok, prompt_ids, GREEDY, max_tokens=N_TOKENS, eog_ids=tok.eog_ids):
        if isinstance(ev, Done):
            return prompt_ids, ev.ids


def greedy(page) -> dict:
    return page.evaluate("""async ([prompt, n]) => (await window.kiln.engine.completions.create(
        {prompt, temperature: 0, max_tokens: n})).kiln""", [PROMPT, N_TOKENS])


def check_site(browser, new_page, load_model, host: Host, native_ids, models_host: Host | None = None):
    """First visit: self-test passes, greedy ids equal native, each shard fetched once (from models_host when the
    models are on another origin). Second visit, same browser profile: no shard requests anywhere."""
    models_host = models_host or host
    ctx = browser.new_context()
    try:
        ctx.set_default_timeout(GENERATE_TIMEOUT_S * 1000)
        before = len(models_host.requests())
        page = load_model(new_page(ctx), f"{host.url}/{SUB}")
        banner = page.locator("#selftest")
        expect(banner).to_have_attribute("data-ok", "true")
        expect(banner).to_contain_text("self-test passed")
        shards = models_host.shard_requests(before)
        assert sorted(shards) == sorted(set(shards)) and len(shards) == 2, shards
        assert all(p.startswith(f"/{SUB}/models/smollm2/") for p in shards), shards
        if models_host is not host:
            assert host.shard_requests() == [], "shards must come from the models' origin"
        r = greedy(page)
        want_prompt, want = native_ids
        assert r["prompt_ids"] == want_prompt
        assert r["ids"] == want, f"browser {r['ids']} != native {want}"

        before_site, before_models = len(host.requests()), len(models_host.requests())
        again = load_model(new_page(ctx), f"{host.url}/{SUB}", selftest=False)
        expect(again.locator("#progress-text")).to_contain_text("loaded")
        assert host.shard_requests(before_site) == [] and models_host.shard_requests(before_models) == []
        assert f"/{SUB}/models/smollm2/manifest.json" in models_host.requests()[before_models:]   # revalidated
    finally:
        ctx.close()


def test_nginx_serves_the_site_under_a_sub_path(browser, new_page, load_model, nginx, native_ids):
    check_site(browser, new_page, load_model, nginx, native_ids)


def test_http_server_serves_the_site(browser, new_page, load_model, hosts, www, tmp_path_factory, native_ids):
    check_site(browser, new_page, load_model, hosts(HttpServer, tmp_path_factory.mktemp("http"), www), native_ids)


@pytest.fixture(scope="module")
def page_host(hosts, nginx, tmp_path_factory):
    """A second origin (nginx on another port, same sample config): an export whose models.json points at `nginx`."""
    root = tmp_path_factory.mktemp("www-page")
    kiln_export(root / SUB, "--models-url", f"{nginx.url}/{SUB}/models/")
    return hosts(Nginx, tmp_path_factory.mktemp("nginx-page"), root)


def test_models_on_a_second_origin_through_cors(browser, new_page, load_model, nginx, page_host, native_ids):
    """The page and runtime on one origin, the models on another: CORS."""
    check_site(browser, new_page, load_model, page_host, native_ids, models_host=nginx)


def test_another_origin_imports_the_runtime(browser, new_page, nginx, page_host, native_ids):
    """A page on another origin imports createEngine from the exported site (runtime, npm files and models all on
    `nginx`): the worker is started through a same-origin blob, every module comes with CORS."""
    root = Path(page_host.root)
    (root / "mine.html").write_text(f"""<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module">
  import {{createEngine}} from "{nginx.url}/{SUB}/web/api.js";
  const engine = await createEngine("{nginx.url}/{SUB}/models/smollm2/", {{selftest: "off"}});
  const r = await engine.completions.create({{prompt: {json.dumps(PROMPT)}, temperature: 0, max_tokens: {N_TOKENS}}});
  window.kilnDone = r.kiln;
</script>""")
    ctx = browser.new_context()
    try:
        page = new_page(ctx)
        before = len(page_host.requests())
        page.goto(f"{page_host.url}/mine.html")
        page.wait_for_function("window.kilnDone", timeout=(LOAD_TIMEOUT_S + GENERATE_TIMEOUT_S) * 1000)
        assert page.evaluate("window.kilnDone.ids") == native_ids[1]
        assert page_host.requests()[before:] == ["/mine.html"]     # everything else came from the site's origin
    finally:
        ctx.close()


def test_cross_origin_isolation_keeps_working(browser, new_page, load_model, hosts, nginx, tmp_path_factory):
    """The sample's optional COOP/COEP lines switched on for the page's origin, the models on `nginx` (CORS): the page
    is cross-origin isolated and the model still loads and generates."""
    root = tmp_path_factory.mktemp("www-coi")
    kiln_export(root / SUB, "--models-url", f"{nginx.url}/{SUB}/models/")
    assert SAMPLE.read_text().count("# add_header Cross-Origin-") == 2
    host = hosts(Nginx, tmp_path_factory.mktemp("nginx-coi"), root, None,
                 lambda conf: conf.replace("# add_header Cross-Origin-", "add_header Cross-Origin-"))
    ctx = browser.new_context()
    try:
        page = load_model(new_page(ctx), f"{host.url}/{SUB}", selftest=False)
        assert page.evaluate("window.crossOriginIsolated") is True
        r = page.evaluate("""async () => (await window.kiln.engine.completions.create(
            {prompt: "Hi", temperature: 0, max_tokens: 1})).kiln""")
        assert len(r["ids"]) == 1
    finally:
        ctx.close()


def test_headers_of_the_sample_config(nginx, www):
    """What README: Deploy promises: MIME types, immutable shards, everything else revalidated, CORS."""
    def head(path):
        with urllib.request.urlopen(urllib.request.Request(f"{nginx.url}/{SUB}/{path}", method="HEAD"),
                                    timeout=10) as r:
            return {k.lower(): v for k, v in r.headers.items()}
    shard = next((www / SUB / "models" / "smollm2").glob("shard-000.*.bin")).name
    shader = next((www / SUB / "models" / "smollm2" / "shaders").glob("*.wgsl")).name
    for path, mime, cache in [("", "text/html", "no-cache"), ("web/api.js", "text/javascript", "no-cache"),
                              ("web/node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs", "text/javascript",
                               "no-cache"),
                              ("models.json", "application/json", "no-cache"),
                              ("models/smollm2/manifest.json", "application/json", "no-cache"),
                              (f"models/smollm2/shaders/{shader}", "text/wgsl", "no-cache"),
                              (f"models/smollm2/{shard}", "application/octet-stream",
                               "public, max-age=31536000, immutable")]:
        h = head(path)
        assert h["content-type"].split(";")[0] == mime, (path, h)
        assert h["cache-control"] == cache, (path, h)
        assert h["access-control-allow-origin"] == "*", (path, h)
    with pytest.raises(urllib.error.HTTPError, match="404"):
        head(".kiln-export")


def test_example_page_uses_the_runtime_as_a_library(browser, new_page, nginx):
    """web/example.html: createEngine imported from the exported site, a chat completion streamed into the page."""
    ctx = browser.new_context()
    try:
        page = new_page(ctx)
        page.goto(f"{nginx.url}/{SUB}/web/example.html?n=2&q=Hi")
        page.wait_for_function("window.kilnDone", timeout=(LOAD_TIMEOUT_S + GENERATE_TIMEOUT_S) * 1000)
        done = page.evaluate("window.kilnDone")
        assert 1 <= len(done["ids"]) <= 2 and done["prompt_ids"]
        assert page.locator("#out").text_content() != "loading…"
    finally:
        ctx.close()


# -- hosts that get it wrong ------------------------------------------------------------------------------------------

class NoRangeHost(Host):
    """http.server's handler (no Range support) in a thread, cutting the first download of shard-000 off halfway."""

    def __init__(self, root: Path):
        import threading
        from functools import partial
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
        self.log_lines: list[tuple[str, str | None]] = []     # (path, Range header)
        host = self

        class Handler(SimpleHTTPRequestHandler):
            dropped = False

            def log_message(self, *a):
                pass

            def send_head(self):
                host.log_lines.append((self.path.split("?")[0], self.headers.get("Range")))
                return super().send_head()

            def copyfile(self, source, outputfile):
                if "/shard-000." in self.path and not Handler.dropped:
                    Handler.dropped = True
                    size = os.fstat(source.fileno()).st_size
                    outputfile.write(source.read(size // 2))
                    outputfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)     # fewer bytes than Content-Length
                    return
                super().copyfile(source, outputfile)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def requests(self) -> list[str]:
        return [p for p, _ in self.log_lines]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_host_without_range_support_restarts_the_shard(browser, new_page, load_model, hosts, www):
    host = hosts(NoRangeHost, www)
    ctx = browser.new_context()
    try:
        page = load_model(new_page(ctx), f"{host.url}/{SUB}", selftest=False)
        shard0 = [r for p, r in host.log_lines if "/shard-000." in p]
        assert len(shard0) == 2 and shard0[0] is None and re.fullmatch(r"bytes=\d+-", shard0[1]), shard0
        expect(page.locator("#progress-text")).to_contain_text("loaded")
        expect(page.locator("#progress-text")).to_contain_text("the server does not support HTTP Range requests")
        assert page.evaluate("window.kiln.engine.selftest.skipped") == "disabled"
    finally:
        ctx.close()


def test_models_on_another_origin_without_cors_are_reported(browser, new_page, load_model, hosts, www,
                                                            tmp_path_factory):
    """models.json points at `python -m http.server`, which sends no CORS headers: the page says what is missing."""
    models = hosts(HttpServer, tmp_path_factory.mktemp("http-nocors"), www)
    root = tmp_path_factory.mktemp("www-nocors")
    kiln_export(root / SUB, "--models-url", f"{models.url}/{SUB}/models/")
    host = hosts(Nginx, tmp_path_factory.mktemp("nginx-nocors"), root)
    ctx = browser.new_context()
    try:
        page = load_model(new_page(ctx), f"{host.url}/{SUB}", expect_state="error")
        err = page.locator("#load-error")
        expect(err).to_have_attribute("data-error", "ServerConfigError")
        expect(err).to_contain_text(f"{models.url} is another origin than this page's: it must send "
                                    "Access-Control-Allow-Origin")
        assert models.shard_requests() == []
    finally:
        ctx.close()

STOCK_NGINX = """server {{
    listen 127.0.0.1:{port};
    root {root};
    # as Debian 12's stock /etc/nginx/mime.types (nginx 1.22): .js known, .mjs and .wgsl not
    types {{ text/html html; application/javascript js; text/css css; application/json json; }}
    default_type application/octet-stream;
}}"""
JS_AS_TEXT = """server {{
    listen 127.0.0.1:{port};
    root {root};
    types {{ text/html html; text/plain js mjs; application/json json; }}
}}"""


def test_mjs_with_a_wrong_mime_type_is_reported(browser, new_page, load_model, hosts, www, tmp_path_factory):
    """A stock nginx sends the tokenizer package (.mjs) as application/octet-stream: the worker can't import it."""
    host = hosts(Nginx, tmp_path_factory.mktemp("nginx-stock"), www, STOCK_NGINX)
    ctx = browser.new_context()
    try:
        page = load_model(new_page(ctx), f"{host.url}/{SUB}", expect_state="error")
        err = page.locator("#load-error")
        expect(err).to_have_attribute("data-error", "ServerConfigError")
        expect(err).to_contain_text("tokenizers.min.mjs was served as Content-Type \"application/octet-stream\"")
        expect(err).to_contain_text("text/javascript")
        assert host.shard_requests() == []
    finally:
        ctx.close()


def test_js_with_a_wrong_mime_type_is_reported(browser, new_page, hosts, www, tmp_path_factory):
    """Modules served as text/plain: the page itself says which file and what to configure."""
    host = hosts(Nginx, tmp_path_factory.mktemp("nginx-text"), www, JS_AS_TEXT)
    ctx = browser.new_context()
    try:
        page = new_page(ctx)
        page.goto(f"{host.url}/{SUB}/")
        expect(page.locator("body")).to_have_attribute("data-state", "error")
        err = page.locator("#load-error")
        expect(err).to_have_attribute("data-error", "ServerConfigError")
        expect(err).to_contain_text('web/demo.js was served as Content-Type "text/plain')
    finally:
        ctx.close()
