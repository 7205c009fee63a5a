"""What a load costs on this adapter: the probe behind ARCHITECTURE.md's "CPU adapters" section (not a test).

    python tests/bench_probe.py

One 1536x576 4-bit matrix (one row per invocation, 64 per workgroup); each probe kernel differs in one thing: weight
words only (scalar / vec4 loads, per-lane / lane-uniform addresses), dequantize-and-dot with x from a storage buffer,
workgroup memory or a uniform buffer, and the ALU alone; then the weight words from storage, a uniform binding or a
texture, and int8 weights dotted in f32 or with dot4I8Packed; then the Q8_0 LM head's mat-vec taken apart (scale
fetch, texel words, ALU) and on the rows-interleaved texture. GPU time per dispatch from timestamp queries, median of 5.
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

# -- weight paths: storage words vs a uniform binding vs a texture (rgba32uint, 16 bytes per fetch), and the same with
# dequantize-and-dot (x uniform); then q8_0-like int8 weights from a texture: f32 dequantize-and-dot vs dot4I8Packed
# over int8-packed x (what an int8-activation path would do), 6144 x 576 int8
words = np.random.default_rng(0).integers(0, 2**32, NW, dtype=np.uint32)
ubuf = dev.create_buffer_with_data(data=words[:16384].tobytes(), usage=wgpu.BufferUsage.UNIFORM)
tex = dev.create_texture(size=(K // 32, ROWS, 1), format=wgpu.TextureFormat.rgba32uint,
                         usage=wgpu.TextureUsage.TEXTURE_BINDING | wgpu.TextureUsage.COPY_DST)
dev.queue.write_texture({"texture": tex}, words.tobytes(), {"bytes_per_row": K // 2, "rows_per_image": ROWS},
                        (K // 32, ROWS, 1))
R8 = 6144
w8 = np.random.default_rng(2).integers(0, 2**32, R8 * K // 4, dtype=np.uint32)
tex8 = dev.create_texture(size=(4096, R8 * K // 16 // 4096, 1), format=wgpu.TextureFormat.rgba32uint,
                          usage=wgpu.TextureUsage.TEXTURE_BINDING | wgpu.TextureUsage.COPY_DST)
dev.queue.write_texture({"texture": tex8}, w8.tobytes(), {"bytes_per_row": 65536, "rows_per_image": R8 * K // 16 // 4096},
                        (4096, R8 * K // 16 // 4096, 1))
hdr2 = """
@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<uniform> wu: array<vec4<u32>, 4096>;
@group(0) @binding(2) var t: texture_2d<u32>;
@group(0) @binding(3) var t8: texture_2d<u32>;
@group(0) @binding(4) var<uniform> xu: array<vec4<f32>, 144>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
const WPR: u32 = %du;
fn d(q: u32, j: u32) -> f32 {
  let lo = vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
  let hi = vec4<f32>(vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u));
  return dot(lo, xu[2u * j]) + dot(hi, xu[2u * j + 1u]);
}
fn d4(q: vec4<u32>, j: u32) -> f32 { return d(q.x, 4u * j) + d(q.y, 4u * j + 1u) + d(q.z, 4u * j + 2u) + d(q.w, 4u * j + 3u); }
fn t8f(i: u32) -> vec4<u32> { return textureLoad(t8, vec2<u32>(i %% 4096u, i / 4096u), 0); }
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x;
""" % (K // 8)
TOUCH2 = (" + f32(w[0]) + f32(wu[0].x) + f32(textureLoad(t, vec2<u32>(0u, 0u), 0).x) + f32(t8f(0u).x) + xu[0].x; }")
kern2 = {  # name: (body, rows, bytes of weights)
 "storage words": ("var s = 0u; for (var j = 0u; j < WPR; j++) { s ^= w[row * WPR + j]; } y[row] = f32(s)", ROWS, NW * 4),
 "uniform words": ("var s = vec4<u32>(0u); for (var j = 0u; j < WPR / 4u; j++) { s ^= wu[(row * WPR / 4u + j) & 4095u]; }"
                   " y[row] = f32(s.x ^ s.y ^ s.z ^ s.w)", ROWS, NW * 4),
 "texture words": ("var s = vec4<u32>(0u); for (var j = 0u; j < WPR / 4u; j++) { s ^= textureLoad(t, vec2<u32>(j, row), 0); }"
                   " y[row] = f32(s.x ^ s.y ^ s.z ^ s.w)", ROWS, NW * 4),
 "storage dot": ("var a = 0.0; for (var j = 0u; j < WPR; j++) { a += d(w[row * WPR + j], j); } y[row] = a", ROWS, NW * 4),
 "texture dot": ("var a = 0.0; for (var j = 0u; j < WPR / 4u; j++) { a += d4(textureLoad(t, vec2<u32>(j, row), 0), j); }"
                 " y[row] = a", ROWS, NW * 4),
 "int8 w, f32 dot": ("var a = 0.0; for (var j = 0u; j < 36u; j++) { let v = t8f(row * 36u + j); for (var c = 0u; c < 4u; c++) {"
                     " let q = bitcast<i32>(v[c]); a += dot(vec4<f32>(vec4<i32>(q << 24u, q << 16u, q << 8u, q) >> vec4<u32>(24u)),"
                     " xu[4u * j + c]); } } y[row] = a", R8, R8 * K),
 "int8 w, dot4I8Packed": ("var a = 0; for (var j = 0u; j < 36u; j++) { let v = t8f(row * 36u + j); let xq = bitcast<vec4<u32>>(xu[j]);"
                          " a += dot4I8Packed(v.x, xq.x) + dot4I8Packed(v.y, xq.y) + dot4I8Packed(v.z, xq.z)"
                          " + dot4I8Packed(v.w, xq.w); } y[row] = f32(a)", R8, R8 * K),
}
cases2 = []
for name, (body, rows, nbytes) in kern2.items():
    pl = dev.create_compute_pipeline(layout="auto", compute={"module": dev.create_shader_module(code=hdr2 + body + TOUCH2),
                                                             "entry_point": "main"})
    ybig = dev.create_buffer(size=R8 * 4, usage=wgpu.BufferUsage.STORAGE)
    bg = dev.create_bind_group(layout=pl.get_bind_group_layout(0), entries=[
        {"binding": 0, "resource": {"buffer": wbuf}}, {"binding": 1, "resource": {"buffer": ubuf}},
        {"binding": 2, "resource": tex.create_view()}, {"binding": 3, "resource": tex8.create_view()},
        {"binding": 4, "resource": {"buffer": xubuf}}, {"binding": 5, "resource": {"buffer": ybig}}])
    cases2.append((name, pl, bg, rows, nbytes))
res2 = {c[0]: [] for c in cases2}
for rep in range(5):
    for name, pl, bg, rows, _ in cases2:
        enc = dev.create_command_encoder(); cp = enc.begin_compute_pass()
        for i in range(4):
            cp.set_pipeline(pl); cp.set_bind_group(0, bg); write_timestamp(cp, qs, 2*i); cp.dispatch_workgroups(rows // 64); write_timestamp(cp, qs, 2*i+1)
        cp.end(); enc.resolve_query_set(qs, 0, 8, qb, 0); dev.queue.submit([enc.finish()])
        ts = np.frombuffer(dev.queue.read_buffer(qb), np.uint64).astype(np.int64)
        res2[name].append(np.median(ts[1::2] - ts[0::2]))
for name, _, _, _, nbytes in cases2:
    r = res2[name]
    print(f"{name:24s} {statistics.median(r)/1e3:9.1f} us  min {min(r)/1e3:9.1f}  ({nbytes/statistics.median(r):.2f} GB/s)")

# -- the Q8_0 LM head (49152 x 576, SmolLM2's tied embedding) from a texture: where a mat-vec's time goes. One row per
# lane on the row-major layout ("base": the dot of matvec_cpu before the interleave), then each with one thing taken
# away (the per-group scale fetch; the arithmetic: texel words only; the loads: words made up in registers), then the
# rows-interleaved layout (runtime_py/weight_texture.py) with 1 and 4 rows per lane (matvec_cpu's default)
from runtime_py.weight_texture import upload_texture  # noqa: E402

R, G = 49152, 576 // 32
NB = R * G
lm = B.random_packed("q8_0", R, 576, np.random.default_rng(3))
tex_rm = dev.create_texture(size=(4096, -(-lm.nbytes // 65536), 1), format=wgpu.TextureFormat.rgba32uint,
                            usage=wgpu.TextureUsage.TEXTURE_BINDING | wgpu.TextureUsage.COPY_DST)
raw = lm.tobytes().ljust(-(-lm.nbytes // 65536) * 65536, b"\0")
dev.queue.write_texture({"texture": tex_rm}, raw, {"bytes_per_row": 65536, "rows_per_image": len(raw) // 65536},
                        (4096, len(raw) // 65536, 1))
tex_il = upload_texture(dev, lm.tobytes(), quant="q8_0", rows=R, k=576)
hdr3 = f"""
@group(0) @binding(0) var w: texture_2d<u32>;
@group(0) @binding(1) var<uniform> x: array<vec4<f32>, 144>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
const G: u32 = {G}u; const R: u32 = {R}u; const NB: u32 = {NB}u;
fn t(i: u32) -> vec4<u32> {{ return textureLoad(w, vec2<u32>(i % 4096u, i / 4096u), 0); }}
fn dq(q: u32, xv: vec4<f32>) -> f32 {{ let s = bitcast<i32>(q);
  return dot(vec4<f32>(vec4<i32>(s << 24u, s << 16u, s << 8u, s) >> vec4<u32>(24u)), xv); }}
