"""Micro-benchmark of matmul kernel variants on this adapter: GPU time per dispatch from timestamp queries.

    python tests/bench_kernels.py [--reps 7] [--only lm_head]

Every case is one real decode/prefill shape of SmolLM2 / Gemma 3 with random packed weights; each variant runs `--batch`
back-to-back dispatches inside one pass (timestamps around each), variants interleaved round-robin over `--reps`
rounds so a busy machine slows them alike; the median per dispatch is reported with the GB/s of weights it implies.
Not a test: numbers only (the correctness of every variant is tests/gpu/test_kernels*.py).
"""
from __future__ import annotations

import argparse
import re
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import wgpu
from wgpu.backends.wgpu_native.extras import write_timestamp

from compiler.kernels import Kernel
from compiler.quant import QuantScheme
from compiler.render import render
from compiler.schedule import dispatch_size
from runtime_py.device import get_adapter
from runtime_py.model import STATE_BYTES, UNIFORM_ALIGN, pack_params
from runtime_py.weight_texture import layout_entry, upload_texture


def make_device():
    ad = get_adapter()
    lim = ad.limits
    wanted = {k: lim[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                  "max-compute-workgroup-storage-size") if k in lim}
    feats = ["timestamp-query", "timestamp-query-inside-passes"]
    return ad, ad.request_device_sync(required_limits=wanted, required_features=feats)


