"""Adds the tensor types beyond F16 / Q8_0 / Q4_K_M to models already built by make_fixtures.py: BF16 (the converter's
--outtype bf16 from the same random HF checkpoint) and Q5_1 (llama_model_quantize from the F16 file), each with the
same references as the other files (transformers float32 on its dequantised weights, llama.cpp ids and greedy);
IQ4_NL likewise (llama_model_quantize, no importance matrix needed).

    /tmp/archvenv/bin/python tools/arch_fixtures/extra_types.py --llama-cpp /tmp/x/llama_cpp_python-0.3.36/vendor/llama.cpp

Needs the work folder of a make_fixtures.py run (the HF checkpoints and tokenizers under --work).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_fixtures import (MODELS, REPO, convert, describe_gguf, llamacpp_reference, log,  # noqa: E402
                           prompt_texts, quantize, transformers_reference, update_manifest, versions)

EXTRA = {"qwen3": ("BF16", "Q5_1", "IQ4_NL"), "llama3": ("Q5_1",)}   # small: the fixture set stays under its budget


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/archwork"))
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/archs")
    ap.add_argument("--convert-python", default=sys.executable)
    ap.add_argument("--convert-python4", default="/tmp/archvenv4/bin/python")
    args = ap.parse_args()
    man_path = args.out / "manifest.json"
    for name, types in EXTRA.items():
        spec, hf, mdir = MODELS[name], args.work / name / "hf", args.out / name
        texts, tok = prompt_texts(args.work / {"smollm2": "tok_smollm2", "gemma_spm": "tok_gemma"}[spec["tokenizer"]])
        entry = json.loads(man_path.read_text())["models"][name]
        for q in types:
            path = mdir / f"{name}-{q}.gguf"
            if q in entry["files"] and path.exists():
                continue   # already made (delete the file to remake it)
            if q == "BF16":
                py = args.convert_python4 if spec.get("convert_with") == "transformers4" else args.convert_python
                convert(hf, path, "bf16", args.llama_cpp, py)
            else:
                quantize(mdir / f"{name}-F16.gguf", path, q)
            log(f"  {path.name}: {path.stat().st_size / 1e6:.2f} MB")
            tr, last = transformers_reference(path, hf, texts, tok)
            lc = llamacpp_reference(path, texts)
            stem = f"{name}-{q}"
            (mdir / f"{stem}_transformers.json").write_text(json.dumps(tr))
            np.savez_compressed(mdir / f"{stem}_transformers_last_logits.npz", **last)
            (mdir / f"{stem}_llamacpp.json").write_text(json.dumps(lc))
            agree = {}
            for p in texts:
                a, b = tr[p]["greedy"], lc[p]["greedy"]
                n = next((i for i in range(len(a)) if a[i] != b[i]), len(a))
                agree[p] = {"prompt_ids_equal": tr[p]["prompt_ids"] == lc[p]["prompt_ids"],
                            "n_prompt": len(tr[p]["prompt_ids"]), "greedy_agree_prefix": n,
                            "ref_min_margin": tr[p]["min_margin"],
                            "ref_margin_at_divergence": tr[p]["margins"][n] if n < len(a) else None}
            entry["files"][q] = {"file": f"{name}/{path.name}", **describe_gguf(path),
                                 "transformers": f"{name}/{stem}_transformers.json",
                                 "transformers_last_logits": f"{name}/{stem}_transformers_last_logits.npz",
                                 "llamacpp": f"{name}/{stem}_llamacpp.json", "agreement": agree}
        update_manifest(man_path, args.work / "manifest.lock", name, entry, versions(args.convert_python4))
    log("done")


if __name__ == "__main__":
    main()
