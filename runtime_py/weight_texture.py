"""Weight parts as textures: how the CPU-adapter kernels read q8_0 / q4_1 weights (compiler/kernels_cpu.py TEXTURE_QUANTS).
Mirrors web/weight_texture.js.

A part's packed u32 words fill an rgba32uint texture_2d row-major, TEXTURE_WIDTH texels (64 KiB) per row; the last
row is zero-padded. The quants region (the scheme's first: QS_WORDS per 32-block, whole texels per weight row) is
interleaved TEXTURE_ROWS rows at a time (`interleave`: texel c of weight rows 8j .. 8j + 7 are adjacent), so the 8
SIMD lanes of a CPU adapter, one weight row each, fetch 128 contiguous bytes; the scale region follows unchanged,
after the rows padded to a multiple of TEXTURE_ROWS (shaders/_dot_cpu.wgsl.j2 <buf>_q / <buf>_s). On lavapipe a
texel fetch is one 16-byte load per lane, a storage-buffer load a per-lane loop (6x slower: ARCHITECTURE.md, "CPU
adapters"). `layout_entry` is the bind-group-layout entry of a kernel binding of any access ("read", "read_write",
"uniform", "texture").
"""
from __future__ import annotations

import numpy as np
import wgpu

from compiler.ir import TEXTURE_ROWS, TEXTURE_WIDTH

BINDING_TYPES = {"read": "read-only-storage", "read_write": "storage", "uniform": "uniform"}   # buffer accesses
ROW_BYTES = TEXTURE_WIDTH * 16
QS_WORDS = {"q8_0": 8, "q4_1": 4}   # u32 words of quants per 32-block (compiler/quant: the schemes' first region)


def layout_entry(binding: int, access: str) -> dict:
    if access == "texture":
        return {"binding": binding, "visibility": wgpu.ShaderStage.COMPUTE,
                "texture": {"sample_type": wgpu.TextureSampleType.uint, "view_dimension": wgpu.TextureViewDimension.d2}}
    return {"binding": binding, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": BINDING_TYPES[access]}}


def texture_rows(nbytes: int) -> int:
    return max(1, -(-nbytes // ROW_BYTES))


def interleave(data, quant: str, rows: int, k: int) -> bytes:
    """Packed words of a (rows, k) `quant` part -> the texture's words: the quants region's texels reordered
    (rows, C) -> (rows / 8, C, 8) (C = texels per weight row; rows zero-padded to a multiple of TEXTURE_ROWS), the
    rest (the scales) unchanged after it."""
    if quant not in QS_WORDS:
        raise ValueError(f"no texture layout for {quant} weights (only {', '.join(QS_WORDS)})")
    data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    c = k // 32 * QS_WORDS[quant] // 4                 # texels of quants per weight row
    qs = data[:rows * c * 16].reshape(rows, c, 16)
    pad = -rows % TEXTURE_ROWS
    if pad:
        qs = np.concatenate([qs, np.zeros((pad, c, 16), np.uint8)])
    qs = qs.reshape(-1, TEXTURE_ROWS, c, 16).transpose(0, 2, 1, 3)   # (rows / 8, C, 8, 16 bytes)
    return qs.tobytes() + data[rows * c * 16:].tobytes()


def upload_texture(device, data, *, quant: str, rows: int, k: int, label: str = ""):
    """bytes-like packed words of a (rows, k) `quant` part -> a (texture_rows, TEXTURE_WIDTH) rgba32uint texture
    holding them, interleaved."""
    data = memoryview(interleave(data, quant, rows, k))
    tex = device.create_texture(size=(TEXTURE_WIDTH, texture_rows(len(data)), 1), format=wgpu.TextureFormat.rgba32uint, label=label,
                                usage=wgpu.TextureUsage.TEXTURE_BINDING | wgpu.TextureUsage.COPY_DST)
    full = len(data) // ROW_BYTES
    if full:
        device.queue.write_texture({"texture": tex}, data[:full * ROW_BYTES],
                                   {"bytes_per_row": ROW_BYTES, "rows_per_image": full}, (TEXTURE_WIDTH, full, 1))
    if len(data) > full * ROW_BYTES or not len(data):   # the last, partial row, zero-padded
        last = bytes(data[full * ROW_BYTES:]).ljust(ROW_BYTES, b"\0")
        device.queue.write_texture({"texture": tex, "origin": (0, full, 0)}, last,
                                   {"bytes_per_row": ROW_BYTES, "rows_per_image": 1}, (TEXTURE_WIDTH, 1, 1))
    return tex
