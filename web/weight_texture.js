// Weight parts as textures: how the CPU-adapter kernels read q8_0 / q4_1 weights (compiler/kernels.py TEXTURE_QUANTS).
// Mirrors runtime_py/weight_texture.py.
//
// A part's packed u32 words, unchanged, fill an rgba32uint texture_2d row-major, TEXTURE_WIDTH texels (64 KiB) per
// row; the last row is zero-padded. On lavapipe a texel fetch is one 16-byte load per lane, a storage-buffer load a
// per-lane loop (6x slower: ARCHITECTURE.md, "CPU adapters"). `layoutEntry` is the bind-group-layout entry of a kernel
// binding of any access ("read", "read_write", "uniform", "texture").

export const TEXTURE_WIDTH = 4096;   // compiler/ir.py TEXTURE_WIDTH
export const BINDING_TYPES = {read: "read-only-storage", read_write: "storage", uniform: "uniform"};   // buffer accesses
const ROW_BYTES = TEXTURE_WIDTH * 16;

export function layoutEntry(binding, access) {
  if (access === "texture") {
    return {binding, visibility: GPUShaderStage.COMPUTE, texture: {sampleType: "uint", viewDimension: "2d"}};
  }
  return {binding, visibility: GPUShaderStage.COMPUTE, buffer: {type: BINDING_TYPES[access]}};
}

export function textureRows(nbytes) {
  return Math.max(1, Math.ceil(nbytes / ROW_BYTES));
}

/** bytes (an ArrayBuffer view) [offset, offset + nbytes) of packed words -> a (textureRows, TEXTURE_WIDTH) rgba32uint
 *  texture holding them. */
export function uploadTexture(device, bytes, offset, nbytes, label = "") {
  const rows = textureRows(nbytes);
  const texture = device.createTexture({size: [TEXTURE_WIDTH, rows, 1], format: "rgba32uint", label,
                                        usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST});
  const full = Math.floor(nbytes / ROW_BYTES);
  const base = bytes.byteOffset + offset;
  if (full) {
    device.queue.writeTexture({texture}, bytes.buffer, {offset: base, bytesPerRow: ROW_BYTES, rowsPerImage: full},
                              [TEXTURE_WIDTH, full, 1]);
  }
  if (nbytes > full * ROW_BYTES || !nbytes) {   // the last, partial row, zero-padded
    const last = new Uint8Array(ROW_BYTES);
    last.set(new Uint8Array(bytes.buffer, base + full * ROW_BYTES, nbytes - full * ROW_BYTES));
    device.queue.writeTexture({texture, origin: [0, full, 0]}, last, {bytesPerRow: ROW_BYTES, rowsPerImage: 1},
                              [TEXTURE_WIDTH, 1, 1]);
  }
  return texture;
}
