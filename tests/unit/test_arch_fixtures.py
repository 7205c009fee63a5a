"""The architecture test models (tests/fixtures/archs, made by tools/arch_fixtures/make_fixtures.py) are what their
manifest says and their references are self-consistent: every GGUF parses with gguf-py and holds exactly the
metadata keys and tensors listed, each architecture carries the feature it is there for, llama.cpp's prompt ids
equal transformers', and the greedy records agree with their own top-5 logits and last-position logits."""
from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "archs"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
MODELS = MANIFEST["models"]
QUANTS = ("F16", "Q8_0", "Q4_K_M")           # every model
EXTRA = {"qwen3": {"BF16", "Q5_1", "IQ4_NL"}, "llama3": {"Q5_1"}}   # more tensor types (tools/arch_fixtures/extra_types.py)
CASES = [(m, q) for m in MODELS for q in MODELS[m]["files"]]
EXPECTED_MODELS = {"llama3", "llama_linear", "qwen2", "qwen3", "phi3", "mistral", "gemma2"}
EXPECTED_ARCH = {"llama3": "llama", "llama_linear": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                 "mistral": "llama", "gemma2": "gemma2"}


@functools.lru_cache(maxsize=None)
def reader(model: str, quant: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(ROOT / MODELS[model]["files"][quant]["file"]))


