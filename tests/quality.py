"""Quality of `kiln compile --quant`: weight bytes and perplexity per scheme, next to llama.cpp on the same token ids.

    .venv/bin/python tests/quality.py [--models smollm2,gemma3] [--schemes original,q8_0,q4g32,q4g128]
                                      [--tokens N] [--json FILE] [--activations f32,int8]

Each scheme with float32 activations and with int8 ones (`--activations int8`: the CPU adapters' int8-activation
programs; f32 again where the adapter cannot run them, the table's `acts` column says which ran).

Text: tests/fixtures/quality_text.txt (original prose, ~520 words), tokenized once per model by kiln's tokenizer; the
same ids go to every scheme and to llama.cpp. Perplexity = exp(mean over i of -log p(ids[i+1] | ids[:i+1])); kiln
computes it with the `score` program (runtime_py/quality.py), llama.cpp (llama-cpp-python, logits_all=True) from the
logits of one eval of the ids. Acceptance: kiln's `original` within 2% of llama.cpp's (exit status 1 otherwise).
Each scheme is compiled into a temporary directory (never the artifact cache).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/kiln-xdg-{os.getuid()}")
os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)

from compiler.pipeline import compile_model          # noqa: E402
from runtime_py.artifacts import KNOWN_MODELS        # noqa: E402
from runtime_py.quality import nll, nll_from_logits  # noqa: E402

TEXT = ROOT / "tests" / "fixtures" / "quality_text.txt"
TOLERANCE = 0.02


def kiln_nll(art: Path, ids: list[int], activations: str = "f32") -> tuple[float, int, float, str]:
    """(nll sum, predictions, seconds, activations that ran) of the artifact on ids."""
    from runtime_py.model import Model
    model = Model(art, activations=activations)
    session = model.session(ctx=len(ids) + 8)
    t0 = time.perf_counter()
    total, n = nll(session, ids)
    dt = time.perf_counter() - t0
    used = model.activations
    del session, model
    gc.collect()
    return total, n, dt, used


def llamacpp_nll(gguf: Path, ids: list[int]) -> float:
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), logits_all=True, n_ctx=len(ids) + 8, n_batch=512, n_threads=2,
                n_threads_batch=2, verbose=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids) - 1], np.float32)
    total = nll_from_logits(logits, np.asarray(ids[1:]))
    del llm
    return total


def tokens_for(art: Path, limit: int | None) -> list[int]:
    from runtime_py.tokenizer import Tokenizer
    m = json.loads((art / "manifest.json").read_text())
    ids = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"]).encode(TEXT.read_text())
    return ids[:limit] if limit else ids


def run_model(name: str, schemes: list[str], limit: int | None, work: Path, log,
              activations=("f32",)) -> dict:
    gguf = KNOWN_MODELS[name]()
    rows, ids = [], None
    for scheme in schemes:
        art = work / f"{name}-{scheme}"
        t0 = time.perf_counter()
        compile_model(gguf, art, requant=None if scheme == "original" else scheme)
        m = json.loads((art / "manifest.json").read_text())
        ids = ids or tokens_for(art, limit)
        for act in activations:   # the same artifact; int8: its score@cpu_i8 variant where the adapter runs it
            total, n, dt, used = kiln_nll(art, ids, act)
            rows.append({"scheme": scheme, "activations": used, "weight_bytes": sum(s["bytes"] for s in m["shards"]),
                         "by_quant": m["weight_bytes_by_quant"], "nll": total / n, "ppl": math.exp(total / n),
                         "score_s": round(dt, 1)})
            log(f"  {name} {scheme} {used}: ppl {rows[-1]['ppl']:.4f} ({n} predictions, compile+score "
                f"{time.perf_counter() - t0:.0f}s)")
    ref = llamacpp_nll(gguf, ids) / (len(ids) - 1)
    out = {"model": name, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "tokens": len(ids), "rows": rows,
           "llamacpp": {"nll": ref, "ppl": math.exp(ref)}}
    orig = next((r for r in rows if r["scheme"] == "original" and r["activations"] == "f32"), None)
    if orig:
        out["ratio_original_over_llamacpp"] = orig["ppl"] / math.exp(ref)
    return out


def print_table(res: dict):
    ref = res["llamacpp"]["ppl"]
    print(f"\n{res['model']} ({res['gguf']}, {res['tokens']} tokens of {TEXT.name})")
    print(f"  {'scheme':10s} {'acts':>5s} {'weight MiB':>10s} {'perplexity':>11s} {'vs llama.cpp':>13s}   types")
    for r in res["rows"]:
        types = ", ".join(f"{q} {b / 2**20:.1f}" for q, b in r["by_quant"].items())
        print(f"  {r['scheme']:10s} {r['activations']:>5s} {r['weight_bytes'] / 2**20:10.2f} {r['ppl']:11.4f} "
              f"{r['ppl'] / ref:13.4f}  {types}")
    print(f"  {'llama.cpp':10s} {'q8':>5s} {res['gguf_bytes'] / 2**20:10.2f} {ref:11.4f} {1.0:13.4f}   original GGUF, "
          f"same ids")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2", help="comma-separated: smollm2,gemma3")
    ap.add_argument("--schemes", default="original,q8_0,q4g32,q4g128")
    ap.add_argument("--tokens", type=int, default=None, help="use only the first N tokens of the text")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--activations", default="f32,int8", help="comma-separated: each scheme's perplexity with f32 "
                    "and with int8 activations (the CPU adapters' int8 variants; f32 where they cannot run)")
    a = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731
    results, ok = [], True
    with tempfile.TemporaryDirectory(prefix="kiln-quality-") as work:
        for name in a.models.split(","):
            res = run_model(name.strip(), a.schemes.split(","), a.tokens, Path(work), log,
                            tuple(a.activations.split(",")))
            print_table(res)
            results.append(res)
            ratio = res.get("ratio_original_over_llamacpp")
            if ratio is not None:
                good = abs(ratio - 1) <= TOLERANCE
                ok &= good
                print(f"  original / llama.cpp = {ratio:.4f}: {'OK' if good else 'FAIL'} (within {TOLERANCE:.0%})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