fn dq8(w0: vec4<u32>, w1: vec4<u32>, xb: u32) -> f32 {{
  return dq(w0.x, x[xb]) + dq(w0.y, x[xb+1u]) + dq(w0.z, x[xb+2u]) + dq(w0.w, x[xb+3u])
       + dq(w1.x, x[xb+4u]) + dq(w1.y, x[xb+5u]) + dq(w1.z, x[xb+6u]) + dq(w1.w, x[xb+7u]); }}
fn dsc(b: u32, base: u32) -> f32 {{ return unpack2x16float(t(base + b / 8u)[(b / 2u) % 4u])[b % 2u]; }}
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) gid: vec3<u32>) {{
  let row = gid.x;
"""
IL = "(r & ~7u) * G * 2u + g * 16u + (r & 7u)"   # interleaved: texel 2g of row r
kern3 = {  # name: (body, rows per invocation, texture)
 "base": ("var a = 0.0; for (var g = 0u; g < G; g++) { let b = row * G + g; a += dsc(b, 2u * NB) * dq8(t(2u*b), t(2u*b+1u), g * 8u); }"
          " y[row] = a;", 1, tex_rm),
 "no scale fetch": ("var a = 0.0; for (var g = 0u; g < G; g++) { let b = row * G + g; a += dq8(t(2u*b), t(2u*b+1u), g * 8u); }"
                    " y[row] = a;", 1, tex_rm),
 "texel words only": ("var s = vec4<u32>(0u); for (var g = 0u; g < G; g++) { let b = row * G + g; s ^= t(2u*b) ^ t(2u*b+1u); }"
                      " y[row] = f32(s.x ^ s.y ^ s.z ^ s.w) + x[0].x;", 1, tex_rm),
 "ALU only": ("var a = f32(t(0u).x) * 0.0; var q = vec4<u32>(row * 2654435761u, row, row ^ 77u, row * 3u);"
              " for (var g = 0u; g < G; g++) { q = q * 1664525u + 1013904223u; a += dq8(q, q.yzwx, g * 8u); } y[row] = a;", 1, tex_rm),
 "interleaved": (f"var a = 0.0; let r = row; for (var g = 0u; g < G; g++) {{ let i = {IL};"
                 " a += dsc(r * G + g, R * G * 2u) * dq8(t(i), t(i + 8u), g * 8u); } y[row] = a;", 1, tex_il),
 "interleaved, 4 rows": ("".join(f"var a{j} = 0.0; let r{j} = row + {j}u * (R / 4u);" for j in range(4))
                         + " for (var g = 0u; g < G; g++) {" + "".join(
                             f" {{ let r = r{j}; let i = {IL}; a{j} += dsc(r * G + g, R * G * 2u) * dq8(t(i), t(i + 8u), g * 8u); }}"
                             for j in range(4)) + " }" + "".join(f" y[r{j}] = a{j};" for j in range(4)), 4, tex_il),
}
cases3 = []
for name, (body, per, tx) in kern3.items():
    pl = dev.create_compute_pipeline(layout="auto", compute={"module": dev.create_shader_module(code=hdr3 + body + " }"),
                                                             "entry_point": "main"})
    bg = dev.create_bind_group(layout=pl.get_bind_group_layout(0), entries=[
        {"binding": 0, "resource": tx.create_view()}, {"binding": 1, "resource": {"buffer": xubuf}},
        {"binding": 2, "resource": {"buffer": dev.create_buffer(size=R * 4, usage=wgpu.BufferUsage.STORAGE)}}])
    cases3.append((name, pl, bg, R // 64 // per))
res3 = {c[0]: [] for c in cases3}
for rep in range(5):
    for name, pl, bg, n in cases3:
        enc = dev.create_command_encoder(); cp = enc.begin_compute_pass()
        for i in range(4):
            cp.set_pipeline(pl); cp.set_bind_group(0, bg); write_timestamp(cp, qs, 2*i); cp.dispatch_workgroups(n); write_timestamp(cp, qs, 2*i+1)
        cp.end(); enc.resolve_query_set(qs, 0, 8, qb, 0); dev.queue.submit([enc.finish()])
        ts = np.frombuffer(dev.queue.read_buffer(qb), np.uint64).astype(np.int64)
        res3[name].append(np.median(ts[1::2] - ts[0::2]))
b0 = statistics.median(res3["base"])
for name, r in res3.items():
    print(f"LM head {name:20s} {statistics.median(r)/1e3:9.1f} us  min {min(r)/1e3:9.1f}  "
          f"({lm.nbytes/statistics.median(r):.2f} GB/s, {statistics.median(r)/b0:.2f}x base)")