def meta(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


def load(model: str, quant: str, kind: str):
    return json.loads((ROOT / MODELS[model]["files"][quant][kind]).read_text())


def test_every_architecture_and_file_type_present():
    assert set(MODELS) == EXPECTED_MODELS
    for name, m in MODELS.items():
        assert set(m["files"]) == set(QUANTS) | EXTRA.get(name, set())
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total < 48e6, f"fixture set grew to {total / 1e6:.1f} MB"


@pytest.mark.parametrize("model,quant", CASES)
def test_gguf_matches_manifest(model, quant):
    entry = MODELS[model]["files"][quant]
    path = ROOT / entry["file"]
    assert path.stat().st_size == entry["bytes"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    r = reader(model, quant)
    assert meta(r, "general.architecture") == entry["arch"] == EXPECTED_ARCH[model]
    keys = {k for k in r.fields if not k.startswith("GGUF.")}
    assert keys == set(entry["metadata"]), keys ^ set(entry["metadata"])
    for k, v in entry["metadata"].items():
        f = r.fields[k]
        if "value" in v and not str(v["value"]).startswith("<"):
            got = f.contents()
            assert (math.isclose(got, v["value"], rel_tol=1e-6) if isinstance(got, float) else got == v["value"]), k
        else:
            assert len(f.data) == v.get("len", len(f.data)), k
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    assert tensors == {n: (t["type"], t["shape"]) for n, t in entry["tensors"].items()}


@pytest.mark.parametrize("model,quant", CASES)
def test_file_type_is_what_the_name_says(model, quant):
    types = {t.tensor_type.name for t in reader(model, quant).tensors if len(t.shape) == 2}
    # (llama.cpp's Q5_1 / IQ4_NL mixes keep the tied embedding in Q6_K)
    want = {"F16": {"F16"}, "Q8_0": {"Q8_0"}, "Q4_K_M": {"Q4_K", "Q6_K"}, "BF16": {"BF16"},
            "Q5_1": {"Q5_1", "Q6_K"}, "IQ4_NL": {"IQ4_NL", "Q6_K"}}[quant]
    assert types == want, types    # every matrix in the file's own type family (K-quants: dims are 256-multiples)


def hparams(model):
    return MODELS[model]["hf_config"]


def tensor(r, name):
    return next(t for t in r.tensors if t.name == name)


@pytest.mark.parametrize("quant", QUANTS)
def test_llama3_rope_freqs_are_the_llama3_factors(quant):
    """rope_freqs.weight holds llama.cpp's per-frequency divisors, computed here from the original config."""
    r = reader("llama3", quant)
    rp = hparams("llama3")["rope_parameters"]
    hd = hparams("llama3")["head_dim"]
    base, factor = rp["rope_theta"], rp["factor"]
    lo, hi, old = rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    want = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / hd))
        if wavelen < old / hi:
            want.append(1.0)
        elif wavelen > old / lo:
            want.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            want.append(1 / ((1 - smooth) / factor + smooth))
    got = np.asarray(tensor(r, "rope_freqs.weight").data, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert sum(w == factor for w in want) >= 8, "most low frequencies scaled: the test exercises the scaling"
    assert "llama.rope.scaling.type" not in r.fields     # llama3 scaling lives in the tensor only
    long_ids = load("llama3", quant, "transformers")["long"]["prompt_ids"]
    assert len(long_ids) > 2 * old, "the long prompt runs past the original context's low-frequency threshold"


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_linear_rope_scaling_keys(quant):
    r = reader("llama_linear", quant)
    assert meta(r, "llama.rope.scaling.type") == "linear"
    assert meta(r, "llama.rope.scaling.factor") == pytest.approx(hparams("llama_linear")["rope_parameters"]["factor"])
    assert "rope_freqs.weight" not in {t.name for t in r.tensors}


@pytest.mark.parametrize("quant", QUANTS)
def test_architecture_features(quant):
    names = {m: {t.name for t in reader(m, quant).tensors} for m in MODELS}
    L = hparams("qwen2")["num_hidden_layers"]
    for i in range(L):
        assert {f"blk.{i}.attn_{p}.bias" for p in "qkv"} <= names["qwen2"]
        assert {f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"} <= names["qwen3"]
        assert f"blk.{i}.attn_qkv.weight" in names["phi3"] and f"blk.{i}.attn_q.weight" not in names["phi3"]
        assert f"blk.{i}.ffn_gate.weight" not in names["phi3"]
        assert {f"blk.{i}.post_attention_norm.weight", f"blk.{i}.post_ffw_norm.weight"} <= names["gemma2"]
    for m in ("qwen2", "qwen3", "llama3", "llama_linear", "gemma2"):
        assert "output.weight" not in names[m], m          # tied heads
    for m in ("phi3", "mistral"):
        assert "output.weight" in names[m], m
    h = hparams("phi3")
    r = reader("phi3", quant)
    assert tensor(r, "blk.0.ffn_up.weight").shape.tolist() == [h["hidden_size"], 2 * h["intermediate_size"]]
    q, kv = h["num_attention_heads"], h["num_key_value_heads"]
    hd = h["hidden_size"] // q
    assert tensor(r, "blk.0.attn_qkv.weight").shape.tolist() == [h["hidden_size"], (q + 2 * kv) * hd]
    assert meta(r, "phi3.rope.scaling.original_context_length") == h["original_max_position_embeddings"]
    g = reader("gemma2", quant)
    hg = hparams("gemma2")
    assert meta(g, "gemma2.attn_logit_softcapping") == pytest.approx(hg["attn_logit_softcapping"])
    assert meta(g, "gemma2.final_logit_softcapping") == pytest.approx(hg["final_logit_softcapping"])
    assert meta(g, "gemma2.attention.sliding_window") == hg["sliding_window"]
    assert hg["layer_types"][0] == "sliding_attention" and hg["layer_types"][1] == "full_attention"
    long_ids = load("gemma2", quant, "transformers")["long"]["prompt_ids"]
    assert len(long_ids) > hg["sliding_window"], "the long prompt runs past the sliding window"
    assert meta(reader("mistral", quant), "general.architecture") == "llama"


def test_ablations_move_the_reference():
    """Ignoring a model's feature moves the F16 reference by far more than the 0.02 tolerance: the fixture catches it."""
    want = {"llama3": "rope_scaling_ignored", "llama_linear": "rope_scaling_ignored", "qwen2": "qkv_bias_ignored",
            "qwen3": "qk_norm_ignored", "gemma2": "attn_softcap_ignored"}
    for m, ab in want.items():
        assert MODELS[m]["ablations"][ab]["max_abs_dlogit_last"] > 0.2, (m, ab)
    for ab in ("final_softcap_ignored", "sliding_window_ignored"):
        assert MODELS["gemma2"]["ablations"][ab]["max_abs_dlogit_last"] > 0.2, ab


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table (inverse)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def detokenize(r: gguf.GGUFReader, ids: list[int]) -> str:
    tokens = meta(r, "tokenizer.ggml.tokens")
    if meta(r, "tokenizer.ggml.model") == "gpt2":
        bd = byte_decoder()
        return b"".join(bytes(bd[c] for c in tokens[i]) for i in ids).decode("utf-8")
    out = bytearray()
    for i in ids:
        t = tokens[i]
        if t.startswith("<0x") and t.endswith(">") and len(t) == 6:
            out.append(int(t[3:5], 16))
        else:
            out += t.replace("\u2581", " ").encode("utf-8")
    return out.decode("utf-8")


@pytest.mark.parametrize("model,quant", CASES)
def test_prompt_ids_llamacpp_equal_transformers_and_spell_the_prompt(model, quant):
    tr, lc = load(model, quant, "transformers"), load(model, quant, "llamacpp")
    r = reader(model, quant)
    bos = meta(r, "tokenizer.ggml.bos_token_id")
    add_bos = bool(meta(r, "tokenizer.ggml.add_bos_token")) if "tokenizer.ggml.add_bos_token" in r.fields else False
    assert set(tr) == set(lc) == set(MANIFEST["prompts"])
    for p, rec in tr.items():
        assert rec["prompt_ids"] == lc[p]["prompt_ids"], p
        ids = rec["prompt_ids"]
        if rec["add_special"] and add_bos:
            assert ids[0] == bos
            ids = ids[1:]
        assert detokenize(r, ids) == rec["text"], p


@pytest.mark.parametrize("model,quant", CASES)
def test_greedy_records_are_self_consistent(model, quant):
    r = reader(model, quant)
    n_vocab = len(meta(r, "tokenizer.ggml.tokens"))
    last = np.load(ROOT / MODELS[model]["files"][quant]["transformers_last_logits"])
    for kind in ("transformers", "llamacpp"):
        for p, rec in load(model, quant, kind).items():
            assert len(rec["greedy"]) == len(rec["step_top5"]) == len(rec["margins"]) == MANIFEST["n_gen"]
            for tok, top, margin in zip(rec["greedy"], rec["step_top5"], rec["margins"]):
                logits = [v for _, v in top]
                assert logits == sorted(logits, reverse=True) and top[0][0] == tok and 0 <= tok < n_vocab
                assert margin == pytest.approx(top[0][1] - top[1][1])
            assert rec["min_margin"] == min(rec["margins"])
            if kind == "transformers":
                lg = last[p]
                assert lg.shape == (n_vocab,) and np.isfinite(lg).all()
                assert int(np.argmax(lg)) == rec["greedy"][0]
                np.testing.assert_allclose(np.sort(lg)[::-1][:5], [v for _, v in rec["step_top5"][0]], rtol=1e-6)
