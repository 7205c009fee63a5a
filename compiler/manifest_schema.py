"""The manifest's schema (compiler/manifest.py reads and writes the file): `validate` checks all of this.

manifest.json (format "kiln", version MANIFEST_VERSION), pure ASCII, written by `write_manifest` only (atomically:
a temp file in the same directory, then a rename), read by `read_manifest` only, which checks all of this:
  format "kiln", version MANIFEST_VERSION
  manifest_sha256  sha256 of the file's bytes with this value replaced by 64 "0"s: an edit made after kiln wrote the
                   file is refused (natively here, in the browser by web/loader.js `fetchManifest`, same rule)
  model       {name: str, arch: str, source: {file, bytes, sha256 of the GGUF}, requant: null | scheme (`--quant`)}
  compiler_version  str (compiler/pipeline.py COMPILER_VERSION)
  config      ModelConfig fields (compiler/config.py); context_length and vocab ints >= 1
  tokenizer   {file: "tokenizer.json", sha256, bos_id, eos_id: int | null, add_bos: bool, eog_ids: [int], ...};
  chat_template: str | null
  limits      {prefill_chunk: T (multiple of PREFILL_TILE), score_chunk: tokens per `score` pass,
               storage_buffers_per_stage, max_part_bytes[, rows: rows per `rows` forward <= T, kv_page: positions per KV page]}  all ints >= 1
  features    [WebGPU feature names] the kernels need (union of Kernel.features; [] = core WebGPU only)
  buffers     {name: {shape: [int >= 1 | "T" | "ctx", ...], dtype: "f32" | "u32", programs: [program names][,
              texture: "rgba32float"]}}
              activations and KV; has tokens, logits. `programs` = the programs that bind it: a runtime allocates a
              buffer when it first runs one of them (`logits_all` is ["score"]: only sessions that score pay for it);
              `texture`: a texture of that format instead (the @cpu programs' K/V k_tex.L / v_tex.L, shaped as
              compiler/kernels_cpu.py kv_texture_shape; bound "kv_texture" to read, "write_texture" to write)
  weights     {name: {quant, shape: [rows, K], parts: [{row0, rows, shard, offset, bytes}]}}  each part inside its shard
  weight_bytes_by_quant {quant: packed bytes}                                         summary of `weights`
  shards      [{file: "shard-NNN.bin", bytes, sha256}]                                 see compiler/shards.py
  kernels     {name: {file: "shaders/<name>.wgsl", sha256, params: [[name, "u32"|"f32"]], bindings: [[name, access]]}}
  programs    {prefill, decode[, score, sample, rows, <name>@cpu]: [step]}  steps as compiler/ir.py `Step.json`; every step's kernel, buffer refs, params
              (count and type) and dispatch sizes (1..MAX_WORKGROUPS, or "T" / "T/n" / "T>n" / "T<=n") resolve against the above
  dispatches  {program: steps per forward}: one dispatch per step (a "T>n" step dispatches nothing when T <= n), so
              for decode what a token costs in dispatches (`kiln inspect`, `kiln bench`); optional (before compiler 5)
  program_variants optional {"<program>@<variant>": {adapter: class that runs it, activations: "f32" | "int8",
              wgsl_language_features: [names its kernels need]}}  (compiler/schedule_i8.py program_variants); a
              runtime picks an "int8" variant only when asked (--activations int8) and the features are there
  selftest    optional {text, prompt_ids, top5: [[id, logit]], tolerance, device[, int8_top5]}: written by `kiln
              compile` after a native run, before the artifact is moved into place (runtime_py/artifacts.py);
              int8_top5: the same prompt through the int8-activation variants, where this machine runs them
Every file of an artifact (shards, shaders, tokenizer.json) carries a sha256 next to its name; the runtimes check it
when they read the file (`check_file` here; web/loader.js `fetchVerified`). Numbers are finite (no NaN / Infinity: JSON
has none and the browser's parser refuses them). File names are relative paths inside the artifact directory.
Any violation is an ArtifactError naming the file and the field, never a traceback later.
"""
from __future__ import annotations

import re

from .errors import ArtifactError
from .ir import MAX_WORKGROUPS
from .schedule import PREFILL_TILE

_SHA_RE = re.compile(r"[0-9a-f]{64}")
U32_MAX = 2**32 - 1


