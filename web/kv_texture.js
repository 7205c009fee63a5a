// The @cpu programs' K/V caches as rgba32float textures (manifest buffers with `texture`: k_tex.L / v_tex.L, written
// by rope_kv as a write-only storage texture, read by attention_cpu with textureLoad; ARCHITECTURE.md "CPU adapters").
// Mirrors runtime_py/kv_texture.py.
//
// Position j's (n_kv, head_dim / 4) texels are row j % H, columns floor(j / H)·W .. + W, W = n_kv·head_dim/4, H =
// min(ctx, rows) (compiler/kernels_cpu.py kv_texture_shape), rows = the device's maxTextureDimension2D capped at
// KV_TEXTURE_ROWS (8192, the default limit): a context past that is column blocks.
import {ModelTooLargeError} from "./errors.js";

export const KV_TEXTURE_ROWS = 8192;   // compiler/kernels_cpu.py KV_TEXTURE_ROWS
export const KV_ACCESSES = ["kv_texture", "write_texture"];   // binding accesses of a K/V texture
const USAGE = () => GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_SRC
  | GPUTextureUsage.COPY_DST;

/** Bind-group-layout entry of a "kv_texture" (read) or "write_texture" (rope_kv's write) binding. */
export function kvLayoutEntry(binding, access) {
  if (access === "kv_texture") {
    return {binding, visibility: GPUShaderStage.COMPUTE, texture: {sampleType: "unfilterable-float", viewDimension: "2d"}};
  }
  return {binding, visibility: GPUShaderStage.COMPUTE,
          storageTexture: {access: "write-only", format: "rgba32float", viewDimension: "2d"}};
}

/** [width, height] of one K or V texture (shape: the manifest's ["ctx", n_kv, head_dim]) on this device. */
export function kvTextureSize(device, ctx, shape) {
  const limit = device.limits.maxTextureDimension2D;
  const rows = Math.min(KV_TEXTURE_ROWS, limit);
  const w = shape[1] * shape[2] / 4, h = Math.min(ctx, rows), width = w * Math.ceil(ctx / h);
  if (width > limit) {
    throw new ModelTooLargeError(`a KV texture of ${ctx} positions needs ${width} texels per row but the adapter allows `
                                 + `${limit}; use a smaller context`);
  }
  return [width, h];
}

export function createKvTexture(device, ctx, shape, label = "") {
  const [width, height] = kvTextureSize(device, ctx, shape);
  return device.createTexture({size: [width, height, 1], format: "rgba32float", usage: USAGE(), label});
}