class Case:
    """One kernel + its buffers, ready to dispatch."""

    def __init__(self, dev, kernel: Kernel, params: dict, buffers: list[np.ndarray], dispatch, n_tokens: int,
                 weight_bytes: int):
        self.kernel, self.dispatch, self.T, self.weight_bytes = kernel, dispatch, n_tokens, weight_bytes
        entries = [layout_entry(0, "uniform"), layout_entry(1, "uniform")]
        entries += [layout_entry(i + 2, a) for i, (_, a) in enumerate(kernel.bindings())]
        layout = dev.create_bind_group_layout(entries=entries)
        self.pipeline = dev.create_compute_pipeline(
            layout=dev.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": dev.create_shader_module(code=render(kernel)), "entry_point": "main"})
        blob = pack_params({"params": kernel.params}, [params[n] for n in (n for n, _ in kernel.params)])
        uni = [dev.create_buffer_with_data(data=np.array([n_tokens, 0, 0, 0], np.uint32).tobytes(),
                                           usage=wgpu.BufferUsage.UNIFORM),
               dev.create_buffer_with_data(data=blob + b"\0" * (UNIFORM_ALIGN - len(blob)),
                                           usage=wgpu.BufferUsage.UNIFORM)]
        bufs = []
        for a in buffers:
            data = np.ascontiguousarray(a).tobytes()
            data += b"\0" * (-len(data) % 16)
            bufs.append(dev.create_buffer_with_data(data=data, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
                                                    | wgpu.BufferUsage.UNIFORM))
        self.bufs = bufs
        self.bg = dev.create_bind_group(layout=layout, entries=[
            {"binding": 0, "resource": {"buffer": uni[0], "offset": 0, "size": STATE_BYTES}},
            {"binding": 1, "resource": {"buffer": uni[1], "offset": 0, "size": UNIFORM_ALIGN}},
            *({"binding": i + 2, "resource": upload_texture(dev, np.ascontiguousarray(arr).tobytes(), quant=kernel.quant,
                                                            rows=params["rows"], k=params["k"]).create_view()}
              if a == "texture" else
              {"binding": i + 2, "resource": {"buffer": b, "offset": 0, "size": min(b.size, 65536) if a == "uniform" else b.size}}
              for i, (arr, b, (_, a)) in enumerate(zip(buffers, bufs, kernel.bindings())))])


def time_cases(dev, cases: list[Case], batch: int, reps: int) -> list[list[float]]:
    """ns per dispatch: reps medians of `batch` dispatches, per case, cases interleaved within each round."""
    qs = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2 * batch)
    qbuf = dev.create_buffer(size=16 * batch, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    out = [[] for _ in cases]
    for _ in range(reps):
        for ci, c in enumerate(cases):
            enc = dev.create_command_encoder()
            cp = enc.begin_compute_pass()
            for i in range(batch):
                cp.set_pipeline(c.pipeline)
                cp.set_bind_group(0, c.bg)
                write_timestamp(cp, qs, 2 * i)
                cp.dispatch_workgroups(*(dispatch_size(d, c.T) for d in c.dispatch))
                write_timestamp(cp, qs, 2 * i + 1)
            cp.end()
            enc.resolve_query_set(qs, 0, 2 * batch, qbuf, 0)
            dev.queue.submit([enc.finish()])
            ts = np.frombuffer(dev.queue.read_buffer(qbuf), dtype=np.uint64).astype(np.int64)
            out[ci].append(float(np.median(ts[1::2] - ts[0::2])))
    return out


def random_packed(quant: str, rows: int, k: int, rng) -> np.ndarray:
    from gguf.quants import quantize
    s = QuantScheme.registry[quant]
    try:
        raw = quantize(rng.standard_normal((rows, k)).astype(np.float32), s.ggml_type)
    except NotImplementedError:   # k-quants: random bytes are fine for timing
        raw = rng.integers(0, 256, (rows * k // s.block_size, s.block_bytes), dtype=np.uint8)
    return s.pack(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), rows, k)


# (name, quant, rows, K, T, gate)
SHAPES = [
    ("smollm2 gate_up", "q4_1", 1536, 576, 1, "silu"),
    ("smollm2 down", "q4_1", 576, 1536, 1, None),
    ("smollm2 q", "q4_1", 576, 576, 1, None),
    ("smollm2 lm_head", "q8_0", 49152, 576, 1, None),
    ("smollm2 prefill gate_up", "q4_1", 1536, 576, 64, "silu"),
    ("smollm2 prefill down", "q4_1", 576, 1536, 64, None),
]


def variants(quant, T, gate, k):
    """(label, kernel, dispatch(rows) -> [x, y, z]) of every variant that fits this case."""
    from compiler import kernels as K
    out = []
    if T == 1:
        out.append(("matmul 16x4", K.Matmul(quant=quant, gate=gate, rows=16, lanes=4),
                    lambda r, k: [-(-r // k.rows), 1, 1]))
    else:
        out.append(("matmul_tt 8x8", K.MatmulTokens(quant=quant, gate=gate), lambda r, k: [-(-r // k.rows), "T/8", 1]))
    if T == 1:
        for wg, lr in ((32, 1), (64, 1), (32, 2), (64, 2), (32, 4)):
            for tex in ((False, True) if quant in K.TEXTURE_QUANTS else (False,)):
                out.append((f"matvec_cpu wg{wg} {lr}r{' tex' if tex else ''}",
                            K.MatvecCPU(quant=quant, xk=k, wg=wg, gate=gate, tex=tex, lane_rows=lr),
                            lambda r, kk: [-(-r // kk.rows), 1, 1]))
    else:   # one x window (the first `tokens` tokens) per dispatch; per token = that / tokens
        for tokens, rows, wg in ((8, 4, 32), (8, 2, 32), (4, 4, 32), (8, 1, 64)):
            for tex in ((False, True) if quant in K.TEXTURE_QUANTS else (False,)):
                out.append((f"matmul_cpu {tokens}tok {rows}r wg{wg}{' tex' if tex else ''}",
                            K.MatmulCPU(quant=quant, xk=k, tokens=tokens, rows=rows, wg=wg, gate=gate, tex=tex),
                            lambda r, kk: [-(-r // kk.rows_per_wg), 1, 1]))
    from compiler import kernels_i8 as I   # the int8-activation variants (x quantised per 32-block: xq)
    if quant in I.I8_QUANTS and T == 1:
        for wg, lr in ((64, 1), (32, 4)):
            out.append((f"matvec_cpu_i8 wg{wg} {lr}r", I.MatvecCPUI8(quant=quant, xk=k, wg=wg, gate=gate, lane_rows=lr),
                        lambda r, kk: [-(-r // kk.rows), 1, 1]))
    elif quant in I.I8_QUANTS:
        for tokens, rows, wg in ((8, 4, 32), (8, 2, 32), (8, 1, 64)):
            out.append((f"matmul_cpu_i8 {tokens}tok {rows}r wg{wg}",
                        I.MatmulCPUI8(quant=quant, xk=k, tokens=tokens, rows=rows, wg=wg, gate=gate),
                        lambda r, kk: [-(-r // kk.rows_per_wg), 1, 1]))
    return out


def quantize_x(x: np.ndarray) -> np.ndarray:
    """(T, K) f32 -> the int8 kernels' xq words (what quantize_act writes; compiler/kernels_i8.py layout)."""
    from compiler.kernels_i8 import XQ_WORDS
    T, K = x.shape
    b = x.reshape(T, K // 32, 32)
    d = (np.abs(b).max(-1) / 127).astype(np.float32)
    q = np.clip(np.rint(b / np.maximum(d, 1e-30)[..., None]), -127, 127).astype(np.int8)
    out = np.zeros((T, K // 32, XQ_WORDS), np.uint32)
    out[..., :8] = q.view(np.uint8).reshape(T, K // 32, 32).copy().view(np.uint32)
    out[..., 8] = d.view(np.uint32)
    out[..., 9] = (d * q.sum(-1, dtype=np.int32)).astype(np.float32).view(np.uint32)
    return out.reshape(T, -1)


def quantize_cases(dev, rng) -> list[tuple[str, Case]]:
    """quantize_act on SmolLM2's K (576 with the norm fused, 1536), T = 1 and 64: what the int8 path adds per mat-vec
    input."""
    from compiler.kernels_i8 import QuantizeAct, xq_words
    out = []
    for k, norm in ((576, True), (576, False), (1536, False)):
        for T in (1, 64):
            kern = QuantizeAct(norm=norm)
            bufs = [rng.standard_normal((T, k)).astype(np.float32)] + ([np.ones(k, np.float32)] if norm else []) \
                + [np.zeros((T, xq_words(k)), np.uint32)]
            params = dict(k=k, eps=1e-5) if norm else dict(k=k)
            out.append((f"quantize_act K={k}{' norm' if norm else ''} T={T}",
                        Case(dev, kern, params, bufs, [1, "T", 1], T, 0)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    ad, dev = make_device()
    print(f"adapter: {ad.info.get('device', '?')} ({ad.info.get('adapter_type', '?')})")
    rng = np.random.default_rng(0)
    if re.search(a.only, "quantize_act"):
        qc = quantize_cases(dev, rng)
        for (lab, _), r in zip(qc, time_cases(dev, [c for _, c in qc], a.batch, a.reps)):
            print(f"  {lab:32s} {statistics.median(r) / 1e3:9.1f} us   (min {min(r) / 1e3:.1f})")
    for name, quant, rows, k, T, gate in SHAPES:
        if not re.search(a.only, name):
            continue
        w = random_packed(quant, rows, k, rng)
        wb = w.nbytes * (2 if gate else 1)
        x = rng.standard_normal((T, k)).astype(np.float32)
        bufs = [x, w] + ([random_packed(quant, rows, k, rng)] if gate else []) + [np.zeros((T, rows), np.float32)]
        xq = quantize_x(x)
        cases, labels = [], []
        for lab, kern, disp in variants(quant, T, gate, k):
            params = {n: v for n, v in dict(k=k, rows=rows, n_offset=0, n_stride=rows, last_only=0, t0=0).items()
                      if n in dict(kern.params)}
            b = [xq] + bufs[1:] if kern.template.endswith("_i8") else bufs
            cases.append(Case(dev, kern, params, b, disp(rows, kern), T, wb))
            labels.append(lab)
        res = time_cases(dev, cases, a.batch, a.reps)
        print(f"{name}: {quant} ({rows}x{k}) T={T}{' gate' if gate else ''}, {wb / 1e6:.2f} MB of weights")
        for (lab, kern, _), r in zip(variants(quant, T, gate, k), res):
            med = statistics.median(r)
            toks = getattr(kern, "tokens", 1) if kern.template.startswith("matmul_cpu") else T   # tokens one dispatch does
            per_tok = f"  {med / 1e3 / toks:8.1f} us/token" if T > 1 else ""
            print(f"  {lab:32s} {med / 1e3:9.1f} us  {wb / med:6.2f} GB/s{per_tok}   (min {min(r) / 1e3:.1f})")


if __name__ == "__main__":
    main()
