"""Run one kernel on the GPU from numpy arrays: the test-side twin of runtime_py/model.py's load + bind + dispatch.

    outs = run_kernel(kernel, params={"k": 96, ...}, buffers=[x, w, y], dispatch=[5, "T/8", 1], n_tokens=13, pos0=0)

The kernel is rendered with compiler.render, laid out as the runtime lays it out (binding 0 = State uniform,
1 = Params uniform packed by runtime_py.model.pack_params, 2.. = storage buffers in `kernel.bindings()` order),
dispatched once, and every read_write buffer (and write_texture texture: (H, W, 4) f32 texels) is read back with the
dtype and shape it was given. "kv_texture" / "write_texture" bindings take (H, W, 4) f32 texels (kv_texture_shape).
"""
from __future__ import annotations

import numpy as np
import wgpu

from compiler.kernels import Kernel
from compiler.render import render
from compiler.schedule import dispatch_size
from runtime_py.device import get_device
from runtime_py.model import STATE_BYTES, UNIFORM_ALIGN, UNIFORM_BINDING_MAX, pack_params
from runtime_py.kv_texture import KV_ACCESSES, kv_layout_entry
from runtime_py.kv_texture import USAGE as KV_USAGE
from runtime_py.weight_texture import layout_entry, upload_texture

_pipelines: dict[str, tuple] = {}   # kernel name -> (pipeline, layout); one compile per variant per process


def _layout_entry(binding: int, access: str) -> dict:
    # K/V as rgba32float texels (AttentionCPU kv_tex, RopeKV kv_tex): as the runtime lays them out
    return kv_layout_entry(binding, access) if access in KV_ACCESSES else layout_entry(binding, access)


def _kv_texture(device, texels: np.ndarray):
    """(H, W, 4) f32 texels -> an rgba32float texture holding them (the layout is the caller's: kv_texture_shape)."""
    h, w, _ = texels.shape
    tex = device.create_texture(size=(w, h, 1), format=wgpu.TextureFormat.rgba32float, usage=KV_USAGE)
    device.queue.write_texture({"texture": tex}, np.ascontiguousarray(texels, np.float32).tobytes(),
                               {"bytes_per_row": w * 16, "rows_per_image": h}, (w, h, 1))
    return tex


def _read_texture(device, tex, shape) -> np.ndarray:
    """An rgba32float texture -> (H, W, 4) f32 (rows copied 256-byte aligned, as copy_texture_to_buffer needs)."""
    h, w, _ = shape
    row = -(-w * 16 // 256) * 256
    buf = device.create_buffer(size=row * h, usage=wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC)
    enc = device.create_command_encoder()
    enc.copy_texture_to_buffer({"texture": tex}, {"buffer": buf, "bytes_per_row": row, "rows_per_image": h}, (w, h, 1))
    device.queue.submit([enc.finish()])
    raw = np.frombuffer(device.queue.read_buffer(buf), np.float32).reshape(h, row // 4)
    return raw[:, :w * 4].reshape(h, w, 4).copy()


def _pipeline(device, kernel: Kernel):
    if kernel.name not in _pipelines:
        entries = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": "uniform"}}
                   for i in (0, 1)]
        entries += [_layout_entry(i + 2, access) for i, (_, access) in enumerate(kernel.bindings())]
        layout = device.create_bind_group_layout(entries=entries, label=kernel.name)
        module = device.create_shader_module(code=render(kernel), label=kernel.name)
        pipeline = device.create_compute_pipeline(
            layout=device.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": module, "entry_point": "main"}, label=kernel.name)
        _pipelines[kernel.name] = (pipeline, layout)
    return _pipelines[kernel.name]


def run_kernel(kernel: Kernel, params: dict, buffers: list[np.ndarray], dispatch, n_tokens: int = 1,
               pos0: int = 0) -> list[np.ndarray]:
    """Dispatch `kernel` once; returns copies of the read_write buffers (binding order), as given dtype/shape."""
    names = [n for n, _ in kernel.params]
    assert set(params) == set(names), f"{kernel.name}: params {sorted(params)} != {names}"
    bindings = kernel.bindings()
    assert len(buffers) == len(bindings), f"{kernel.name}: {len(buffers)} buffers for {len(bindings)} bindings"
    device = get_device()
    pipeline, layout = _pipeline(device, kernel)

    state = np.array([n_tokens, pos0, 0, 0], np.uint32).tobytes()
    blob = pack_params({"params": kernel.params}, [params[n] for n in names])
    uniforms = [device.create_buffer_with_data(data=state, usage=wgpu.BufferUsage.UNIFORM),
                device.create_buffer_with_data(data=blob + b"\0" * (UNIFORM_ALIGN - len(blob)),
                                               usage=wgpu.BufferUsage.UNIFORM)]
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
    storage = []
    for a in buffers:
        data = np.ascontiguousarray(a).tobytes()
        data += b"\0" * (-len(data) % 16 if data else 16)   # whole vec4s; never a 0-byte binding
        storage.append(device.create_buffer_with_data(data=data, usage=usage))

    entries = [{"binding": 0, "resource": {"buffer": uniforms[0], "offset": 0, "size": STATE_BYTES}},
               {"binding": 1, "resource": {"buffer": uniforms[1], "offset": 0, "size": UNIFORM_ALIGN}}]
    textures = {i: _kv_texture(device, a) for i, (a, (_, acc)) in enumerate(zip(buffers, bindings))
                if acc in KV_ACCESSES}
    entries += [{"binding": i + 2, "resource": {"buffer": b, "offset": 0,   # as runtime_py/model.py Session._bind
                                                "size": min(b.size, UNIFORM_BINDING_MAX) if acc == "uniform" else b.size}}
                if acc not in ("texture", *KV_ACCESSES) else
                {"binding": i + 2, "resource": textures[i].create_view()} if acc in KV_ACCESSES else
                # a weight part as the CPU-adapter kernels read it (weight_texture.py)
                {"binding": i + 2, "resource": upload_texture(device, np.ascontiguousarray(a).tobytes(), quant=kernel.quant,
                                                  rows=params["rows"], k=params["k"]).create_view()}
                for i, (a, b, (_, acc)) in enumerate(zip(buffers, storage, bindings))]
    bind_group = device.create_bind_group(layout=layout, entries=entries)
    enc = device.create_command_encoder()
    cp = enc.begin_compute_pass()
    cp.set_pipeline(pipeline)
    cp.set_bind_group(0, bind_group)
    cp.dispatch_workgroups(*(dispatch_size(d, n_tokens) for d in dispatch))
    cp.end()
    device.queue.submit([enc.finish()])

    outs = []
    for i, (a, b, (_, access)) in enumerate(zip(buffers, storage, bindings)):
        if access == "write_texture":   # read back as the (H, W, 4) texels it was given
            outs.append(_read_texture(device, textures[i], a.shape))
        elif access == "read_write":
            raw = device.queue.read_buffer(b, 0, a.nbytes) if a.nbytes else b""
            outs.append(np.frombuffer(raw, dtype=a.dtype).reshape(a.shape).copy())
    return outs