class _Check:
    """Type / range checks that raise ArtifactError("<file>: invalid manifest: <field path> ...; <hint>")."""

    def __init__(self, path, hint: str):
        self.path, self.hint = path, hint

    def fail(self, where: str, msg: str):
        raise ArtifactError(f"{self.path}: invalid manifest: {where} {msg}; {self.hint}")

    def obj(self, v, where: str, keys=()) -> dict:
        if not isinstance(v, dict):
            self.fail(where, f"must be an object, not {_kind(v)}")
        for k in keys:
            if k not in v:
                self.fail(f"{where}.{k}", "is missing")
        return v

    def list(self, v, where: str, n: int | None = None, min_len: int = 0) -> list:
        if not isinstance(v, list):
            self.fail(where, f"must be a list, not {_kind(v)}")
        if n is not None and len(v) != n:
            self.fail(where, f"must have {n} entries, not {len(v)}")
        if len(v) < min_len:
            self.fail(where, "must not be empty" if min_len == 1 else f"needs at least {min_len} entries")
        return v

    def int(self, v, where: str, lo: int = 0, hi: int | None = None, null: bool = False):
        if v is None and null:
            return v
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(where, f"must be an integer, not {_kind(v)}")
        if v < lo or (hi is not None and v > hi):
            self.fail(where, f"= {v} is out of range ({lo}..{'' if hi is None else hi})")
        return v

    def num(self, v, where: str, lo: float | None = None) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            self.fail(where, f"must be a number, not {_kind(v)}")
        if lo is not None and v < lo:
            self.fail(where, f"= {v} is below {lo}")
        return v

    def str(self, v, where: str, null: bool = False, choices=None):
        if v is None and null:
            return v
        if not isinstance(v, str):
            self.fail(where, f"must be a string, not {_kind(v)}")
        if choices is not None and v not in choices:
            self.fail(where, f"= {v[:40]!r} is not one of {', '.join(choices)}")
        return v

    def sha(self, v, where: str):
        if not isinstance(v, str) or not _SHA_RE.fullmatch(v):
            self.fail(where, "must be a sha256 (64 lowercase hex digits)")

    def file(self, v, where: str, prefix: str = ""):
        self.str(v, where)
        parts = v.split("/")
        if (not v.startswith(prefix) or v.startswith("/") or "\\" in v or "\0" in v
                or any(p in ("", ".", "..") for p in parts)):
            self.fail(where, f"= {v[:80]!r} is not a file name inside the artifact" +
                      (f" (must start with {prefix!r})" if prefix else ""))

    def bool(self, v, where: str):
        if not isinstance(v, bool):
            self.fail(where, f"must be true or false, not {_kind(v)}")


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def validate(m: dict, path="manifest.json", hint: str = "recompile the model") -> None:
    """Checks the whole manifest against the schema in this module's docstring."""
    c = _Check(path, hint)
    c.obj(m, "manifest", ("model", "compiler_version", "config", "tokenizer", "chat_template", "limits", "buffers",
                          "weights", "weight_bytes_by_quant", "shards", "kernels", "programs"))
    model = c.obj(m["model"], "model", ("name", "arch", "source", "requant"))
    c.str(model["name"], "model.name")
    c.str(model["arch"], "model.arch")
    c.str(model["requant"], "model.requant", null=True)
    src = c.obj(model["source"], "model.source", ("file", "bytes", "sha256"))
    c.str(src["file"], "model.source.file")
    c.int(src["bytes"], "model.source.bytes")
    c.sha(src["sha256"], "model.source.sha256")
    c.str(m["compiler_version"], "compiler_version")

    cfg = c.obj(m["config"], "config", ("context_length", "vocab"))
    c.int(cfg["context_length"], "config.context_length", 1)
    vocab = c.int(cfg["vocab"], "config.vocab", 1)

    tok = c.obj(m["tokenizer"], "tokenizer", ("file", "sha256", "bos_id", "eos_id", "add_bos", "eog_ids"))
    c.file(tok["file"], "tokenizer.file")
    c.sha(tok["sha256"], "tokenizer.sha256")
    c.int(tok["bos_id"], "tokenizer.bos_id", null=True)
    c.int(tok["eos_id"], "tokenizer.eos_id", null=True)
    c.bool(tok["add_bos"], "tokenizer.add_bos")
    for i, t in enumerate(c.list(tok["eog_ids"], "tokenizer.eog_ids")):
        c.int(t, f"tokenizer.eog_ids[{i}]")
    c.str(m["chat_template"], "chat_template", null=True)

    lim = c.obj(m["limits"], "limits", ("prefill_chunk", "score_chunk", "storage_buffers_per_stage", "max_part_bytes"))
    chunk = c.int(lim["prefill_chunk"], "limits.prefill_chunk", PREFILL_TILE)
    if chunk % PREFILL_TILE:
        c.fail("limits.prefill_chunk", f"= {chunk} is not a multiple of {PREFILL_TILE}")
    score = c.int(lim["score_chunk"], "limits.score_chunk", 1)
    if "rows" in lim:   # the `rows` program's batch (compiler/schedule_rows.py); older artifacts have none
        c.int(lim["rows"], "limits.rows", 1, chunk)
    if "kv_page" in lim:   # positions per KV page of the rows program (compiler/kernels_rows.py KV_PAGE)
        c.int(lim["kv_page"], "limits.kv_page", 1)
    c.int(lim["storage_buffers_per_stage"], "limits.storage_buffers_per_stage", 1)
    c.int(lim["max_part_bytes"], "limits.max_part_bytes", 1)

    buffers = c.obj(m["buffers"], "buffers", ("tokens", "logits"))
    for name, b in buffers.items():
        c.obj(b, f"buffers.{name}", ("shape", "dtype"))
        c.str(b["dtype"], f"buffers.{name}.dtype", choices=("f32", "u32"))
        if "texture" in b:
            c.str(b["texture"], f"buffers.{name}.texture", choices=("rgba32float",))
        for i, d in enumerate(c.list(b["shape"], f"buffers.{name}.shape", min_len=1)):
            if d not in ("T", "ctx"):
                c.int(d, f"buffers.{name}.shape[{i}]", 1)
    for i, f in enumerate(c.list(m.get("features", []), "features")):
        c.str(f, f"features[{i}]")

    shards = c.list(m["shards"], "shards", min_len=1)
    for i, s in enumerate(shards):
        c.obj(s, f"shards[{i}]", ("file", "bytes", "sha256"))
        c.file(s["file"], f"shards[{i}].file")
        c.int(s["bytes"], f"shards[{i}].bytes")
        c.sha(s["sha256"], f"shards[{i}].sha256")

    weights = c.obj(m["weights"], "weights")
    for name, w in weights.items():
        where = f"weights[{name[:60]!r}]"
        c.obj(w, where, ("quant", "shape", "parts"))
        c.str(w["quant"], f"{where}.quant")
        for i, d in enumerate(c.list(w["shape"], f"{where}.shape", n=2)):
            c.int(d, f"{where}.shape[{i}]", 1)
        for i, p in enumerate(c.list(w["parts"], f"{where}.parts", min_len=1)):
            pw = f"{where}.parts[{i}]"
            c.obj(p, pw, ("row0", "rows", "shard", "offset", "bytes"))
            c.int(p["row0"], f"{pw}.row0")
            c.int(p["rows"], f"{pw}.rows", 1)
            si = c.int(p["shard"], f"{pw}.shard", 0, len(shards) - 1)
            off = c.int(p["offset"], f"{pw}.offset")
            n = c.int(p["bytes"], f"{pw}.bytes", 4, lim["max_part_bytes"])
            if off % 4 or n % 4:
                c.fail(pw, f"offset {off} / bytes {n} are not multiples of 4")
            if off + n > shards[si]["bytes"]:
                c.fail(pw, f"bytes {off}..{off + n} lie outside {shards[si]['file']} ({shards[si]['bytes']} bytes)")
    for q, n in c.obj(m["weight_bytes_by_quant"], "weight_bytes_by_quant").items():
        c.int(n, f"weight_bytes_by_quant.{q[:20]}")

    kernels = c.obj(m["kernels"], "kernels")
    if not kernels:
        c.fail("kernels", "must not be empty")
    for name, k in kernels.items():
        where = f"kernels[{name[:60]!r}]"
        c.obj(k, where, ("file", "sha256", "params", "bindings"))
        c.file(k["file"], f"{where}.file", prefix="shaders/")
        c.sha(k["sha256"], f"{where}.sha256")
        for i, p in enumerate(c.list(k["params"], f"{where}.params")):
            c.list(p, f"{where}.params[{i}]", n=2)
            c.str(p[0], f"{where}.params[{i}][0]")
            c.str(p[1], f"{where}.params[{i}][1]", choices=("u32", "f32"))
        for i, b in enumerate(c.list(k["bindings"], f"{where}.bindings")):
            c.list(b, f"{where}.bindings[{i}]", n=2)
            c.str(b[0], f"{where}.bindings[{i}][0]")
            c.str(b[1], f"{where}.bindings[{i}][1]", choices=("read", "read_write", "uniform", "texture",
                                                                           "kv_texture", "write_texture"))

    programs = c.obj(m["programs"], "programs", ("prefill", "decode"))
    for name, b in buffers.items():
        for i, p in enumerate(c.list(b.get("programs", []), f"buffers.{name}.programs")):
            c.str(p, f"buffers.{name}.programs[{i}]", choices=tuple(programs))
    for prog, steps in programs.items():
        for i, s in enumerate(c.list(steps, f"programs.{prog[:20]}", min_len=1)):
            _check_step(c, s, f"programs.{prog[:20]}[{i}]", kernels, buffers, weights)
    for name, v in c.obj(m.get("program_variants", {}), "program_variants").items():
        where = f"program_variants[{name[:40]!r}]"
        if name not in programs:
            c.fail(where, "is not in programs")
        c.obj(v, where, ("adapter", "activations", "wgsl_language_features"))
        c.str(v["adapter"], f"{where}.adapter")
        c.str(v["activations"], f"{where}.activations", choices=("f32", "int8"))
        for i, f in enumerate(c.list(v["wgsl_language_features"], f"{where}.wgsl_language_features")):
            c.str(f, f"{where}.wgsl_language_features[{i}]")
    if score > chunk:
        c.fail("limits.score_chunk", f"= {score} exceeds limits.prefill_chunk = {chunk}")
    if "dispatches" in m:
        for prog, n in c.obj(m["dispatches"], "dispatches").items():
            c.str(prog, "dispatches", choices=tuple(programs))
            if c.int(n, f"dispatches.{prog[:20]}") != len(programs[prog]):
                c.fail(f"dispatches.{prog[:20]}", f"= {n}, but the program has {len(programs[prog])} steps")

    if "selftest" in m:
        st = c.obj(m["selftest"], "selftest", ("prompt_ids", "top5", "tolerance"))
        for i, t in enumerate(c.list(st["prompt_ids"], "selftest.prompt_ids", min_len=1)):
            c.int(t, f"selftest.prompt_ids[{i}]", 0, vocab - 1)
        for i, e in enumerate(c.list(st["top5"], "selftest.top5", min_len=1)):
            c.list(e, f"selftest.top5[{i}]", n=2)
            c.int(e[0], f"selftest.top5[{i}][0]", 0, vocab - 1)
            c.num(e[1], f"selftest.top5[{i}][1]")
        c.num(st["tolerance"], "selftest.tolerance", 0)
        for i, e in enumerate(c.list(st.get("int8_top5", []), "selftest.int8_top5")):   # the int8 variants' own
            c.list(e, f"selftest.int8_top5[{i}]", n=2)
            c.int(e[0], f"selftest.int8_top5[{i}][0]", 0, vocab - 1)
            c.num(e[1], f"selftest.int8_top5[{i}][1]")


