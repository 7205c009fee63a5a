"""Fuzzing the compiler's inputs and the runtime's artifacts: mutated GGUF files and mutated manifests.

    python -m tests.fuzz --cases 10000 --seed 1        (`make fuzz`; tests/unit/test_fuzz.py runs a few hundred)

Every case is one mutation of a small synthetic model (random weights written by gguf.GGUFWriter, a few layers of a
few dozen dims, so a whole compile takes well under a second) or of the manifest compiled from one. A case must end
in one of the *clean* outcomes:

    compiled      the file was valid enough: compile_model wrote an artifact whose manifest is strict JSON (no NaN or
                  infinity) and loads through the runtime's GPU-free path (read_manifest, tokenizer, chat prompt ids)
    refused       a KilnError subclass with a short one-line message (no control characters), by class name
    accepted      (manifests) read_manifest and the GPU-free load path took the edited manifest

and never in a *bad* one: `traceback` (any other exception), `bad-message` (a KilnError whose message is multi-line,
longer than MAX_MESSAGE or carries control characters), `nan-manifest`, `hang` (past CASE_SECONDS; the case runs in a
worker process that is killed and replaced) or `crash` (the worker died: out of memory, a signal). Cases are
deterministic: (seed, index) -> the same mutation, so `--only INDEX` replays one.

Mutations: GGUF header fields (magic, version, counts), metadata (values of every type at their edges: 0, -1, 2^31,
2^64-1, NaN, inf, 1e-45, huge or escape-laden strings; wrong types; missing and duplicate keys; array lengths), the
tensor table (dims 0 / huge / wrapping, n_dims, unknown types, offsets misaligned / overlapping / out of bounds /
near 2^64, names), tensor data (NaN, inf), random byte flips and truncation; manifest fields (deleted, retyped,
NaN / negative / huge numbers, strings with escapes, shortened lists).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import logging

import gguf
import numpy as np
from gguf.quants import quantize

CASE_SECONDS = 30            # per case: a mutation that makes any stage loop or stall is a hang
MAX_MESSAGE = 600            # characters in one error line (the path of the temp file included)
WORKER_MEMORY = 3 << 30      # address-space cap of a worker: an absurd dimension must be refused, not allocated
V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
CLEAN = ("compiled", "refused", "accepted")


# -- synthetic base models ---------------------------------------------------------------------------------------
def _bpe_vocab():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
        ["Ċ", "Ġ", "ab", "Ġa", "<", ">", "|", "_", "im"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, ["a b", "Ġ a"]


def _spm_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "▁"] + \
        [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁a", "ab", "\n"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2, 3, 3] + [1] * (len(tokens) - 6 - 256) + [6] * 256
    scores = [0.0] * 6 + [-float(i) for i in range(len(tokens) - 6)]
    return tokens, types, scores


def base_spec(kind: str, rng: np.random.Generator) -> dict:
    """{arch, meta: [(key, value, vtype, sub_type)], tensors: [(name, array, raw_dtype | None)]}."""
    gemma = kind == "gemma3"
    arch = "gemma3" if gemma else "llama"
    L, D, H, KV, HD, F = 2, 32, 2, 1, 16, 64
    meta = [("general.architecture", arch, V.STRING, None), ("general.name", f"fuzz-{kind}", V.STRING, None),
            (f"{arch}.block_count", L, V.UINT32, None), (f"{arch}.context_length", 128, V.UINT32, None),
            (f"{arch}.embedding_length", D, V.UINT32, None), (f"{arch}.feed_forward_length", F, V.UINT32, None),
            (f"{arch}.attention.head_count", H, V.UINT32, None), (f"{arch}.attention.head_count_kv", KV, V.UINT32, None),
            (f"{arch}.attention.key_length", HD, V.UINT32, None), (f"{arch}.attention.value_length", HD, V.UINT32, None),
            (f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32, None),
            (f"{arch}.rope.freq_base", 10000.0, V.FLOAT32, None)]
    if gemma:
        tokens, types, scores = _spm_vocab()
        meta += [(f"{arch}.attention.sliding_window", 8, V.UINT32, None),
                 ("tokenizer.ggml.model", "llama", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
                 ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
                 ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
                 ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
                 ("tokenizer.ggml.bos_token_id", 2, V.UINT32, None), ("tokenizer.ggml.eos_token_id", 1, V.UINT32, None),
                 ("tokenizer.ggml.add_bos_token", True, V.BOOL, None)]
    else:
        tokens, types, merges = _bpe_vocab()
        meta += [(f"{arch}.rope.dimension_count", HD, V.UINT32, None),
                 ("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "smollm", V.STRING, None),
                 ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
                 ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
                 ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
                 ("tokenizer.ggml.bos_token_id", 0, V.UINT32, None), ("tokenizer.ggml.eos_token_id", 2, V.UINT32, None),
                 ("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                  V.STRING, None)]
    Vn = len(tokens)
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    ones = lambda n: (1.0 + 0.01 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    qtype = {"llama-q8": Q.Q8_0, "llama-q4": Q.Q4_0}.get(kind)

    def mat(rows, k):
        a = f(rows, k)
        return (quantize(a, qtype), qtype) if qtype is not None else (a, None)

    tensors = [("token_embd.weight", *mat(Vn, D)), ("output_norm.weight", ones(D), None)]
    for i in range(L):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", ones(D), None), (b + "attn_q.weight", *mat(H * HD, D)),
                    (b + "attn_k.weight", *mat(KV * HD, D)), (b + "attn_v.weight", *mat(KV * HD, D)),
                    (b + "attn_output.weight", *mat(D, H * HD)), (b + "ffn_norm.weight", ones(D), None),
                    (b + "ffn_gate.weight", *mat(F, D)), (b + "ffn_up.weight", *mat(F, D)),
                    (b + "ffn_down.weight", *mat(D, F))]
        if gemma:
            tensors += [(b + "attn_q_norm.weight", ones(HD), None), (b + "attn_k_norm.weight", ones(HD), None),
                        (b + "post_attention_norm.weight", ones(D), None), (b + "post_ffw_norm.weight", ones(D), None)]
    return {"arch": arch, "meta": meta, "tensors": tensors}


def write_spec(spec: dict, path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), arch=None)   # general.architecture comes from meta (it may be mutated)
    for key, val, vtype, sub in spec["meta"]:
        w.add_key_value(key, val, vtype, sub_type=sub)
    for name, arr, raw in spec["tensors"]:
        w.add_tensor(name, arr, raw_dtype=raw)   # quantized: uint8 blocks, the shape follows from the type
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- where the fields of a GGUF file are (for byte-level mutations) -----------------------------------------------
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def field_offsets(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """{kind: [(offset, size)]} of the structural fields of a well-formed little-endian GGUF."""
    out: dict[str, list] = {k: [] for k in ("header", "key_len", "key", "type", "value", "str_len", "arr_type",
                                            "arr_len", "name_len", "name", "n_dims", "dim", "ttype", "toffset")}
    out["header"] = [(4, 4), (8, 8), (16, 8)]
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    off = 24

    def string(off, kind_len, kind):
        n = struct.unpack_from("<Q", data, off)[0]
        out[kind_len].append((off, 8))
        if kind:
            out[kind].append((off + 8, n))
        return off + 8 + n

    def value(t, off):
        if t in _SCALAR:
            out["value"].append((off, _SCALAR[t]))
            return off + _SCALAR[t]
        if t == 8:
            return string(off, "str_len", "value")
        it, cnt = struct.unpack_from("<IQ", data, off)
        out["arr_type"].append((off, 4))
        out["arr_len"].append((off + 4, 8))
        off += 12
        for _ in range(min(cnt, 64)):   # the first items are enough to aim at
            off = value(it, off)
        if cnt > 64:                     # skip the rest without recording
            for _ in range(cnt - 64):
                off = off + _SCALAR[it] if it in _SCALAR else off + 8 + struct.unpack_from("<Q", data, off)[0]
        return off

    for _ in range(n_kv):
        off = string(off, "key_len", "key")
        t = struct.unpack_from("<I", data, off)[0]
        out["type"].append((off, 4))
        off = value(t, off + 4)
    for _ in range(n_t):
        off = string(off, "name_len", "name")
        nd = struct.unpack_from("<I", data, off)[0]
        out["n_dims"].append((off, 4))
        off += 4
        for _ in range(nd):
            out["dim"].append((off, 8))
            off += 8
        out["ttype"].append((off, 4))
        out["toffset"].append((off + 4, 8))
        off += 12
    out["data_start"] = [(off, 0)]
    return out


# -- mutations ----------------------------------------------------------------------------------------------------
EDGE_INTS = [0, 1, 2, 3, 7, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63,
             2**64 - 1, 2**64 - 32, 2**64 - 2**40]
EDGE_FLOATS = [0.0, -0.0, -1.0, 1e-45, 1e-38, 1e-12, 1.0, 1e12, 1e38, 3.4e38, float("nan"), float("inf"),
               float("-inf"), -1e-5]
NASTY_STRINGS = ["", "\x1b[31mred\x1b[0m\x07", "a" * 100_000, "\x00\x01", "é🎉\u202e", "{{ x", "<|im_end|>", "\n" * 50,
                 "\x1b]0;title\x07" * 1000, "blk.0.attn_q.weight", "llama", "gemma3", "gpt2", "-1", "1e999"]


def _edge_bytes(rng: random.Random, size: int) -> bytes:
    if size == 4 and rng.random() < 0.3:
        return struct.pack("<f", rng.choice(EDGE_FLOATS))
    if size == 8 and rng.random() < 0.2:
        return struct.pack("<d", rng.choice(EDGE_FLOATS))
    v = rng.choice(EDGE_INTS + [rng.getrandbits(8 * size)])
    return (v % (1 << (8 * size))).to_bytes(size, "little") if size else b""


def mutate_bytes(base: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(base)
    offs = field_offsets(base)
    kind = rng.choice(["header", "key_len", "key", "type", "value", "value", "str_len", "arr_type", "arr_len",
                       "name_len", "name", "n_dims", "dim", "dim", "ttype", "toffset", "toffset", "flip", "flip",
                       "truncate", "data", "extend"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return "bytes.flip", bytes(data)
    if kind == "truncate":
        return "bytes.truncate", bytes(data[:rng.randrange(len(data))])
    if kind == "extend":
        return "bytes.extend", bytes(data) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096)))
    if kind == "data":   # inside tensor data: a NaN / inf where a weight or a block scale lives
        start = offs["data_start"][0][0]
        i = rng.randrange(start, len(data) - 4)
        data[i:i + 2] = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\xfe"])   # f16 NaN / inf / -NaN
        if rng.random() < 0.5:
            i -= i % 4
            data[i:i + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf")]))
        return "data.nonfinite", bytes(data)
    fields = offs[kind]
    if not fields:
        return mutate_bytes(base, rng)
    off, size = rng.choice(fields)
    if kind in ("key", "name", "value") and size > 8 and rng.random() < 0.5:   # bytes inside a string
        j = off + rng.randrange(size)
        data[j] = rng.choice([0x00, 0x1b, 0xff, 0xc3, 0x0a, rng.getrandbits(8)])
    else:
        size = min(size, 8) or 1
        data[off:off + size] = _edge_bytes(rng, size)
    return f"{'header' if kind == 'header' else 'meta' if kind in ('key_len', 'key', 'type', 'value', 'str_len', 'arr_type', 'arr_len') else 'table'}.{kind}", bytes(data)


def _meta_value(rng: random.Random):
    r = rng.random()
    if r < 0.35:
        return rng.choice(EDGE_INTS[:12] + [-1, -2**31]), rng.choice([V.UINT32, V.INT32, V.UINT64, V.INT64])
    if r < 0.7:
        return rng.choice(EDGE_FLOATS), rng.choice([V.FLOAT32, V.FLOAT64])
    if r < 0.85:
        return rng.choice(NASTY_STRINGS), V.STRING
    if r < 0.92:
        return rng.choice([True, False]), V.BOOL
    return [rng.randint(0, 5) for _ in range(rng.randint(0, 5))], V.ARRAY


def mutate_spec(spec: dict, rng: random.Random) -> tuple[str, dict]:
    meta, tensors = list(spec["meta"]), list(spec["tensors"])
    kind = rng.choice(["meta.value", "meta.value", "meta.value", "meta.drop", "meta.dup", "meta.add", "meta.tokens",
                       "table.shape", "table.drop", "table.add", "table.rename", "table.type", "data.nan"])
    if kind == "meta.value":
        i = rng.randrange(len(meta))
        val, vt = _meta_value(rng)
        meta[i] = (meta[i][0], val, vt, V.INT32 if vt == V.ARRAY else None)
    elif kind == "meta.drop":
        meta.pop(rng.randrange(len(meta)))
    elif kind == "meta.dup":
        meta.append(rng.choice(meta))
    elif kind == "meta.add":
        val, vt = _meta_value(rng)
        key = rng.choice([f"{spec['arch']}.{k}" for k in ("vocab_size", "attention.sliding_window_pattern",
                                                          "rope.freq_base_swa", "attention.scale", "rope.scaling.type",
                                                          "rope.scaling.factor", "final_logit_softcapping")]
                         + ["general.alignment", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.unknown_token_id",
                            "\x1b[2J" * 1000, "tokenizer.chat_template"])
        meta.append((key, val, vt, V.INT32 if vt == V.ARRAY else None))
    elif kind == "meta.tokens":   # the tokenizer arrays: shortened, emptied, duplicated entries
        arrays = [j for j, m in enumerate(meta) if m[0] in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                             "tokenizer.ggml.scores", "tokenizer.ggml.merges")]
        i = rng.choice(arrays)
        key, val, vt, sub = meta[i]
        if isinstance(val, list):
            op = rng.choice(["short", "empty", "dup", "junk"])
            val = val[:-1] if op == "short" else [] if op == "empty" else val + val[:1] if op == "dup" else \
                [rng.choice(NASTY_STRINGS) if isinstance(v, str) else v for v in val]
            meta[i] = (key, val, vt, sub)
    elif kind.startswith("table.") or kind == "data.nan":
        i = rng.randrange(len(tensors))
        name, arr, raw = tensors[i]
        if kind == "table.shape" and raw is None:
            shape = list(arr.shape)
            j = rng.randrange(len(shape))
            shape[j] = rng.choice([1, shape[j] + 1, shape[j] * 2, max(1, shape[j] // 2)])
            tensors[i] = (name, np.resize(arr, shape).astype(np.float32), None)
        elif kind == "table.drop":
            tensors.pop(i)
        elif kind == "table.add":
            tensors.append((rng.choice(["blk.0.attn_q.bias", "rope_freqs.weight", "blk.7.attn_norm.weight",
                                        "output.weight", "blk.x.ffn_up.weight", "\x1b[31m" * 20]),
                            np.ones(arr.shape, np.float32), None))
        elif kind == "table.rename":
            tensors[i] = (rng.choice(["", "blk.0.attn_q.weight", name + "\x00", "é" * 40]), arr, raw)
        elif kind == "table.type" and raw is None:
            tensors[i] = (name, arr.astype(rng.choice([np.float16, np.float32])), None)
        else:   # data.nan
            a = np.array(arr, copy=True)
            flat = a.reshape(-1)
            if raw is None:
                flat[rng.randrange(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
            else:   # a quantized block's first f16 scale
                blk = gguf.GGML_QUANT_SIZES[raw][1]
                j = rng.randrange(flat.size // blk) * blk
                flat[j:j + 2] = np.frombuffer(np.float16(rng.choice([np.nan, np.inf])).tobytes(), np.uint8)
            tensors[i] = (name, a, raw)
    return kind, {**spec, "meta": meta, "tensors": tensors}


# -- running one case ---------------------------------------------------------------------------------------------
def _check_message(e: BaseException) -> str | None:
    msg = str(e)
    if "\n" in msg or len(msg) > MAX_MESSAGE or any(not c.isprintable() for c in msg):
        return f"{type(e).__name__}: {msg[:200]!r}... ({len(msg)} chars)"
    return None


def _strict_json(path: Path):
    def nope(c):
        raise ValueError(f"non-finite number {c} in {path.name}")
    return json.loads(path.read_text(), parse_constant=nope)


def load_path(art: Path):
    """What a runtime does with an artifact before it needs a GPU: the manifest, the tokenizer, a chat prompt."""
    from compiler.manifest import read_manifest
    from runtime_py.chat import chat_prompt_ids
    from runtime_py.model import buffer_bytes
    from runtime_py.tokenizer import Tokenizer
    m = read_manifest(art)
    tok = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"])
    ids = chat_prompt_ids(tok, m, [{"role": "user", "content": "ab <|im_end|>"}])
    buffer_bytes(m, 16)
    return ids


def run_gguf_case(kind: str, mutated: bytes, tmp: Path) -> tuple[str, str]:
    from compiler.errors import KilnError
    from compiler.pipeline import compile_model
    path, out = tmp / "case.gguf", tmp / "out"
    path.write_bytes(mutated)
    shutil.rmtree(out, ignore_errors=True)
    try:
        compile_model(path, out)
    except KilnError as e:
        bad = _check_message(e)
        return ("bad-message", bad) if bad else ("refused", type(e).__name__)
    try:
        _strict_json(out / "manifest.json")
    except ValueError as e:
        return "nan-manifest", str(e)
    from runtime_py.chat import ChatTemplateError
    try:
        load_path(out)
    except ChatTemplateError as e:   # the GGUF's template is file content, checked when a chat renders it (a plain
        bad = _check_message(e)      # prompt still runs, and --chat-template replaces it): a clean refusal then
        return ("bad-message", bad) if bad else ("compiled", "chat template refused at chat time")
    except KilnError as e:   # any other refusal of a compiled artifact by its own runtime is a compiler bug
        return "traceback", f"artifact refused by the runtime: {type(e).__name__}: {str(e)[:200]}"
    return "compiled", ""


def mutate_manifest(m: dict, rng: random.Random) -> tuple[str, dict]:
    m = json.loads(json.dumps(m))
    paths = []

    def walk(node, path, depth):
        paths.append(path)
        if depth > 6:
            return
        if isinstance(node, dict):
            for k, v in list(node.items())[:40]:
                walk(v, path + (k,), depth + 1)
        elif isinstance(node, list):
            for i, v in enumerate(node[:6]):
                walk(v, path + (i,), depth + 1)
    walk(m, (), 0)
    path = rng.choice(paths[1:])
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.choice(["delete", "null", "nan", "int", "neg", "huge", "float", "string", "list", "dict", "short"])
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    else:
        parent[key] = {"null": None, "nan": float("nan"), "int": rng.choice([0, 1, 3, 2**31, 2**32]),
                       "neg": -rng.choice([1, 2**31]), "huge": 10**30, "float": 0.5,
                       "string": rng.choice(NASTY_STRINGS[:8]), "list": [], "dict": {},
                       "short": (parent[key][:-1] if isinstance(parent[key], (list, str)) else 7)}[op]
    return f"manifest.{op}", m


def run_manifest_case(art: Path, mutated: dict, tmp: Path, reseal: bool) -> tuple[str, str]:
    from compiler.errors import KilnError
    case = tmp / "art"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(art, case)
    try:
        sealed = False
        if reseal:   # through the compiler's own writer: a checksummed manifest stays "sealed", so the schema is hit
            from compiler.manifest import write_manifest
            try:
                write_manifest(case, {k: v for k, v in mutated.items() if k not in ("format", "version")})
                sealed = True
            except Exception:   # noqa: BLE001 — the writer is never given such a dict by the compiler: not a case
                pass
        if not sealed:   # edited by hand, as a careless user or an attacker would
            (case / "manifest.json").write_text(json.dumps(mutated))
        load_path(case)
    except KilnError as e:
        bad = _check_message(e)
        return ("bad-message", bad) if bad else ("refused", type(e).__name__)
    return "accepted", ""


class Cases:
    """Deterministic cases: index -> (kind, runner arguments). Bases are built once per process."""
    KINDS = ("llama-f32", "llama-q8", "llama-q4", "gemma3")

    def __init__(self, seed: int, tmp: Path):
        self.seed, self.tmp = seed, tmp
        rng = np.random.default_rng(seed)
        self.specs = {k: base_spec(k, rng) for k in self.KINDS}
        self.bases = {k: write_spec(s, tmp / f"base-{k}.gguf").read_bytes() for k, s in self.specs.items()}
        self._art = None

    def artifact(self) -> Path:
        if self._art is None:
            from compiler.pipeline import compile_model
            self._art = compile_model(self.tmp / "base-llama-f32.gguf", self.tmp / "base-art")
        return self._art

    def run(self, index: int, manifest_share: float) -> tuple[str, str, str]:
        rng = random.Random(f"{self.seed}/{index}")
        work = self.tmp / f"case-{os.getpid()}"
        work.mkdir(exist_ok=True)
        try:
            what = "?"
            if rng.random() < manifest_share:
                art = self.artifact()
                what, m = mutate_manifest(_strict_json(art / "manifest.json"), rng)
                reseal = rng.random() < 0.7
                return (what + ".sealed" * reseal, *run_manifest_case(art, m, work, reseal))
            base = rng.choice(self.KINDS)
            if rng.random() < 0.5:
                what, data = mutate_bytes(self.bases[base], rng)
            else:
                what, spec = mutate_spec(self.specs[base], rng)
                try:
                    data = write_spec(spec, work / "spec.gguf").read_bytes()
                except Exception:   # noqa: BLE001 — gguf.GGUFWriter refused the mutation itself: not a case
                    what, data = mutate_bytes(self.bases[base], rng)
            what = f"{base}:{what}"
            return (what, *run_gguf_case(base, data, work))
        except Exception as e:   # noqa: BLE001 — the finding
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return (what, "traceback", f"{type(e).__name__}: {str(e)[:160]!r} at {Path(tb.filename).name}:{tb.lineno}")


def _worker(conn, seed: int, tmp: str, manifest_share: float):
    logging.getLogger("gguf").setLevel(logging.ERROR)   # GGUFWriter warns about the duplicate keys it is given
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    cases = Cases(seed, Path(tmp))
    conn.send("ready")
    while True:
        index = conn.recv()
        if index is None:
            return
        try:
            result = cases.run(index, manifest_share)
        except MemoryError:
            result = ("?", "crash", "MemoryError")
        conn.send(result)


def fuzz(n_cases: int, seed: int = 0, *, manifest_share: float = 0.25, only: int | None = None,
         log=print, case_seconds: float = CASE_SECONDS, start_method: str = "spawn") -> dict:
    """Runs the cases in one worker process (restarted after a hang or a crash). Returns {"counts", "bad"}.
    start_method "fork" lets a test's monkeypatching reach the worker."""
    # spawn, not fork: a forked child inherits the parent's memory maps, and inside a full test run (lavapipe devices,
    # loaded models) that left mmap in the child failing with ENOMEM (vm.max_map_count) -- a test artefact, not a bug
    ctx = mp.get_context(start_method)
    counts, by_what, bad = Counter(), Counter(), []
    tmp = tempfile.mkdtemp(prefix="kiln-fuzz-")
    proc = conn = None

    def start():
        nonlocal proc, conn
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, seed, tmp, manifest_share), daemon=True)
        proc.start()
        for _ in range(600):
            if conn.poll(0.5):
                if conn.recv() == "ready":
                    return
                break
            if not proc.is_alive():
                break
        raise RuntimeError(f"fuzz worker did not start (exit {proc.exitcode})")

    t0 = time.time()
    indices = [only] if only is not None else range(n_cases)
    try:
        start()
        for n, i in enumerate(indices):
            conn.send(i)
            if conn.poll(case_seconds):
                try:
                    what, outcome, detail = conn.recv()
                except EOFError:
                    what, outcome, detail = "?", "crash", f"worker died (exit {proc.join(5) or proc.exitcode})"
                    start()
            else:
                what, outcome, detail = "?", "hang", f"no answer in {case_seconds} s"
                proc.kill()
                proc.join()
                start()
            if not proc.is_alive():
                what, outcome, detail = what, "crash", f"worker died (exit {proc.exitcode})"
                start()
            counts[outcome if outcome != "refused" else f"refused:{detail}"] += 1
            by_what[(what.split(":")[-1], outcome if outcome in CLEAN else "BAD")] += 1
            if outcome not in CLEAN:
                bad.append({"index": i, "what": what, "outcome": outcome, "detail": detail})
                if log:
                    log(f"case {i} ({what}): {outcome}: {detail}")
            if log and (n + 1) % 500 == 0:
                log(f"{n + 1}/{len(indices)} cases, {time.time() - t0:.0f} s")
    finally:
        if conn is not None and proc is not None and proc.is_alive():
            conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"counts": dict(counts), "by_mutation": {f"{w} -> {o}": c for (w, o), c in sorted(by_what.items())},
            "bad": bad, "seconds": round(time.time() - t0, 1), "cases": len(indices)}


def report(result: dict) -> str:
    c = Counter()
    for k, v in result["counts"].items():
        c[k.split(":")[0]] += v
    lines = [f"{result['cases']} cases in {result['seconds']} s (seed {result.get('seed', '?')})",
             "outcomes: " + ", ".join(f"{k} {c[k]}" for k in ("compiled", "refused", "accepted", "traceback",
                                                               "bad-message", "nan-manifest", "hang", "crash"))]
    lines.append("refused by class: " + ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in
                                                 sorted(result["counts"].items()) if k.startswith("refused:")))
    lines.append("by mutation:")
    lines += [f"  {k}: {v}" for k, v in result["by_mutation"].items()]
    for b in result["bad"][:50]:
        lines.append(f"BAD case {b['index']} ({b['what']}): {b['outcome']}: {b['detail']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--manifest-share", type=float, default=0.25, help="fraction of cases that mutate a manifest")
    ap.add_argument("--only", type=int, help="replay one case index")
    ap.add_argument("--json", help="also write the result as JSON here")
    a = ap.parse_args(argv)
    result = fuzz(a.cases, a.seed, manifest_share=a.manifest_share, only=a.only)
    result["seed"] = a.seed
    print(report(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
