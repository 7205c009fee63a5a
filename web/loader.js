// Fetch an artifact: manifest.json, then each weight shard — verified against the manifest's sha256 and kept in the
// Cache API, so a second visit downloads nothing. Shards are handled one at a time (fetch -> verify -> cache -> hand
// to `onShard`, which uploads its parts to the GPU) and dropped, so JS never holds more than one shard (<= 64 MiB).
//
//   const manifest = await fetchManifest(baseUrl);
//   await loadShards(baseUrl, manifest, {onShard: (index, bytes) => ..., onProgress: (p) => ...});
//
// A shard that fails its hash, from the cache or the network, is deleted and fetched once more; failing again is a
// ShardCorruptError. A connection dropped mid-shard is resumed with an HTTP Range request (up to 3 times); a server
// without Range support makes it start that shard over (said in the progress note). A shard is cached under its URL +
// "?sha256=<hash>", so a recompiled model never reuses a stale shard, and entries of this model that the manifest no
// longer lists are evicted after a load.
//
// Static hosts: every URL is resolved against the model's directory URL, which may be on another origin than the page
// (CORS). What a misconfigured host does — a fallback HTML page for a missing file, JavaScript modules with a wrong
// Content-Type, no CORS headers — is reported as a ServerConfigError naming the file and the fix (README: Deploy).

// The manifest itself carries manifest_sha256 (the file's sha256 with that value zeroed; compiler/manifest.py), and
// every other file its sha256: `fetchVerified` is how shaders and tokenizer.json are fetched. Any mismatch is an
// ArtifactError naming the file, like runtime_py's read_manifest / check_file.

import {ArtifactError, KilnError, ServerConfigError, ShardCorruptError} from "./errors.js";

export {ArtifactError};
export const CACHE_NAME = "kiln-shards-v1";
export const MANIFEST_VERSION = 2;
const CHECKSUM_RE = /"manifest_sha256": "([0-9a-f]{64})"/;

const crossOrigin = (url) => globalThis.location !== undefined && new URL(url).origin !== globalThis.location.origin;

/** fetch() whose network failure says what to check: CORS for another origin, the address otherwise. */
export async function fetchChecked(url, init = {}) {
  try {
    return await fetch(url, init);
  } catch (e) {
    if (init.signal?.aborted) throw e;
    const hint = crossOrigin(url)
      ? ` — ${new URL(url).origin} is another origin than this page's: it must send ` +
        `Access-Control-Allow-Origin (and allow the Range header), see README: Deploy`
      : "";
    throw new ServerConfigError(`could not fetch ${url}: ${e.message}${hint}`);
  }
}

/** GET + JSON.parse, revalidated (small files that change on recompile: manifest.json, models.json). A missing file
 *  answered with an HTML page (SPA fallbacks, custom 404s) is reported as such, not as a JSON syntax error. */
export async function fetchJson(url, what = "file") {
  return (await fetchJsonText(url, what)).value;
}

/** fetchJson that also returns the exact text (the manifest's checksum is over its bytes). */
async function fetchJsonText(url, what) {
  const r = await fetchChecked(url, {cache: "no-cache"});
  if (!r.ok) throw new ArtifactError(`${url}: HTTP ${r.status} (${what} is missing: wrong base path or model URL?)`);
  const text = new TextDecoder().decode(await r.arrayBuffer());
  try {
    return {text, value: JSON.parse(text)};
  } catch (e) {
    const type = r.headers.get("content-type") || "(none)";
    if (/html/i.test(type) || /^\s*</.test(text)) {
      throw new ServerConfigError(`${url} is not JSON (Content-Type "${type}": the server answered with an HTML ` +
        "page, so the file is missing there: wrong base path or model URL?)");
    }
    throw new ArtifactError(`${url}: corrupt ${what} (${e.message}); recompile the model`);
  }
}

/** Why a JavaScript module at `url` can't be imported (HTTP error, a Content-Type browsers refuse), or null. */
export async function moduleProblem(url) {
  const r = await fetch(url, {cache: "no-store"}).catch(() => null);
  if (!r) return `${url}: network error${crossOrigin(url) ? " (another origin: CORS headers missing?)" : ""}`;
  if (!r.ok) return `${url}: HTTP ${r.status}`;
  const type = r.headers.get("content-type") || "(none)";
  if (!/^(text|application)\/(x-)?(java|ecma)script\b/i.test(type)) {
    return `${url} was served as Content-Type "${type}"; browsers import JavaScript modules only when they are ` +
      `served as text/javascript: configure the web server to send .js and .mjs as text/javascript (README: Deploy)`;
  }
  return null;
}

