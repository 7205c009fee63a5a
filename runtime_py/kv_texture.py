"""The @cpu programs' K/V caches as rgba32float textures (manifest buffers with `texture`: k_tex.L / v_tex.L, written
by rope_kv as a write-only storage texture, read by attention_cpu with textureLoad; ARCHITECTURE.md "CPU adapters").
Mirrors web/kv_texture.js.

Position j's (n_kv, head_dim / 4) texels are row j % H, columns (j // H)·W .. + W, W = n_kv·head_dim/4, H =
min(ctx, rows) (compiler/kernels_cpu.py kv_texture_shape), rows = the adapter's maxTextureDimension2D capped at
KV_TEXTURE_ROWS (8192, the default limit): a context past that is column blocks.
"""
from __future__ import annotations

import wgpu

from compiler.kernels_cpu import KV_TEXTURE_ROWS, kv_texture_shape
from compiler.errors import ModelTooLargeError

KV_ACCESSES = ("kv_texture", "write_texture")   # binding accesses of a K/V texture (compiler/manifest_schema.py)
USAGE = (wgpu.TextureUsage.STORAGE_BINDING | wgpu.TextureUsage.TEXTURE_BINDING | wgpu.TextureUsage.COPY_SRC
         | wgpu.TextureUsage.COPY_DST)


def kv_layout_entry(binding: int, access: str) -> dict:
    """Bind-group-layout entry of a "kv_texture" (read) or "write_texture" (rope_kv's write) binding."""
    if access == "kv_texture":
        return {"binding": binding, "visibility": wgpu.ShaderStage.COMPUTE,
                "texture": {"sample_type": wgpu.TextureSampleType.unfilterable_float,
                            "view_dimension": wgpu.TextureViewDimension.d2}}
    return {"binding": binding, "visibility": wgpu.ShaderStage.COMPUTE,
            "storage_texture": {"access": wgpu.StorageTextureAccess.write_only,
                                "format": wgpu.TextureFormat.rgba32float,
                                "view_dimension": wgpu.TextureViewDimension.d2}}


def kv_texture_size(device, ctx: int, shape: list) -> tuple[int, int]:
    """(width, height) of one K or V texture (shape: the manifest's ["ctx", n_kv, head_dim]) on this device."""
    limit = device.limits["max-texture-dimension-2d"]
    rows = min(KV_TEXTURE_ROWS, limit)
    n_kv, head_dim = shape[1], shape[2]
    w, h = n_kv * head_dim // 4, min(ctx, rows)
    if w * -(-ctx // h) > limit:
        raise ModelTooLargeError(f"a KV texture of {ctx} positions needs {w * -(-ctx // h)} texels per row but the "
                                 f"adapter allows {limit}; use a smaller --ctx")
    return kv_texture_shape(ctx, n_kv, head_dim, rows=rows)


def create_kv_texture(device, ctx: int, shape: list, label: str = ""):
    w, h = kv_texture_size(device, ctx, shape)
    return device.create_texture(size=(w, h, 1), format=wgpu.TextureFormat.rgba32float, usage=USAGE, label=label)


def copy_kv_rows(enc, src, dst, pos: int):
    """dst's positions 0..pos-1 := src's (beam forks): rows 0 .. min(pos, H) - 1 of every column block."""
    if pos:
        enc.copy_texture_to_texture({"texture": src}, {"texture": dst}, (src.width, min(pos, src.height), 1))
