// Fetch an artifact: manifest.json, then each weight shard — verified against the manifest's sha256 and kept in the
// Cache API, so a second visit downloads nothing. Shards are handled one at a time (fetch -> verify -> cache -> hand
// to `onShard`, which uploads its parts to the GPU) and dropped, so JS never holds more than one shard (<= 64 MiB).
//
//   const manifest = await fetchManifest(baseUrl);
//   await loadShards(baseUrl, manifest, {onShard: (index, bytes) => ..., onProgress: (p) => ...});
//
// A shard that fails its hash, from the cache or the network, is deleted and fetched once more; failing again is a
// ShardCorruptError. A connection dropped mid-shard is resumed with an HTTP Range request (up to 3 times). A shard is cached under its URL + "?sha256=<hash>", so a recompiled model never reuses a stale
// shard, and entries of this model that the manifest no longer lists are evicted after a load.

import {ArtifactError, KilnError, ShardCorruptError} from "./errors.js";

export const CACHE_NAME = "kiln-shards-v1";
export const MANIFEST_VERSION = 1;

export {ArtifactError};   // defined in errors.js with every other error class

export async function fetchManifest(baseUrl) {
  const url = new URL("manifest.json", baseUrl).href;
  let r;
  try {
    r = await fetch(url, {cache: "no-cache"});    // small, and changes on recompile: always revalidate (ETag)
  } catch (e) {
    throw new ArtifactError(`could not fetch ${url}: ${e.message}`);
  }
  if (!r.ok) throw new ArtifactError(`${url}: HTTP ${r.status} (not a compiled kiln model?)`);
  const m = await r.json();
  if (m.format !== "kiln" || m.version !== MANIFEST_VERSION) {
    throw new ArtifactError(`${url}: manifest format ${m.format} v${m.version} (this runtime reads kiln ` +
      `v${MANIFEST_VERSION}; recompile the model)`);
  }
  return m;
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
async function download(url, expected, onBytes, signal) {
  const out = new Uint8Array(expected);
  let n = 0;
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await fetch(url, {cache: "no-store", signal, headers: n > 0 ? {Range: `bytes=${n}-`} : {}});
      if (!r.ok) throw new HttpError(`${url}: HTTP ${r.status}`);
      if (n > 0 && r.status !== 206) {   // the server ignored the range: start over
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
        got = await download(url, shard.bytes, (n) => { loaded += n; report(i); }, signal);
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