/** import(url), failing with a ServerConfigError that says why when the host serves the module wrongly. */
export async function importModule(url) {
  try {
    return await import(url);
  } catch (e) {
    const problem = await moduleProblem(url);
    throw problem ? new ServerConfigError(problem) : e;
  }
}

export async function fetchManifest(baseUrl) {
  const url = new URL("manifest.json", baseUrl).href;
  const {text, value: m} = await fetchJsonText(url, "manifest.json (not a compiled kiln model?)");
  if (m?.format !== "kiln" || m.version !== MANIFEST_VERSION) {
    throw new ArtifactError(`${url}: manifest format ${m?.format} v${m?.version} (this runtime reads kiln ` +
      `v${MANIFEST_VERSION}; recompile the model)`);
  }
  await checkChecksum(text, m, url);
  return m;
}

/** Same rule as compiler/manifest.py check_checksum: sha256 of the file with manifest_sha256's value zeroed. */
async function checkChecksum(text, m, url) {
  const found = CHECKSUM_RE.exec(text);
  if (!found || m.manifest_sha256 !== found[1]) {
    throw new ArtifactError(`${url}: no valid manifest_sha256 (not written by this kiln); recompile the model`);
  }
  const zeroed = text.slice(0, found.index) + found[0].replace(found[1], "0".repeat(64)) +
    text.slice(found.index + found[0].length);
  if ((await sha256Hex(new TextEncoder().encode(zeroed))) !== found[1]) {
    throw new ArtifactError(`${url}: the manifest was modified after kiln wrote it (its manifest_sha256 does not ` +
      `match its contents); recompile the model`);
  }
}

/** The bytes of artifact file `file` (a shader, tokenizer.json), refused unless they hash to `sha256`. */
export async function fetchVerified(baseUrl, file, sha256, what) {
  const url = new URL(file, baseUrl).href;
  const r = await fetchChecked(url, {cache: "no-cache"});    // revalidate: a recompiled model must not meet a stale copy
  if (!r.ok) throw new ArtifactError(`${url}: HTTP ${r.status} (${what} missing from the artifact)`);
  const bytes = new Uint8Array(await r.arrayBuffer());
  if ((await sha256Hex(bytes)) !== sha256) {
    throw new ArtifactError(`${url}: ${what} does not match the manifest's sha256 (edited or damaged after ` +
      `compiling); recompile the model`);
  }
  return bytes;
}

export const shardUrl = (baseUrl, shard) => new URL(`${shard.file}?sha256=${shard.sha256}`, baseUrl).href;

export async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function openCache() {
  try {
    return await caches.open(CACHE_NAME);
  } catch {
    return null;   // no Cache API (opaque origin, storage disabled): load from the network every time
  }
}

const NETWORK_RETRIES = 3;   // per shard, for dropped connections; each retry resumes where the last one stopped

class HttpError extends KilnError {}

/** Streams one shard from the network into a buffer of its manifest size, reporting bytes as they arrive
 *  (onBytes(n), negative when bytes are discarded). A dropped connection is resumed with an HTTP Range request.
 *  Returns null when the server sends more or fewer bytes than the manifest says. */
async function download(url, expected, onBytes, signal, onNote = () => {}) {
  const out = new Uint8Array(expected);
  let n = 0;
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await fetch(url, {cache: "no-store", signal, headers: n > 0 ? {Range: `bytes=${n}-`} : {}});
      if (!r.ok) throw new HttpError(`${url}: HTTP ${r.status}`);
      if (n > 0 && r.status !== 206) {   // the server ignored the range: start over
        const msg = `the server does not support HTTP Range requests, so ${url.split("?")[0].split("/").pop()} ` +
          `restarted from its first byte after a dropped connection`;
        console.warn(`kiln: ${msg}`);
        onNote(msg);
        onBytes(-n);
        n = 0;
      }
      const reader = r.body.getReader();
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        if (n + value.length > expected) {   // longer than the manifest says: corrupt, stop reading
          await reader.cancel();
          return null;
        }
        out.set(value, n);
        n += value.length;
        onBytes(value.length);
      }
      return n === expected ? out : null;
    } catch (e) {
      if (e instanceof HttpError || signal?.aborted || attempt >= NETWORK_RETRIES) throw e;
      console.warn(`kiln: ${url}: ${e.message}; resuming at byte ${n}`);
    }
  }
}

