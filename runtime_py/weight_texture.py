"""Weight parts as textures: how the CPU-adapter kernels read q8_0 / q4_1 weights (compiler/kernels.py TEXTURE_QUANTS).
Mirrors web/weight_texture.js.

A part's packed u32 words, unchanged, fill an rgba32uint texture_2d row-major, TEXTURE_WIDTH texels (64 KiB) per
row; the last row is zero-padded. On lavapipe a texel fetch is one 16-byte load per lane, a storage-buffer load a
per-lane loop (6x slower: ARCHITECTURE.md, "CPU adapters"). `layout_entry` is the bind-group-layout entry of a kernel
binding of any access ("read", "read_write", "uniform", "texture").
"""
from __future__ import annotations

import wgpu

from compiler.ir import TEXTURE_WIDTH

BINDING_TYPES = {"read": "read-only-storage", "read_write": "storage", "uniform": "uniform"}   # buffer accesses
ROW_BYTES = TEXTURE_WIDTH * 16


def layout_entry(binding: int, access: str) -> dict:
    if access == "texture":
        return {"binding": binding, "visibility": wgpu.ShaderStage.COMPUTE,
                "texture": {"sample_type": wgpu.TextureSampleType.uint, "view_dimension": wgpu.TextureViewDimension.d2}}
    return {"binding": binding, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": BINDING_TYPES[access]}}


def texture_rows(nbytes: int) -> int:
    return max(1, -(-nbytes // ROW_BYTES))


def upload_texture(device, data, label: str = ""):
    """bytes-like packed words -> a (texture_rows, TEXTURE_WIDTH) rgba32uint texture holding them."""
    data = memoryview(data).cast("B")
    rows = texture_rows(len(data))
    tex = device.create_texture(size=(TEXTURE_WIDTH, rows, 1), format=wgpu.TextureFormat.rgba32uint, label=label,
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
