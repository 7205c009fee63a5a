// Weight parts as textures: how the CPU-adapter kernels read q8_0 / q4_1 weights (compiler/kernels_cpu.py TEXTURE_QUANTS).
// Mirrors runtime_py/weight_texture.py.
//
// A part's packed u32 words fill an rgba32uint texture_2d row-major, TEXTURE_WIDTH texels (64 KiB) per row; the last
// row is zero-padded. The quants region (the scheme's first: QS_WORDS per 32-block, whole texels per weight row) is
// interleaved TEXTURE_ROWS rows at a time (`interleave`: texel c of weight rows 8j .. 8j + 7 are adjacent), so the 8
// SIMD lanes of a CPU adapter, one weight row each, fetch 128 contiguous bytes; the scale region follows unchanged,
// after the rows padded to a multiple of TEXTURE_ROWS (shaders/_dot_cpu.wgsl.j2 <buf>_q / <buf>_s). On lavapipe a
// texel fetch is one 16-byte load per lane, a storage-buffer load a per-lane loop (6x slower: ARCHITECTURE.md, "CPU
// adapters"). `layoutEntry` is the bind-group-layout entry of a kernel binding of any access ("read", "read_write",
// "uniform", "texture").

export const TEXTURE_WIDTH = 4096;   // compiler/ir.py TEXTURE_WIDTH
export const TEXTURE_ROWS = 8;       // compiler/ir.py TEXTURE_ROWS
export const BINDING_TYPES = {read: "read-only-storage", read_write: "storage", uniform: "uniform"};   // buffer accesses
export const QS_WORDS = {q8_0: 8, q4_1: 4};   // u32 words of quants per 32-block (compiler/quant: the first region)
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

/** Packed words (Uint8Array) of a (rows, k) `quant` part -> the texture's words (a new Uint8Array): the quants
 *  region's texels reordered (rows, C) -> (rows / 8, C, 8) (C = texels per weight row; rows zero-padded to a multiple
 *  of TEXTURE_ROWS), the rest (the scales) unchanged after it. */
export function interleave(src, quant, rows, k) {
  if (!(quant in QS_WORDS)) throw new Error(`no texture layout for ${quant} weights (only ${Object.keys(QS_WORDS)})`);
  const c = (k / 32) * QS_WORDS[quant] / 4;   // texels of quants per weight row
  const qsBytes = rows * c * 16;
  const rows8 = Math.ceil(rows / TEXTURE_ROWS) * TEXTURE_ROWS;
  const out = new Uint8Array(rows8 * c * 16 + src.length - qsBytes);
  const s32 = src.byteOffset % 4 ? new Uint32Array(src.slice(0, qsBytes).buffer)   // a whole-word view of the quants
                                 : new Uint32Array(src.buffer, src.byteOffset, qsBytes / 4);
  const o32 = new Uint32Array(out.buffer, 0, rows8 * c * 4);
  for (let r = 0; r < rows; r++) {
    const base = ((r - r % TEXTURE_ROWS) * c + r % TEXTURE_ROWS) * 4;
    for (let t = 0; t < c; t++) {
      const i = (r * c + t) * 4, j = base + t * TEXTURE_ROWS * 4;
      o32[j] = s32[i]; o32[j + 1] = s32[i + 1]; o32[j + 2] = s32[i + 2]; o32[j + 3] = s32[i + 3];
    }
  }
  out.set(src.subarray(qsBytes), rows8 * c * 16);
  return out;
}

/** bytes (an ArrayBuffer view) [offset, offset + nbytes) of the packed words of a part ({quant, rows, k}) -> a
 *  (textureRows, TEXTURE_WIDTH) rgba32uint texture holding them, interleaved. */
export function uploadTexture(device, bytes, offset, nbytes, {quant, rows, k}, label = "") {
  const src = new Uint8Array(bytes.buffer, bytes.byteOffset + offset, nbytes);
  const data = interleave(src, quant, rows, k);
  const texture = device.createTexture({size: [TEXTURE_WIDTH, textureRows(data.length), 1], format: "rgba32uint",
                                        label, usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST});
  const full = Math.floor(data.length / ROW_BYTES);
  if (full) {
    device.queue.writeTexture({texture}, data, {offset: 0, bytesPerRow: ROW_BYTES, rowsPerImage: full},
                              [TEXTURE_WIDTH, full, 1]);
  }
  if (data.length > full * ROW_BYTES || !data.length) {   // the last, partial row, zero-padded
    const last = new Uint8Array(ROW_BYTES);
    last.set(data.subarray(full * ROW_BYTES));
    device.queue.writeTexture({texture, origin: [0, full, 0]}, last, {bytesPerRow: ROW_BYTES, rowsPerImage: 1},
                              [TEXTURE_WIDTH, 1, 1]);
  }
  return texture;
}