const verified = async (bytes, shard) => bytes !== null && bytes.length === shard.bytes &&
  (await sha256Hex(bytes)) === shard.sha256;

/**
 * Loads every shard of `manifest` in order. onShard(index, Uint8Array) is awaited before the next shard is fetched.
 * onProgress({phase: "download", loaded, total, fromCache, shard, shards, note}) reports bytes (network or cache).
 */
export async function loadShards(baseUrl, manifest, {onShard, onProgress = () => {}, signal} = {}) {
  const shards = manifest.shards;
  const total = shards.reduce((s, x) => s + x.bytes, 0);
  const cache = await openCache();
  let loaded = 0, fromCache = 0, note = "";
  const report = (i, extra = {}) => onProgress({phase: "download", loaded, total, fromCache, shard: i,
                                                shards: shards.length, note, ...extra});
  note = await storageNote(cache, baseUrl, shards);
  report(0);

  for (const [i, shard] of shards.entries()) {
    const url = shardUrl(baseUrl, shard);
    let bytes = null;
    if (cache) {
      const hit = await cache.match(url).catch(() => null);
      if (hit) {
        bytes = await hit.arrayBuffer().then((b) => new Uint8Array(b), () => null);
        if (await verified(bytes, shard)) {
          loaded += shard.bytes;
          fromCache += shard.bytes;
          report(i);
        } else {
          console.warn(`kiln: cached ${shard.file} is corrupt; deleting it and downloading again`);
          await cache.delete(url);
          bytes = null;
        }
      }
    }
    for (let attempt = 0; bytes === null; attempt++) {
      const before = loaded;
      let got;
      try {
        got = await download(url, shard.bytes, (n) => { loaded += n; report(i); }, signal, (s) => { note = s; });
      } catch (e) {
        throw new KilnError(`downloading ${shard.file} failed: ${e.message}`);
      }
      if (await verified(got, shard)) {
        bytes = got;
        if (cache) {
          try {
            await cache.put(url, new Response(bytes, {headers: {"content-type": "application/octet-stream"}}));
          } catch (e) {   // QuotaExceededError (incognito, full disk): still usable, just not cached
            note = `not cached (${e.name}): the model will be downloaded again next time`;
          }
        }
        break;
      }
      loaded = before;
      if (attempt > 0) {
        throw new ShardCorruptError(`${shard.file} is corrupt: its size or sha256 does not match the manifest, ` +
          `twice (expected ${shard.bytes} bytes, sha256 ${shard.sha256.slice(0, 12)}…). The server's copy is damaged ` +
          `or out of date: recompile the model or reload the page.`);
      }
      console.warn(`kiln: ${shard.file} failed verification; downloading it once more`);
    }
    await onShard(i, bytes);
    bytes = null;   // drop it before the next shard arrives
  }
  if (cache) await evictStale(cache, baseUrl, shards);
  report(shards.length - 1, {done: true});
}

/** A line about storage when the shards to download may not fit the origin's quota (they are used anyway). */
async function storageNote(cache, baseUrl, shards) {
  if (!cache || !navigator.storage?.estimate) return "";
  let need = 0;
  for (const s of shards) if (!(await cache.match(shardUrl(baseUrl, s), {ignoreMethod: true}))) need += s.bytes;
  const {usage = 0, quota = Infinity} = await navigator.storage.estimate();
  if (need > quota - usage) {
    return `only ${((quota - usage) / 2 ** 20).toFixed(0)} MiB of browser storage free, ${(need / 2 ** 20).toFixed(0)} ` +
      `MiB needed: the model may not be cached for the next visit`;
  }
  return "";
}

/** Deletes cached shards of this model (same directory URL) whose hash the current manifest no longer lists. */
async function evictStale(cache, baseUrl, shards) {
  const keep = new Set(shards.map((s) => shardUrl(baseUrl, s)));
  const dir = new URL(".", baseUrl).href;
  for (const req of await cache.keys()) {
    const u = new URL(req.url);
    if (u.href.startsWith(dir) && !u.pathname.slice(new URL(dir).pathname.length).includes("/") && !keep.has(u.href)) {
      await cache.delete(req);
    }
  }
}
