"""What a load costs on this adapter: the probe behind ARCHITECTURE.md's "CPU adapters" section (not a test).

    python tests/bench_probe.py

One 1536x576 4-bit matrix (one row per invocation, 64 per workgroup); each probe kernel differs in one thing: weight
words only (scalar / vec4 loads, per-lane / lane-uniform addresses), dequantize-and-dot with x from a storage buffer,
workgroup memory or a uniform buffer, and the ALU alone. GPU time per dispatch from timestamp queries, median of 5.
The WGSL lives here, not in shaders/: these are measurements, not kernels of the product.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import wgpu

import bench_kernels as B
from wgpu.backends.wgpu_native.extras import write_timestamp
ad, dev = B.make_device()
ROWS, K = 1536, 576
NW = ROWS * K // 8   # u32 words of 4-bit
wbuf = dev.create_buffer_with_data(data=np.random.default_rng(0).integers(0, 2**32, NW + 4096, dtype=np.uint32).tobytes(), usage=wgpu.BufferUsage.STORAGE)
xbuf = dev.create_buffer_with_data(data=np.random.default_rng(1).standard_normal(K).astype(np.float32).tobytes(), usage=wgpu.BufferUsage.STORAGE)
ybuf = dev.create_buffer(size=ROWS * 4 * 8, usage=wgpu.BufferUsage.STORAGE)
xubuf = dev.create_buffer_with_data(data=np.random.default_rng(1).standard_normal(K).astype(np.float32).tobytes(), usage=wgpu.BufferUsage.UNIFORM)
hdr = """
@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(5) var<uniform> xu: array<vec4<f32>, 144>;
var<workgroup> xs: array<vec4<f32>, 144>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
const K: u32 = %du; const WPR: u32 = %du;
""" % (K, K // 8)
TOUCH = " + x[0] + f32(w[0]) + f32(w4[0].x) + x4[0].x + xu[0].x"
kern = {
"words": """@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x; var s = 0u;
  for (var j = 0u; j < WPR; j++) { s ^= w[row * WPR + j]; }
  y[row] = f32(s)""",
"uniform_addr_words": """@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  // the same words as "words", but every lane of a workgroup reads the same address at each step
  var s = 0u;
  for (var r = 0u; r < 64u; r++) { let row = wid.x * 64u + r;
    for (var j = 0u; j < WPR; j += 64u) { s ^= w[row * WPR + j]; } }
  y[gid.x] = f32(s)""",
"vec4load": """@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x; var s = vec4<u32>(0u);
  for (var j = 0u; j < WPR / 4u; j++) { s ^= w4[row * WPR / 4u + j]; }
  y[row] = f32(s.x ^ s.y ^ s.z ^ s.w)""",
"dot_x_storage_vec4": """@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x; var acc = 0.0;
  for (var j = 0u; j < WPR; j++) { let q = w[row * WPR + j];
    let lo = vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
    let hi = vec4<f32>(vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u));
    acc += dot(lo, x4[2u * j]) + dot(hi, x4[2u * j + 1u]); }
  y[row] = acc""",
"dot_x_uniform": """@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x; var acc = 0.0;
  for (var j = 0u; j < WPR; j++) { let q = w[row * WPR + j];
    let lo = vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
    let hi = vec4<f32>(vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u));
    acc += dot(lo, xu[2u * j]) + dot(hi, xu[2u * j + 1u]); }
  y[row] = acc""",
"dot_x_shared": """@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  for (var i = li; i < 144u; i += 64u) { xs[i] = x4[i]; }
  workgroupBarrier();
  let row = gid.x; var acc = 0.0;
  for (var j = 0u; j < WPR; j++) { let q = w[row * WPR + j];
    let lo = vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
    let hi = vec4<f32>(vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u));
    acc += dot(lo, xs[2u * j]) + dot(hi, xs[2u * j + 1u]); }
  y[row] = acc""",
"dot_noload_x_uniform": """@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x; var acc = 0.0; var q = row * 2654435761u;
  for (var j = 0u; j < WPR; j++) { q = q * 1664525u + 1013904223u;
    let lo = vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
    let hi = vec4<f32>(vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u));
    acc += dot(lo, xu[2u * j]) + dot(hi, xu[2u * j + 1u]); }
  y[row] = acc""",
}
kern = {k: v + TOUCH + "; }" for k, v in kern.items()}
cases = []
for name, body in kern.items():
    pl = dev.create_compute_pipeline(layout="auto", compute={"module": dev.create_shader_module(code=hdr + body), "entry_point": "main"})
    bg = dev.create_bind_group(layout=pl.get_bind_group_layout(0), entries=[{"binding": i, "resource": {"buffer": b}} for i, b in enumerate([wbuf, xbuf, ybuf, wbuf, xbuf, xubuf])])
    cases.append((name, pl, bg))
qs = dev.create_query_set(type=wgpu.QueryType.timestamp, count=16)
qb = dev.create_buffer(size=128, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
res = {n: [] for n, _, _ in cases}
for rep in range(5):
    for name, pl, bg in cases:
        enc = dev.create_command_encoder(); cp = enc.begin_compute_pass()
        for i in range(4):
            cp.set_pipeline(pl); cp.set_bind_group(0, bg); write_timestamp(cp, qs, 2*i); cp.dispatch_workgroups(ROWS // 64); write_timestamp(cp, qs, 2*i+1)
        cp.end(); enc.resolve_query_set(qs, 0, 8, qb, 0); dev.queue.submit([enc.finish()])
        ts = np.frombuffer(dev.queue.read_buffer(qb), np.uint64).astype(np.int64)
        res[name].append(np.median(ts[1::2] - ts[0::2]))
for n, r in res.items():
    print(f"{n:24s} {statistics.median(r)/1e3:9.1f} us  min {min(r)/1e3:9.1f}  ({NW*4/statistics.median(r):.2f} GB/s)")
