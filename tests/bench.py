"""Speed of kiln next to llama.cpp on this machine, measured in one run (`make bench`; not a test).

    python tests/bench.py [--model smollm2] [--prompt-tokens 100] [--gen 64] [--threads 1,2] [--repeats 3] [--json FILE]

Both engines get the same GGUF, the same prompt token ids (kiln's tokenizer reproduces llama.cpp's ids) and greedy
decoding for the same number of tokens:

  kiln       native wgpu runtime (runtime_py.model) on this machine's adapter; prefill = Session.forward(prompt) plus
             the 4-byte read of the GPU argmax that waits for it; decode = per token forward([tok]) + argmax read
  llama.cpp  llama-cpp-python on the CPU, at its best: one process per (threads in --threads) x OMP_WAIT_POLICY
             (passive, active; read by OpenMP at import, hence a process each), the fastest prefill and the fastest
             decode taken; prefill = Llama.eval(prompt); decode = per token eval([tok]) + argmax of the last logits

Prefill is the best of --repeats runs (after one warm-up), decode is one run of --gen tokens after the prompt.
Prints a table with kiln / llama.cpp ratios, then the numbers as one JSON object (last line of stdout, or --json FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/kiln-xdg-{os.getuid()}")
os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)

# ~100 tokens of plain English (SmolLM2's tokenizer: 1 token per short word or punctuation mark)
PROMPT = ("The history of the city begins with a small fishing village on the banks of a wide river. Over the "
          "centuries, merchants arrived from distant lands, bringing spices, silk and new ideas. The village grew "
          "into a town, and the town into a busy port with markets, bridges and tall stone houses. Scholars "
          "founded a university, painters filled the churches with color, and engineers built canals that still "
          "carry boats today. Visitors who walk through the old quarter can")


def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(PROMPT)
    while len(ids) < n:
        ids = ids + tok.encode(" " + PROMPT)
    return ids[:n]


def bench_kiln(art: Path, ids: list[int], n_gen: int, repeats: int) -> dict:
    from runtime_py.model import Model
    t0 = time.perf_counter()
    model = Model(art)
    load_s = time.perf_counter() - t0
    s = model.session(ctx=max(512, len(ids) + n_gen + 8))

    def prefill() -> tuple[float, int]:
        s.reset()
        t = time.perf_counter()
        s.forward(ids)
        first = s.next_token()          # reads 4 bytes: waits for the whole prefill
        return time.perf_counter() - t, first

    s.reset()
    s.forward(ids[:8])                  # warm-up: first dispatches, driver caches
    s.next_token()
    prefill()
    times = []
    for _ in range(repeats):
        dt, first = prefill()
        times.append(dt)
    out, t = [first], time.perf_counter()
    for _ in range(n_gen - 1):
        s.forward([out[-1]])
        out.append(s.next_token())
    decode_s = time.perf_counter() - t
    info = model.device.adapter.info
    return {"engine": "kiln", "adapter": f"{info.get('device', '')} ({info.get('backend_type', '')})",
            "load_s": round(load_s, 3), "prefill_s": round(min(times), 4), "prefill_runs_s": [round(x, 4) for x in times],
            "prefill_tok_s": round(len(ids) / min(times), 2), "decode_s": round(decode_s, 4),
            "decode_tok_s": round((n_gen - 1) / decode_s, 2), "ids": out}


def bench_llamacpp(gguf_path: Path, ids: list[int], n_gen: int, repeats: int, threads: int) -> dict:
    from llama_cpp import Llama
    import llama_cpp
    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf_path), n_ctx=max(512, len(ids) + n_gen + 8), n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(np.argmax(logits))

    def prefill() -> tuple[float, int]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        first = argmax()
        return time.perf_counter() - t, first

    llm.reset()
    llm.eval(ids[:8])                   # warm-up
    prefill()
    times = []
    for _ in range(repeats):
        dt, first = prefill()
        times.append(dt)
    out, t = [first], time.perf_counter()
    for _ in range(n_gen - 1):
        llm.eval([out[-1]])
        out.append(argmax())
    decode_s = time.perf_counter() - t
    return {"engine": "llama.cpp", "version": getattr(llama_cpp, "__version__", "?"), "threads": threads,
            "load_s": round(load_s, 3), "prefill_s": round(min(times), 4), "prefill_runs_s": [round(x, 4) for x in times],
            "prefill_tok_s": round(len(ids) / min(times), 2), "decode_s": round(decode_s, 4),
            "decode_tok_s": round((n_gen - 1) / decode_s, 2), "ids": out}


def llamacpp_at_best(a, ids: list[int]) -> dict | None:
    """llama.cpp in one child process per (threads, OMP_WAIT_POLICY); the fastest prefill and the fastest decode."""
    import subprocess
    runs = []
    for threads in [int(t) for t in str(a.threads).split(",")]:
        for policy in ("passive", "active"):
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            cmd = [sys.executable, __file__, "--model", a.model, "--gen", str(a.gen), "--repeats", str(a.repeats),
                   "--llamacpp-one", str(threads)]
            p = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True, env=env)
            if p.returncode != 0:
                if "No module named 'llama_cpp'" in p.stderr:
                    print("llama-cpp-python is not installed (pip install -e '.[bench]'): kiln only", file=sys.stderr)
                    return None
                raise RuntimeError(f"llama.cpp run ({threads} threads, {policy}) failed:\n{p.stderr[-2000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"llama.cpp {threads} thread(s), OMP_WAIT_POLICY={policy}: prefill {r['prefill_tok_s']} tok/s, "
                  f"decode {r['decode_tok_s']} tok/s", file=sys.stderr)
            runs.append(r)
    bp = max(runs, key=lambda r: r["prefill_tok_s"])
    bd = max(runs, key=lambda r: r["decode_tok_s"])
    name = lambda r: f"{r['threads']}t/{r['omp_wait_policy']}"
    return {**bd, "prefill_s": bp["prefill_s"], "prefill_runs_s": bp["prefill_runs_s"],
            "prefill_tok_s": bp["prefill_tok_s"], "prefill_config": name(bp), "decode_config": name(bd),
            "configs_tried": len(runs), "threads": f"{bp['threads']}/{bd['threads']}",
            "all_runs": [{k: r[k] for k in ("threads", "omp_wait_policy", "prefill_tok_s", "decode_tok_s")} for r in runs]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="known model name or .gguf path (default smollm2)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--gen", type=int, default=64, help="generated tokens (greedy)")
    ap.add_argument("--threads", default="1,2", help="llama.cpp thread counts to try (comma-separated)")
    ap.add_argument("--llamacpp-one", help=argparse.SUPPRESS)   # internal: "THREADS" -> one llama.cpp run, JSON out
    ap.add_argument("--repeats", type=int, default=3, help="prefill runs (best is reported)")
    ap.add_argument("--json", help="write the JSON result to this file instead of stdout")
    ap.add_argument("--skip-llamacpp", action="store_true")
    a = ap.parse_args(argv)

    from runtime_py.artifacts import ensure_artifact, resolve_gguf
    from runtime_py.tokenizer import Tokenizer
    gguf_path = resolve_gguf(a.model)
    if a.llamacpp_one:   # child process: OMP_WAIT_POLICY is already in its environment
        ids = json.loads(sys.stdin.read())
        r = bench_llamacpp(gguf_path, ids, a.gen, a.repeats, int(a.llamacpp_one))
        print(json.dumps({**r, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))
        return
    art = ensure_artifact(str(gguf_path), log=lambda *x: print(*x, file=sys.stderr))
    m = json.loads((art / "manifest.json").read_text())
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    ids = prompt_ids(tok, a.prompt_tokens)

    print(f"model {gguf_path.name}: {len(ids)} prompt tokens, {a.gen} generated (greedy)", file=sys.stderr)
    results = [bench_kiln(art, ids, a.gen, a.repeats)]
    if not a.skip_llamacpp:
        lc = llamacpp_at_best(a, ids)
        if lc:
            results.append(lc)
    k = results[0]
    report = {"model": gguf_path.name, "prompt_tokens": len(ids), "generated_tokens": a.gen,
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "results": [{kk: v for kk, v in r.items() if kk != "ids"} for r in results]}
    if len(results) > 1:
        lc = results[1]
        same = next((i for i, (x, y) in enumerate(zip(k["ids"], lc["ids"])) if x != y), min(len(k["ids"]),
                                                                                            len(lc["ids"])))
        report["ratio_kiln_over_llamacpp"] = {"prefill": round(k["prefill_tok_s"] / lc["prefill_tok_s"], 3),
                                              "decode": round(k["decode_tok_s"] / lc["decode_tok_s"], 3)}
        report["greedy_tokens_agreeing"] = same

    print(f"\n{'engine':<12}{'prefill tok/s':>15}{'decode tok/s':>15}{'prefill s':>12}{'decode s':>12}  detail")
    for r in results:
        detail = r.get("adapter") or (f"llama-cpp-python {r['version']}, best of {r['configs_tried']}: prefill "
                                      f"{r['prefill_config']}, decode {r['decode_config']}")
        print(f"{r['engine']:<12}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>15.1f}{r['prefill_s']:>12.3f}"
              f"{r['decode_s']:>12.3f}  {detail}")
    if "ratio_kiln_over_llamacpp" in report:
        q = report["ratio_kiln_over_llamacpp"]
        print(f"{'kiln/llama':<12}{q['prefill']:>15.3f}{q['decode']:>15.3f}")
        print(f"greedy tokens agreeing before the first difference: {report['greedy_tokens_agreeing']}/{a.gen}")
    text = json.dumps(report)
    if a.json:
        Path(a.json).write_text(text + "\n")
        print(f"wrote {a.json}")
    else:
        print(text)


if __name__ == "__main__":
    main()