def _check_step(c: _Check, s, where: str, kernels: dict, buffers: dict, weights: dict):
    c.obj(s, where, ("kernel", "bind", "params", "dispatch"))
    name = c.str(s["kernel"], f"{where}.kernel")
    if name not in kernels:
        c.fail(f"{where}.kernel", f"= {name[:60]!r} is not in kernels")
    k = kernels[name]
    for i, ref in enumerate(c.list(s["bind"], f"{where}.bind", n=len(k["bindings"]))):
        c.str(ref, f"{where}.bind[{i}]")
        tensor, _, part = ref.rpartition("#")
        name, _, off = ref.partition("+")   # a buffer at a byte offset (compiler/ir.py split_ref)
        ok = (name in buffers and (not off or (off.isdigit() and int(off) % 256 == 0))) or (tensor in weights and part.isdigit() and int(part) < len(weights[tensor]["parts"]))
        if not ok:
            c.fail(f"{where}.bind[{i}]", f"= {ref[:60]!r} is neither a buffer nor a weight part")
    for i, (v, (_, t)) in enumerate(zip(c.list(s["params"], f"{where}.params", n=len(k["params"])), k["params"])):
        if t == "u32":
            c.int(v, f"{where}.params[{i}]", 0, U32_MAX)
        else:
            c.num(v, f"{where}.params[{i}]")
    for i, d in enumerate(c.list(s["dispatch"], f"{where}.dispatch", n=3)):
        if isinstance(d, str):
            if not re.fullmatch(r"T(/[1-9][0-9]{0,5}|>[0-9]{1,6}|<=[0-9]{1,6})?", d):
                c.fail(f"{where}.dispatch[{i}]", f"= {d[:20]!r} is not an integer, \"T\", \"T/n\", \"T>n\" or \"T<=n\"")
        else:
            c.int(d, f"{where}.dispatch[{i}]", 1, MAX_WORKGROUPS)
