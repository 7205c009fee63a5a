// The WebGPU device: adapter choice, the features and limits an artifact needs, and the errors a user sees when the
// browser can't run it. Mirrors runtime_py/device.py. Everything here runs BEFORE a byte of weights is downloaded.
//
//   const adapter = await getAdapter();                       // WebGPUUnavailableError
//   checkAdapter(adapter, manifest, bufferBytes(manifest, ctx)); // FeatureMissingError, ModelTooLargeError
//   const device = await getDevice(adapter, manifest, bufferBytes(manifest, ctx));

import {FeatureMissingError, ModelTooLargeError, WebGPUUnavailableError} from "./errors.js";

export * from "./errors.js";   // the error classes live in errors.js; importers of device.js / api.js see them here

const UNAVAILABLE_HELP = "Use a recent Chrome or Edge (113+) on a machine with a GPU driver, or enable WebGPU " +
  "(chrome://flags/#enable-unsafe-webgpu; on Linux also #enable-vulkan).";

/** Byte size of each activation / KV buffer, T = prefill chunk and ctx substituted; as runtime_py.model.buffer_bytes. */
export function bufferBytes(manifest, ctx) {
  const sym = {T: manifest.limits.prefill_chunk, ctx};
  const out = {};
  for (const [name, b] of Object.entries(manifest.buffers)) {
    let n = 1;
    for (const d of b.shape) n *= typeof d === "string" ? sym[d] : d;
    out[name] = Math.max(16, 4 * n);
  }
  return out;
}

/** Bytes the model needs on the GPU: weights + activations + KV cache at `ctx`. */
export function gpuBytes(manifest, ctx) {
  const weights = manifest.shards.reduce((s, x) => s + x.bytes, 0);
  return weights + Object.values(bufferBytes(manifest, ctx)).reduce((s, x) => s + x, 0);
}

export async function getAdapter() {
  const where = typeof WorkerGlobalScope !== "undefined" ? "in a worker of this page" : "on this page";
  if (!globalThis.isSecureContext) {
    throw new WebGPUUnavailableError(`WebGPU needs a secure context (https:// or http://localhost), but ${where} ` +
      `the origin is ${globalThis.location?.origin}.`);
  }
  if (!globalThis.navigator?.gpu) {
    throw new WebGPUUnavailableError(`This browser has no WebGPU (navigator.gpu is missing ${where}). ${UNAVAILABLE_HELP}`);
  }
  let adapter = null;
  try {
    adapter = await navigator.gpu.requestAdapter({powerPreference: "high-performance"});
  } catch (e) {
    throw new WebGPUUnavailableError(`requestAdapter() failed: ${e.message}. ${UNAVAILABLE_HELP}`);
  }
  if (!adapter) {
    throw new WebGPUUnavailableError(`WebGPU is present but no GPU adapter is available (requestAdapter() returned ` +
      `null: the GPU is blocklisted or has no driver). ${UNAVAILABLE_HELP}`);
  }
  return adapter;
}

export function adapterName(adapter) {
  const i = adapter.info || {};
  return [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(" ") || "unknown adapter";
}

/** The largest single binding the model needs: a weight part or an activation / KV buffer. */
function largestBinding(manifest, sizes) {
  let bytes = 0, what = "";
  for (const [name, w] of Object.entries(manifest.weights)) {
    for (const p of w.parts) if (p.bytes > bytes) [bytes, what] = [p.bytes, `weight part ${name}`];
  }
  for (const [name, b] of Object.entries(sizes)) if (b > bytes) [bytes, what] = [b, `buffer ${name}`];
  return {bytes, what};
}

const MiB = (b) => `${(b / 2 ** 20).toFixed(1)} MiB`;

/** Throws FeatureMissingError / ModelTooLargeError naming the limit; checks limits, not memory (WebGPU can't tell). */
export function checkAdapter(adapter, manifest, sizes) {
  const missing = (manifest.features || []).filter((f) => !adapter.features.has(f));
  if (missing.length) {
    throw new FeatureMissingError(`this model's shaders need WebGPU feature(s) ${missing.join(", ")}, which ` +
      `${adapterName(adapter)} does not offer; use an artifact compiled for f32`);
  }
  const lim = adapter.limits;
  const big = largestBinding(manifest, sizes);
  const maxBind = Math.min(lim.maxStorageBufferBindingSize, lim.maxBufferSize);
  if (big.bytes > maxBind) {
    throw new ModelTooLargeError(`model needs a ${MiB(big.bytes)} storage buffer (${big.what}) but this GPU ` +
      `allows ${MiB(maxBind)}; use a smaller context or recompile with smaller parts`);
  }
  const nStore = manifest.limits.storage_buffers_per_stage;
  if (nStore > lim.maxStorageBuffersPerShaderStage) {
    throw new ModelTooLargeError(`kernels need ${nStore} storage buffers per stage, this GPU allows ` +
      `${lim.maxStorageBuffersPerShaderStage}`);
  }
}

/** A device asking only for what the model needs (defaults where they suffice), so more adapters qualify. */
export async function getDevice(adapter, manifest, sizes) {
  checkAdapter(adapter, manifest, sizes);
  const need = largestBinding(manifest, sizes).bytes;
  const lim = adapter.limits;
  const requiredLimits = {};
  if (need > 128 * 2 ** 20) {   // the WebGPU default for maxStorageBufferBindingSize
    requiredLimits.maxStorageBufferBindingSize = Math.min(lim.maxStorageBufferBindingSize, need);
  }
  if (need > 256 * 2 ** 20) requiredLimits.maxBufferSize = Math.min(lim.maxBufferSize, need);
  if (manifest.limits.storage_buffers_per_stage > 8) {
    requiredLimits.maxStorageBuffersPerShaderStage = manifest.limits.storage_buffers_per_stage;
  }
  // compute limits at the adapter's maximum, as runtime_py/device.py asks for them: kernels may use more shared memory
  // or invocations than the defaults, and asking costs nothing
  for (const k of ["maxComputeWorkgroupStorageSize", "maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupSizeX",
                   "maxComputeWorkgroupSizeY"]) {
    if (lim[k] !== undefined) requiredLimits[k] = lim[k];
  }
  const requiredFeatures = manifest.features || [];
  try {
    return await adapter.requestDevice({requiredFeatures, requiredLimits, label: "kiln"});
  } catch (e) {
    throw new WebGPUUnavailableError(`requestDevice() failed on ${adapterName(adapter)}: ${e.message}`);
  }
}
