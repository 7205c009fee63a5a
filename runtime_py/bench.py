"""`kiln bench`: where a decode token's time goes on this adapter, and kiln beside llama.cpp in the same run.

Per model (default: smollm2 and gemma3) it prints, for this adapter:
  structure   dispatches, submits and bytes read back per generated token (sampled: temperature 0.7, top_p 0.9,
              seed 1), counted at wgpu-py's API; weight + KV bytes each decode token reads
  speed       decode tok/s at positions 100 and 1000 (several steps per submit, as generate() runs them) and prefill
              tok/s of one prefill chunk starting at positions 100 and 1000
  ceilings    a bandwidth probe (a read-only reduction over 64 MiB) and the measured cost of an empty dispatch and
              of a submit + 4-byte read; achieved GB/s = bytes per token x tok/s; the roofline ceiling =
              1 / (bytes / probe GB/s + dispatches x dispatch cost + submits x submit cost)
  peer        llama.cpp (llama-cpp-python, CPU) when installed: 1 and 2 threads, each with OMP_WAIT_POLICY passive
              and active, each in its own process (the variable is read when llama_cpp loads), fastest taken;
              kiln / llama.cpp as ratios.
Benchmarks are for reading, never asserted in tests. `--json` prints one JSON object instead of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

POSITIONS = (100, 1000)
PROBE_BYTES = 64 << 20
TEXT = ("The history of the city begins with a small fishing village on the banks of a wide river. Over the "
        "centuries, merchants arrived from distant lands, bringing spices, silk and new ideas. ")


def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT)
    while len(ids) < n:
        ids += tok.encode(TEXT)
    return ids[:n]


# -- counting at the wgpu-py API ------------------------------------------------------------------------------------
class Counter:
    """Dispatches, submits and bytes read back while active (patches wgpu-py's wgpu_native classes). Bytes read back
    count queue.read_buffer and buffer map_async (the GPU sampler's ring is read by mapping a staging buffer), a
    read_buffer's own staging map once, as tests/gpu/test_decode_loop.py Traffic counts them."""

    def __enter__(self):
        from wgpu.backends.wgpu_native import _api
        self._api, self.n = _api, {"dispatches": 0, "submits": 0, "read_bytes": 0}
        self._orig = (_api.GPUComputePassEncoder.dispatch_workgroups, _api.GPUQueue.submit, _api.GPUQueue.read_buffer,
                      _api.GPUBuffer.map_async)
        d, s, r, mp = self._orig
        n, in_read = self.n, [False]

        def dispatch(cp, *a, **k):
            n["dispatches"] += 1
            return d(cp, *a, **k)

        def submit(q, *a, **k):
            n["submits"] += 1
            return s(q, *a, **k)

        def read(q, buf, offset=0, size=None, *a, **k):
            n["read_bytes"] += size if size is not None else buf.size - offset
            in_read[0] = True
            try:
                return r(q, buf, offset, size, *a, **k)
            finally:
                in_read[0] = False

        def map_async(b, mode, offset=0, size=None, *a, **k):
            if not in_read[0]:   # read_buffer maps a staging buffer: counted once above
                n["read_bytes"] += size if size is not None else b.size - offset
            return mp(b, mode, offset, size, *a, **k)

        (_api.GPUComputePassEncoder.dispatch_workgroups, _api.GPUQueue.submit, _api.GPUQueue.read_buffer,
         _api.GPUBuffer.map_async) = dispatch, submit, read, map_async
        return self

    def __exit__(self, *exc):
        a = self._api
        (a.GPUComputePassEncoder.dispatch_workgroups, a.GPUQueue.submit, a.GPUQueue.read_buffer,
         a.GPUBuffer.map_async) = self._orig


# -- probes ---------------------------------------------------------------------------------------------------------
def probe_device(device) -> dict:
    """Bandwidth (GB/s) of a read-only reduction, cost of an empty dispatch and of a submit + 4-byte read."""
    import wgpu
    U = wgpu.BufferUsage
    code = """
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(256) fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  var acc = vec4<f32>(0.0);
  let stride = n.x * 256u;
  for (var i = g.x; i < arrayLength(&src); i += stride) { acc += src[i]; }
  dst[g.x] = acc.x + acc.y + acc.z + acc.w;
}"""
    wgs = 256
    src = device.create_buffer(size=PROBE_BYTES, usage=U.STORAGE)
    dst = device.create_buffer(size=wgs * 256 * 4, usage=U.STORAGE | U.COPY_SRC)
    pl = device.create_compute_pipeline(layout="auto", compute={"module": device.create_shader_module(code=code),
                                                                  "entry_point": "main"})
    bg = device.create_bind_group(layout=pl.get_bind_group_layout(0), entries=[
        {"binding": 0, "resource": {"buffer": src}}, {"binding": 1, "resource": {"buffer": dst}}])

    def run(n_dispatch, groups):
        enc = device.create_command_encoder()
        cp = enc.begin_compute_pass()
        cp.set_pipeline(pl)
        cp.set_bind_group(0, bg)
        for _ in range(n_dispatch):
            cp.dispatch_workgroups(groups)
        cp.end()
        t = time.perf_counter()
        device.queue.submit([enc.finish()])
        device.queue.read_buffer(dst, 0, 4)
        return time.perf_counter() - t

    run(1, wgs)
    bw = PROBE_BYTES / min(run(1, wgs) for _ in range(3)) / 1e9
    # an empty-ish dispatch: one workgroup whose loop exits at once is not possible over a 64 MiB binding, so use a
    # tiny one
    tiny = device.create_buffer(size=256 * 16, usage=U.STORAGE)
    bg = device.create_bind_group(layout=pl.get_bind_group_layout(0), entries=[
        {"binding": 0, "resource": {"buffer": tiny}}, {"binding": 1, "resource": {"buffer": dst}}])
    one = statistics.median(run(1, 1) for _ in range(10))
    many = statistics.median(run(201, 1) for _ in range(3))
    return {"probe_gb_s": round(bw, 2), "dispatch_us": round((many - one) / 200 * 1e6, 2),
            "submit_read_ms": round(one * 1e3, 3)}


# -- kiln -----------------------------------------------------------------------------------------------------------
def decode_bytes(manifest: dict, pos: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step at `pos` reads: every weight part the decode program binds, and K and
    V of pos + 1 positions per layer (f32)."""
    refs = {b for s in manifest["programs"]["decode"] for b in s["bind"] if "#" in b}
    w = 0
    for name, spec in manifest["weights"].items():
        w += sum(p["bytes"] for i, p in enumerate(spec["parts"]) if f"{name}#{i}" in refs)
    c = manifest["config"]
    kv = 2 * c["n_layer"] * (pos + 1) * c["n_kv_head"] * c["head_dim"] * 4
    return w, kv


def bench_kiln(model_name: str, gen: int, activations: str = "f32") -> dict:
    from .artifacts import ensure_artifact
    from .generate import generate
    from .model import Model
    from .sampling import GREEDY, SamplingParams
    from .tokenizer import Tokenizer
    art = ensure_artifact(model_name, log=lambda *a: print(*a, file=sys.stderr))
    model = Model(art, activations=activations)
    m = model.manifest
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    ctx = max(POSITIONS) + m["limits"]["prefill_chunk"] + gen + 8
    s = model.session(ctx=ctx)
    info = model.device.adapter.info
    out = {"model": m["model"]["name"], "adapter": f"{info.get('device', '')} ({info.get('backend_type', '')})",
           "decode_program_dispatches": len(m["programs"]["decode"]) + len(m["programs"].get("sample", [])),
           "activations": model.activations, "activations_note": model.activations_note}
    ids = prompt_ids(tok, 100)
    list(generate(s, tok, ids[:8], GREEDY, max_tokens=2))   # warm-up: pipelines, driver caches
    with Counter() as c:
        done = [e for e in generate(s, tok, ids, SamplingParams(temperature=0.7, top_p=0.9, seed=1),
                                    max_tokens=gen)][-1]
    n = max(1, len(done.ids))
    out["per_token"] = {k: round(v / n, 3) for k, v in c.n.items()}
    out["per_token"]["generated"] = n
    for pos in POSITIONS:
        # timing only: positions past what the session computed read whatever the cache holds there (the work is the
        # same); Session.reset(pos) refuses to go past the tokens it holds, so pad its record of them
        s.held.extend([0] * (pos - len(s.held)))
        w, kv = decode_bytes(m, pos)
        r = {"weight_bytes": w, "kv_bytes": kv}
        if s.gpu_sampling():   # several steps per submit, greedy on the GPU
            s.begin_sampling(GREEDY, ids, 0)
            s.reset(pos)
            s.decode_sample(2)
            steps = 8
            times = []
            for _ in range(2):
                s.reset(pos)
                t = time.perf_counter()
                s.decode_sample(steps)
                times.append((time.perf_counter() - t) / steps)
            r["decode_tok_s"] = round(1 / min(times), 2)
        chunk = prompt_ids(tok, m["limits"]["prefill_chunk"])
        s.reset(pos)
        t = time.perf_counter()
        s.forward(chunk)
        s.next_token()
        r["prefill_tok_s"] = round(len(chunk) / (time.perf_counter() - t), 2)
        r["achieved_gb_s"] = round((w + kv) * r.get("decode_tok_s", 0) / 1e9, 3)
        out[f"pos{pos}"] = r
    out["device"] = probe_device(model.device)
    d = out["device"]
    for pos in POSITIONS:
        r = out[f"pos{pos}"]
        t = (r["weight_bytes"] + r["kv_bytes"]) / (d["probe_gb_s"] * 1e9) \
            + out["per_token"]["dispatches"] * d["dispatch_us"] * 1e-6 + out["per_token"]["submits"] * d["submit_read_ms"] * 1e-3
        r["roofline_tok_s"] = round(1 / t, 1)
    return out


# -- llama.cpp ------------------------------------------------------------------------------------------------------
def peer_worker(gguf: str, threads: int, chunk: int) -> dict:
    """One llama.cpp setting (this process's OMP_WAIT_POLICY): decode and prefill tok/s at POSITIONS."""
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=max(POSITIONS) + chunk + 64, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(TEXT.encode() * 200, add_bos=False)
    out = {}
    for pos in POSITIONS:
        llm.reset()
        llm.eval(ids[:pos])
        t = time.perf_counter()
        llm.eval(ids[pos:pos + chunk])
        prefill = chunk / (time.perf_counter() - t)
        llm.n_tokens = pos   # back to pos: decode one token at a time from there
        t = time.perf_counter()
        for i in range(16):
            llm.eval([ids[pos + i]])
        out[f"pos{pos}"] = {"decode_tok_s": round(16 / (time.perf_counter() - t), 2), "prefill_tok_s": round(prefill, 2)}
    return out


def bench_peer(gguf: str, chunk: int) -> dict | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    runs = []
    for threads in (1, 2):
        for policy in ("passive", "active"):
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            p = subprocess.run([sys.executable, "-m", "runtime_py.bench", "--peer-worker", gguf, str(threads),
                                str(chunk)], env=env, capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                print(f"llama.cpp {threads} threads {policy}: failed: {p.stderr.strip()[-300:]}", file=sys.stderr)
                continue
            runs.append({"threads": threads, "omp_wait_policy": policy, **json.loads(p.stdout.strip().splitlines()[-1])})
    if not runs:
        return None
    best = {}
    for pos in POSITIONS:
        for k in ("decode_tok_s", "prefill_tok_s"):
            r = max(runs, key=lambda x: x[f"pos{pos}"][k])
            best.setdefault(f"pos{pos}", {})[k] = r[f"pos{pos}"][k]
            best[f"pos{pos}"][k.replace("tok_s", "setting")] = f"{r['threads']}t {r['omp_wait_policy']}"
    return {"runs": runs, "best": best}


def table(res: dict) -> str:
    k, lines = res["kiln"], []
    pt, d = k["per_token"], k["device"]
    lines.append(f"{k['model']} on {k['adapter']}")
    lines.append(f"  per generated token: {pt['dispatches']} dispatches, {pt['submits']} submits, "
                 f"{pt['read_bytes']} bytes read back ({pt['generated']} tokens sampled)")
    lines.append(f"  adapter: probe {d['probe_gb_s']} GB/s, {d['dispatch_us']} us per dispatch, "
                 f"{d['submit_read_ms']} ms per submit + 4-byte read")
    peer = (res.get("llama_cpp") or {}).get("best", {})
    lines.append(f"  {'position':>9} {'weight MB':>10} {'KV MB':>8} {'decode tok/s':>13} {'GB/s':>7} "
                 f"{'roofline':>9} {'prefill tok/s':>14}" + ("  llama.cpp decode / prefill (kiln ratio)" if peer else ""))
    for pos in POSITIONS:
        r = k[f"pos{pos}"]
        line = (f"  {pos:>9} {r['weight_bytes'] / 1e6:>10.1f} {r['kv_bytes'] / 1e6:>8.2f} {r.get('decode_tok_s', 0):>13.2f} "
                f"{r['achieved_gb_s']:>7.3f} {r['roofline_tok_s']:>9.1f} {r['prefill_tok_s']:>14.2f}")
        if peer:
            p = peer[f"pos{pos}"]
            line += (f"  {p['decode_tok_s']:.1f} ({r.get('decode_tok_s', 0) / p['decode_tok_s']:.3f}x) / "
                     f"{p['prefill_tok_s']:.1f} ({r['prefill_tok_s'] / p['prefill_tok_s']:.3f}x)")
        lines.append(line)
    for key in [x for x in res if x.startswith("kiln_")]:   # --activations: the other paths, ratios to the first
        o = res[key]
        lines.append(f"  activations {o['activations']}" + (f" ({o['activations_note']})" if o["activations_note"] else "")
                     + ": " + ", ".join(f"pos {pos} decode {o[f'pos{pos}'].get('decode_tok_s', 0):.2f} tok/s "
                                        f"({o[f'pos{pos}'].get('decode_tok_s', 0) / max(1e-9, k[f'pos{pos}'].get('decode_tok_s', 0)):.2f}x"
                                        f" {k['activations']}), prefill {o[f'pos{pos}']['prefill_tok_s']:.2f} "
                                        f"({o[f'pos{pos}']['prefill_tok_s'] / k[f'pos{pos}']['prefill_tok_s']:.2f}x)"
                                        for pos in POSITIONS))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="kiln bench", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3"], help="model names or .gguf paths")
    ap.add_argument("--gen", type=int, default=32, help="tokens sampled for the per-token counts (default 32)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--activations", default="f32", help="comma-separated f32,int8: run kiln with each (the first is "
                    "the one compared with llama.cpp; the others as ratios to it, same run)")
    ap.add_argument("--peer-worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.peer_worker:
        gguf, threads, chunk = a.peer_worker
        print(json.dumps(peer_worker(gguf, int(threads), int(chunk))))
        return
    from .artifacts import resolve_gguf
    results = []
    acts = a.activations.split(",")
    for name in a.models:
        res = {"kiln": bench_kiln(name, a.gen, acts[0])}
        for act in acts[1:]:
            res[f"kiln_{act}"] = bench_kiln(name, a.gen, act)
        if not a.no_peer:
            from .artifacts import ensure_artifact
            chunk = json.loads((ensure_artifact(name, log=lambda *x: None) / "manifest.json").read_text())["limits"]["prefill_chunk"]
            res["llama_cpp"] = bench_peer(str(resolve_gguf(name)), chunk)
        results.append(res)
        if not a.json:
            print(table(res), flush=True)
    if a.json:
        print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
