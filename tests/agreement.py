"""Agreement with the peers per reference prompt, for each activations path (`--activations f32|int8`).

    .venv/bin/python tests/agreement.py [--activations f32,int8] [--json FILE]

SmolLM2 (the default artifact, compiled into a temporary directory) on the 8 reference prompts of tests/fixtures
(copied from shared/refs): max |dlogit| at the last prompt position against float32 transformers (whole vocabulary),
and 32 greedy tokens compared with transformers (tokens identical up to the first difference; "ok" when identical
up to the reference's first genuine tie, its top-2 margin < 0.02: tests/gpu/test_smollm2.py's rule) and with
llama.cpp, whose own agreement with transformers is shown beside it. The references' rule for a default path:
every prompt ok and |dlogit| <= 0.02. A report: exit status 0 whatever it finds (the f32 path is asserted by
tests/gpu/test_smollm2.py). On a GPU adapter int8 has no variant and runs f32 (said in the table).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/kiln-xdg-{os.getuid()}")
os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)

FIX = ROOT / "tests" / "fixtures"
MAX_ABS_LOGIT_DIFF, TIE_MARGIN, N_GREEDY = 0.02, 0.02, 32


def cases(name: str) -> dict:
    return {c["name"]: c for c in json.loads((FIX / name).read_text())["cases"]}


def agree(a: list[int], b: list[int]) -> int:
    """Tokens identical before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def first_tie(case) -> int:
    return next((i for i, top in enumerate(case["step_top5"]) if top[0][1] - top[1][1] < TIE_MARGIN),
                len(case["step_top5"]))


def run(art: Path, activations: str) -> dict:
    from runtime_py.model import Model
    tf, lc = cases("smollm2_transformers.json"), cases("smollm2_llamacpp.json")
    last = np.load(FIX / "smollm2_transformers_last_logits.npz")
    model = Model(art, activations=activations)
    rows = []
    for name, case in tf.items():
        s = model.session(ctx=512)
        s.forward(case["prompt_ids"])
        logits = s.logits()
        ids = [s.next_token()]
        while len(ids) < N_GREEDY:
            s.forward([ids[-1]])
            ids.append(s.next_token())
        ref, lref = case["greedy_ids"], lc[name]["greedy_ids"]
        upto = min(len(ref), first_tie(case), N_GREEDY)
        rows.append({"prompt": name, "dlogit": float(np.abs(logits - last[name]).max()),
                     "tf_agree": agree(ids, ref), "tf_len": len(ref), "tf_upto": upto, "ok": ids[:upto] == ref[:upto],
                     "lc_agree": agree(ids, lref), "lc_len": len(lref), "lc_vs_tf": agree(lref, ref)})
    return {"requested": activations, "activations": model.activations, "note": model.activations_note,
            "adapter": model.device.adapter.info.get("device", ""), "rows": rows}


def print_table(r: dict):
    print(f"\nactivations {r['activations']} (asked {r['requested']}) on {r['adapter']}"
          + (f": {r['note']}" if r["note"] else ""))
    print(f"  {'prompt':14s} {'max|dlogit|':>11s} {'= transformers':>15s} {'checked to':>10s} {'ok':>3s} "
          f"{'= llama.cpp':>12s} {'llama.cpp = tf':>15s}")
    for x in r["rows"]:
        print(f"  {x['prompt']:14s} {x['dlogit']:11.5f} {x['tf_agree']:>9d}/{x['tf_len']:<5d} {x['tf_upto']:>10d} "
              f"{'yes' if x['ok'] else 'NO':>3s} {x['lc_agree']:>7d}/{x['lc_len']:<4d} {x['lc_vs_tf']:>10d}/{x['tf_len']}")
    worst = max(x["dlogit"] for x in r["rows"])
    n_ok = sum(x["ok"] for x in r["rows"])
    passes = n_ok == len(r["rows"]) and worst <= MAX_ABS_LOGIT_DIFF
    print(f"  greedy ok on {n_ok}/{len(r['rows'])} prompts, max |dlogit| {worst:.5f}: "
          f"{'passes' if passes else 'does NOT pass'} the references' rule for a default path "
          f"(tie-aware greedy, |dlogit| <= {MAX_ABS_LOGIT_DIFF})")
    print(f"  tokens identical to transformers (sum) {sum(x['tf_agree'] for x in r['rows'])}, to llama.cpp "
          f"{sum(x['lc_agree'] for x in r['rows'])}; llama.cpp to transformers {sum(x['lc_vs_tf'] for x in r['rows'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", default="f32,int8")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from compiler.pipeline import compile_model
    from tests.models import smollm2_gguf_path
    out = []
    with tempfile.TemporaryDirectory(prefix="kiln-agreement-") as work:
        art = compile_model(smollm2_gguf_path(), Path(work) / "smollm2")
        for act in a.activations.split(","):
            out.append(run(art, act))
            print_table(out[-1])
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
