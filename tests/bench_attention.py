"""Decode cost at positions 100 and 1000 on this adapter: the whole step (wall, submit + 4-byte readback) and each
kernel family's GPU time from timestamp queries, for one or more compiled artifacts interleaved round by round (A/B
in one process: a busy machine slows them alike). Medians over --reps rounds. Not a test: numbers only.

    python tests/bench_attention.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--reps 5] [--positions 100 1000] [--prefill 64]

(compile one with `kiln compile smollm2 -o DIR --no-selftest`). The work per step is the same whatever the cache
holds, so positions past the prompt read what the cache has there.
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--positions", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many tokens at each position")
    a = ap.parse_args(argv)
    dev = make_device()
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
