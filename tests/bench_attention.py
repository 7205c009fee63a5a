"""Decode cost at positions 100 and 1000 on this adapter: the whole step (wall, submit + 4-byte readback) and each
kernel family's GPU time from timestamp queries, for one or more compiled artifacts interleaved round by round (A/B
in one process: a busy machine slows them alike). Medians over --reps rounds. Not a test: numbers only.

    python tests/bench_attention.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--reps 5] [--positions 100 1000] [--prefill 64]
    python tests/bench_attention.py --kv-texture [--reps 9] [--positions 100 1000]

(compile one with `kiln compile smollm2 -o DIR --no-selftest`). The work per step is the same whatever the cache
holds, so positions past the prompt read what the cache has there. `--kv-texture`: decode@cpu's attention_cpu alone
on SmolLM2's and Gemma 3's shapes, K/V from storage buffers vs rgba32float textures (AttentionCPU kv_tex), GPU time
per dispatch, interleaved.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import wgpu
from wgpu.backends.wgpu_native.extras import write_timestamp

from compiler.schedule import dispatch_size
from runtime_py.device import get_adapter
from runtime_py.model import Model


def make_device():
    ad = get_adapter()
    lim = ad.limits
    wanted = {k: lim[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                  "max-compute-workgroup-storage-size") if k in lim}
    feats = [f for f in ("subgroups", "shader-f16") if f in ad.features]
    return ad.request_device_sync(required_limits=wanted,
                                  required_features=feats + ["timestamp-query", "timestamp-query-inside-passes"])


def family(kernel: str) -> str:
    """attention_cpu_n_head9_... -> attention_cpu; matvec_cpu_quantq4_1_... -> matvec_cpu"""
    out = []
    for part in kernel.split("_"):
        if any(ch.isdigit() for ch in part) or part in ("n", "head", "dim", "quant"):
            break
        out.append(part)
    return "_".join(out)


def profile(s, pos: int, token: int, prog: str = "decode", T: int = 1) -> dict[str, float]:
    """GPU ms per kernel family of one step of `prog` (T tokens of id `token`) at `pos` (timestamps around every
    dispatch; steps past T skipped, as the runtime does)."""
    dev = s.model.device
    names = [st["kernel"] for st in s.model.manifest["programs"][s.model.program_for[prog]]]
    steps = [(st, name) for st, name in zip(s._program(prog), names) if 0 not in [dispatch_size(x, T) for x in st[2]]]
    names = [name for _, name in steps]
    steps = [st for st, _ in steps]
    n = len(steps)
    qs = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2 * n)
    qbuf = dev.create_buffer(size=16 * n, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    dev.queue.write_buffer(s.buffers["tokens"], 0, np.full(T, token, np.uint32).tobytes())
    dev.queue.write_buffer(s.state, 0, np.array([T, pos, 0, 0], np.uint32).tobytes())
    enc = dev.create_command_encoder()
    cp = enc.begin_compute_pass()
    for i, (pl, bg, d) in enumerate(steps):
        cp.set_pipeline(pl)
        cp.set_bind_group(0, bg, [0])
        write_timestamp(cp, qs, 2 * i)
        cp.dispatch_workgroups(*(dispatch_size(x, T) for x in d))
        write_timestamp(cp, qs, 2 * i + 1)
    cp.end()
    enc.resolve_query_set(qs, 0, 2 * n, qbuf, 0)
    dev.queue.submit([enc.finish()])
    ts = np.frombuffer(dev.queue.read_buffer(qbuf), dtype=np.uint64).astype(np.int64)
    fam = collections.defaultdict(float)
    for name, ns in zip(names, ts[1::2] - ts[0::2]):
        fam[family(name)] += ns / 1e6
    fam["(all)"] = sum(v for k, v in fam.items())
    return dict(fam)


def wall(s, pos: int, token: int) -> float:
    """ms of one unprofiled decode submit + 4-byte readback at `pos`."""
    s.pos = pos
    t = time.perf_counter()
    s._run("decode", [token])
    s.next_token()
    return 1e3 * (time.perf_counter() - t)


def kv_texture_ab(dev, reps: int, positions: list[int]):
    """attention_cpu (decode, the schedule's splits) with K/V from storage vs from textures, GPU ms per dispatch."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
    import kernel_harness as H
    from compiler.kernels_cpu import AttentionCPU, kv_texture_shape
    from compiler.schedule_cpu_attention import cpu_decode_splits
    from runtime_py.model import STATE_BYTES, UNIFORM_ALIGN, pack_params
    U = wgpu.BufferUsage
    rng = np.random.default_rng(0)
    qs = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2)
    qbuf = dev.create_buffer(size=16, usage=U.QUERY_RESOLVE | U.COPY_SRC)
    print(f"attention_cpu, one decode dispatch, GPU ms (median of {reps}); load average {os.getloadavg()}")
    for model, (n_head, n_kv, hd) in (("SmolLM2", (9, 3, 64)), ("Gemma 3", (4, 1, 256))):
        ctx, splits = max(positions) + 1, cpu_decode_splits(n_kv)
        kv = rng.standard_normal((ctx, n_kv, hd)).astype(np.float32)   # (ctx, n_kv, hd), K and V alike
        w, h = kv_texture_shape(ctx, n_kv, hd)
        tex = dev.create_texture(size=(w, h, 1), format=wgpu.TextureFormat.rgba32float,
                                 usage=wgpu.TextureUsage.TEXTURE_BINDING | wgpu.TextureUsage.COPY_DST)
        dev.queue.write_texture({"texture": tex}, kv.tobytes(), {"bytes_per_row": w * 16, "rows_per_image": h},
                                (w, h, 1))
        sbuf = dev.create_buffer_with_data(data=kv.tobytes(), usage=U.STORAGE)
        q = dev.create_buffer_with_data(data=rng.standard_normal((n_head + 2 * n_kv) * hd).astype(np.float32)
                                        .tobytes(), usage=U.UNIFORM)
        part = dev.create_buffer(size=n_head * splits * (hd + 2) * 4, usage=U.STORAGE)
        runs = {}
        for kv_tex in (False, True):
            k = AttentionCPU(n_head=n_head, n_kv=n_kv, head_dim=hd, kv_tex=kv_tex)
            pipeline, layout = H._pipeline(dev, k)
            params = dict(n_head=n_head, n_kv=n_kv, head_dim=hd, window=0, scale=hd ** -0.5, splits=splits)
            blob = pack_params({"params": k.params}, [params[n] for n, _ in k.params])
            pb = dev.create_buffer_with_data(data=blob + b"\0" * (UNIFORM_ALIGN - len(blob)), usage=U.UNIFORM)
            kvr = [tex.create_view(), tex.create_view()] if kv_tex else [{"buffer": sbuf}, {"buffer": sbuf}]
            for pos in positions:
                st = dev.create_buffer_with_data(data=np.array([1, pos, 0, 0], np.uint32).tobytes(), usage=U.UNIFORM)
                ents = [{"binding": 0, "resource": {"buffer": st, "offset": 0, "size": STATE_BYTES}},
                        {"binding": 1, "resource": {"buffer": pb, "offset": 0, "size": UNIFORM_ALIGN}},
                        {"binding": 2, "resource": {"buffer": q}}, {"binding": 3, "resource": kvr[0]},
                        {"binding": 4, "resource": kvr[1]}, {"binding": 5, "resource": {"buffer": part}}]
                runs[kv_tex, pos] = (pipeline, dev.create_bind_group(layout=layout, entries=ents))
        times = collections.defaultdict(list)
        for _ in range(reps + 1):   # the first round warms up
            for key, (pipeline, bg) in runs.items():
                enc = dev.create_command_encoder()
                cp = enc.begin_compute_pass()
                cp.set_pipeline(pipeline)
                cp.set_bind_group(0, bg)
                write_timestamp(cp, qs, 0)
                cp.dispatch_workgroups(n_kv, splits, 1)
                write_timestamp(cp, qs, 1)
                cp.end()
                enc.resolve_query_set(qs, 0, 2, qbuf, 0)
                dev.queue.submit([enc.finish()])
                t = np.frombuffer(dev.queue.read_buffer(qbuf), np.uint64)
                times[key].append((int(t[1]) - int(t[0])) / 1e6)
        for kv_tex in (False, True):
            cells = [statistics.median(times[kv_tex, p][1:]) for p in positions]
            print(f"  {model:8s} {'texture' if kv_tex else 'storage':8s} "
                  + "  ".join(f"pos {p}: {c:7.3f} ms" for p, c in zip(positions, cells)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--kv-texture", action="store_true", help="attention_cpu with K/V in storage vs textures")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--positions", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many tokens at each position")
    a = ap.parse_args(argv)
    dev = make_device()
    if a.kv_texture:
        return kv_texture_ab(dev, a.reps, a.positions)
    if not a.artifacts:
        ap.error("give artifact directories, or --kv-texture")
    sessions = []
    for art in a.artifacts:
        m = Model(art, device=dev)
        s = m.session(ctx=max(a.positions) + max(8, a.prefill))
        s.forward(list(range(1, 9)))   # warm-up: pipelines; the cache beyond holds zeros
        s.next_token()
        sessions.append(s)
        print(f"{art}: {m.program_for['decode']}, {len(m.manifest['programs'][m.program_for['decode']])} dispatches",
              flush=True)
    walls = collections.defaultdict(list)
    profs = collections.defaultdict(list)
    for _ in range(a.reps):
        for i, s in enumerate(sessions):
            for pos in a.positions:
                walls[i, pos].append(wall(s, pos, 1))
                profs[i, pos].append(profile(s, pos, 1))
                if a.prefill:
                    profs[i, "prefill", pos].append(profile(s, pos, 1, "prefill", a.prefill))
    print(f"load average {os.getloadavg()}")
    for i, art in enumerate(a.artifacts):
        med = {pos: statistics.median(walls[i, pos]) for pos in a.positions}
        p0, p1 = a.positions[0], a.positions[-1]
        print(f"\n{art}: decode wall ms " + ", ".join(f"pos {p} {med[p]:.1f}" for p in a.positions)
              + f"; pos {p1} / pos {p0} = {med[p1] / med[p0]:.2f}x")
        fams = sorted({f for pr in profs[i, p1] for f in pr}, key=lambda f: -statistics.median(
            pr.get(f, 0) for pr in profs[i, p1]))
        for f in fams:
            cells = [statistics.median(pr.get(f, 0.0) for pr in profs[i, p]) for p in a.positions]
            print(f"  {f:28s} " + "  ".join(f"pos {p}: {c:8.2f} ms" for p, c in zip(a.positions, cells)))
        if a.prefill:
            print(f"  prefill of {a.prefill} tokens, GPU ms:")
            for f in sorted(profs[i, "prefill", p1][0], key=lambda f: -profs[i, "prefill", p1][0][f]):
                cells = [statistics.median(pr.get(f, 0.0) for pr in profs[i, "prefill", p]) for p in a.positions]
                print(f"    {f:26s} " + "  ".join(f"pos {p}: {c:8.2f} ms" for p, c in zip(a.positions, cells)))


if __name__ == "__main__":
    main()
