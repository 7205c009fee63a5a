"""Loading in the browser: the Cache API on a second visit, corrupt shards (cached or served), a dropped connection
resumed with a Range request, the checks made before any download (no WebGPU, model too large), a failing self-test,
and a lost device.
"""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect



@pytest.fixture(scope="module")
def reloaded(context, server, demo, browser_log, load_model):
    """A second page of the same browser context (same Cache Storage) loading the model after `demo` did."""
    start = len(server.requests)
    page = browser_log.attach(context.new_page())
    load_model(page, server.url, selftest=False)     # the self-test has its own tests; it costs ~8 s here
    yield page, start
    page.close()


def test_second_load_reads_shards_from_cache(reloaded, server):
    page, start = reloaded
    assert server.shard_requests(start) == []
    expect(page.locator("#progress-text")).to_contain_text("loaded")


def test_corrupt_cached_shard_is_deleted_and_refetched(new_page, server, demo, load_model):
    page = new_page()
    page.goto(server.url)
    corrupted = page.evaluate("""async () => {
        const cache = await caches.open('kiln-shards-v1');
        const key = (await cache.keys()).find((r) => r.url.includes('/shard-001.bin'));
        const bytes = new Uint8Array(await (await cache.match(key)).arrayBuffer());
        bytes[12345] ^= 0xff;
        await cache.put(key, new Response(bytes));
        return key.url;
    }""")
    assert "sha256=" in corrupted
    start = len(server.requests)
    load_model(page, server.url, selftest=False)
    assert [p.rsplit("/", 1)[-1] for p in server.shard_requests(start)] == ["shard-001.bin"]
    assert page.evaluate("""async () => {   // the cache holds the good copy again
        const cache = await caches.open('kiln-shards-v1');
        const key = (await cache.keys()).find((r) => r.url.includes('/shard-001.bin'));
        const bytes = await (await cache.match(key)).arrayBuffer();
        const hex = Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', bytes)),
                               (b) => b.toString(16).padStart(2, '0')).join('');
        return key.url.endsWith('sha256=' + hex);
    }""")


def test_corrupt_shard_from_server_is_reported(new_page, bad_server, load_model):
    page = new_page()
    start = len(bad_server.requests)
    load_model(page, bad_server.url, model="corrupt", expect_state="error")
    err = page.locator("#load-error")
    expect(err).to_be_visible()
    expect(err).to_have_attribute("data-error", "ShardCorruptError")
    expect(err).to_contain_text("shard-001.bin is corrupt")
    # fetched twice (the retry), then given up; never uploaded or cached
    assert [p.rsplit("/", 1)[-1] for p in bad_server.shard_requests(start)].count("shard-001.bin") == 2
    cached = page.evaluate("""async () => (await (await caches.open('kiln-shards-v1')).keys())
                                .map((r) => new URL(r.url).pathname)""")
    assert "/models/corrupt/shard-001.bin" not in cached


def test_dropped_connection_resumes_with_range(new_page, bad_server, load_model):
    page = new_page()
    start = len(bad_server.ranges)
    load_model(page, bad_server.url, model="flaky", selftest=False)
    shard0 = [r for p, r in bad_server.ranges[start:] if p.endswith("/shard-000.bin")]
    assert len(shard0) == 2 and shard0[0] is None, shard0
    assert re.fullmatch(r"bytes=\d+-", shard0[1]) and int(shard0[1][6:-1]) > 0, shard0   # resumed, not restarted


def test_model_too_large_is_refused_before_download(new_page, bad_server, load_model):
    page = new_page()
    start = len(bad_server.requests)
    load_model(page, bad_server.url, model="huge", expect_state="error")
    err = page.locator("#load-error")
    expect(err).to_have_attribute("data-error", "ModelTooLargeError")
    expect(err).to_contain_text("2048.0 MiB storage buffer")
    assert bad_server.shard_requests(start) == []


@pytest.mark.parametrize("model, fragment", [
    ("editedshader", "shader does not match the manifest's sha256"),
    ("editedtokenizer", "tokenizer does not match the manifest's sha256"),
    ("editedmanifest", "the manifest was modified after kiln wrote it"),
])
def test_edited_artifact_file_is_refused(new_page, bad_server, load_model, model, fragment):
    """A shader, tokenizer.json or manifest field changed after compiling: an ArtifactError naming the file, as in
    runtime_py (tests/gpu/test_cache.py, tests/unit/test_manifest.py)."""
    page = new_page()
    start = len(bad_server.requests)
    load_model(page, bad_server.url, model=model, expect_state="error", selftest=False)
    err = page.locator("#load-error")
    expect(err).to_have_attribute("data-error", "ArtifactError")
    expect(err).to_contain_text(fragment)
    expect(err).to_contain_text(f"/models/{model}/")
    if model == "editedmanifest":
        assert bad_server.shard_requests(start) == []        # refused before a byte of weights is downloaded


def test_selftest_mismatch_is_reported(new_page, bad_server, load_model):
    page = new_page()
    load_model(page, bad_server.url, model="badselftest")
    banner = page.locator("#selftest")
    expect(banner).to_have_attribute("data-ok", "false")
    expect(banner).to_contain_text("self-test FAILED")
    expect(banner).to_contain_text("Output is likely to be wrong")


def test_without_webgpu_the_page_says_so(launch, server, browser_log):
    browser = launch(webgpu=False)
    page = browser_log.attach(browser.new_page())
    page.goto(server.url)
    expect(page.locator("#gpu-error")).to_be_visible()
    expect(page.locator("#gpu-error")).to_contain_text("WebGPU unavailable")
    expect(page.locator("body")).to_have_attribute("data-state", "no-webgpu")
    expect(page.locator("#load")).to_be_disabled()
    browser.close()


def test_device_lost_offers_reload(reloaded):
    page, _ = reloaded
    page.evaluate("window.kiln.engine.simulateDeviceLoss()")
    lost = page.locator("#lost")
    expect(lost).to_be_visible()
    expect(lost).to_contain_text("GPU device lost")
    expect(page.locator("body")).to_have_attribute("data-state", "lost")
    expect(page.locator("#prompt")).to_be_disabled()
    page.click("#reload")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(lost).to_be_hidden()
