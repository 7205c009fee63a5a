"""Every bad input a user can cause ends in one clear line, exit status 1 and no traceback — checked twice: the library
raises the right KilnError subclass with a useful message, and the `kiln` CLI (a subprocess) prints exactly one
`kiln: error: ...` line on stderr and exits 1.

No GPU needed here: GGUF files (missing, not GGUF, truncated at many points, corrupt metadata, unsupported
architecture / tensor type), artifacts (manifest missing / wrong version, shard hash check), sampling flags, adapter
limits (a fake device), no adapter at all (drivers hidden from a subprocess), and interrupted compiles.
tests/gpu/test_errors_gpu.py covers the cases that need a model on the GPU. Helpers here are shared with it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from compiler.errors import ArtifactError, ContextOverflowError, GGUFError, KilnError, ModelTooLargeError, \
    UnsupportedModelError
from tests.models import smollm2_gguf_path

ROOT = Path(__file__).resolve().parents[2]
Q = gguf.GGMLQuantizationType
CLI_TIMEOUT = 300          # s; a hang is a failure, not a stuck test run


# -- helpers (also used by tests/gpu/test_errors_gpu.py) --------------------------------------------------------
def kiln_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "kiln"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime_py.cli"]


def kiln(*args, env: dict | None = None, timeout: float = CLI_TIMEOUT, input: str | None = None):
    """Run the `kiln` CLI; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp"), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(kiln_cmd() + [str(a) for a in args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, input=input, cwd=ROOT)


def assert_cli_error(p, *fragments: str, first_line: bool = True) -> str:
    """Exit status 1, no traceback, one `kiln: error:` line (the last line of stderr; the first one too unless the
    command legitimately logged progress before failing). Returns the message."""
    out = f"rc={p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-4000:]}"
    assert p.returncode == 1, out
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, out
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("kiln: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out
    if first_line:
        assert p.stderr.startswith("kiln: error:"), out
    for f in fragments:
        assert f in errors[0], f"{f!r} not in {errors[0]!r}"
    return errors[0]


TINY_TOKENS = ["<|endoftext|>"] + [chr(c) for c in range(ord("a"), ord("a") + 14)] + ["ab"]


def write_tiny_gguf(path: Path, *, arch: str = "llama", q_type: Q | None = None, n_embd: int = 32,
                    context_length: int = 64) -> Path:
    """A 1-layer llama-shaped GGUF (f32 weights, 16-token byte-level BPE vocabulary) written with gguf.GGUFWriter.
    q_type: give blk.0.attn_q.weight that ggml type instead (zero bytes of the right size)."""
    D, F, H, KV, HD = n_embd, 64, 2, 1, 16
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(context_length)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3] + [1] * (len(TINY_TOKENS) - 1))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    tensors = {"token_embd.weight": f(len(TINY_TOKENS), D), "output_norm.weight": ones(D),
               "blk.0.attn_norm.weight": ones(D), "blk.0.attn_q.weight": f(H * HD, D),
               "blk.0.attn_k.weight": f(KV * HD, D), "blk.0.attn_v.weight": f(KV * HD, D),
               "blk.0.attn_output.weight": f(D, H * HD), "blk.0.ffn_norm.weight": ones(D),
               "blk.0.ffn_gate.weight": f(F, D), "blk.0.ffn_up.weight": f(F, D), "blk.0.ffn_down.weight": f(D, F)}
    for name, a in tensors.items():
        if q_type is not None and name == "blk.0.attn_q.weight":
            block, block_bytes = gguf.GGML_QUANT_SIZES[q_type]
            w.add_tensor(name, np.zeros((a.shape[0], a.shape[1] // block * block_bytes), np.uint8), raw_dtype=q_type)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def compile_tiny(tmp: Path, name: str = "tiny", **kw) -> Path:
    """A compiled artifact of the tiny GGUF (no self-test: no GPU needed)."""
    from compiler.pipeline import compile_model
    return compile_model(write_tiny_gguf(tmp / f"{name}.gguf", **kw), tmp / name)


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset: int, mask: int = 0xFF):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def load_config(path):
    """What `kiln inspect` and the compiler's first two stages do with a file."""
    from compiler.config import read_config
    from compiler.gguf_file import GGUFModel
    return read_config(GGUFModel(path))


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    return compile_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def real() -> SimpleNamespace:
    """The SmolLM2 GGUF, its bytes and where its sections start."""
    path = smollm2_gguf_path()
    r = gguf.GGUFReader(path)
    f = r.fields
    return SimpleNamespace(path=path, data=path.read_bytes(), data_offset=int(r.data_offset),
                           tensor_info=int(r.tensors[0].field.offset), fields=f,
                           key_offset=lambda k: int(f[k].offset),
                           value_offset=lambda k: int(f[k].offset) + 8 + len(f[k].parts[1]) + 4,
                           type_offset=lambda k: int(f[k].offset) + 8 + len(f[k].parts[1]))


def write_variant(real, path: Path, *, truncate: int | None = None, flips=()) -> Path:
    data = bytearray(real.data[:truncate] if truncate is not None else real.data)
    for off, mask in flips:
        data[off] ^= mask
    path.write_bytes(data)
    return path


# -- missing files, not GGUF ------------------------------------------------------------------------------------
def test_missing_file_library(tmp_path):
    from compiler.gguf_file import GGUFModel
    from runtime_py.artifacts import resolve_gguf
    with pytest.raises(GGUFError, match="no such file"):
        GGUFModel(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="no such file.*known model names: smollm2"):
        resolve_gguf(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("cmd", ["inspect", "compile", "run"])
def test_missing_file_cli(tmp_path, cmd):
    missing = tmp_path / "nope.gguf"
    args = {"inspect": [missing], "compile": [missing, "-o", tmp_path / "out"],
            "run": [missing, "-n", "1", "--prompt", "hi"]}[cmd]
    assert_cli_error(kiln(cmd, *args), "nope.gguf", "no such file")
    assert not (tmp_path / "out").exists()


NOT_GGUF = {
    "random": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "text": b"hello, this is a text file\n" * 20,
    "empty": b"",
    "safetensors-like": b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\0" * 64,
}


@pytest.mark.parametrize("kind", list(NOT_GGUF))
def test_not_a_gguf(tmp_path, kind):
    from compiler.gguf_file import GGUFModel
    from compiler.pipeline import compile_model
    bad = tmp_path / f"{kind}.gguf"
    bad.write_bytes(NOT_GGUF[kind])
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFModel(bad)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        compile_model(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_cli_error(kiln("inspect", bad), "not a GGUF file")
    assert_cli_error(kiln("compile", bad, "-o", tmp_path / "out"), "not a GGUF file")


def test_not_a_gguf_run_cli(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("just text\n")
    # `run` logs "compiling ..." before it finds out; the error is still one final line
    assert_cli_error(kiln("run", bad, "-n", "1", "--prompt", "hi", env={"KILN_CACHE": str(tmp_path / "cache")}),
                     "not a GGUF file", first_line=False)
    p = kiln("run", bad, "--json", "-n", "1", "--prompt", "hi", env={"KILN_CACHE": str(tmp_path / "cache")})
    assert_cli_error(p, "not a GGUF file")       # --json: nothing else on stderr
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_directory_instead_of_a_model(tmp_path):
    d = tmp_path / "somedir"
    d.mkdir()
    (d / "file.txt").write_text("x")
    assert_cli_error(kiln("inspect", d), "not a file")
    assert_cli_error(kiln("run", d, "-n", "1", "--prompt", "hi"), "manifest.json", "not a compiled kiln artifact")
    from runtime_py.artifacts import ensure_artifact
    with pytest.raises(ArtifactError, match="not a compiled kiln artifact"):
        ensure_artifact(str(d))


# -- truncated GGUF ---------------------------------------------------------------------------------------------
TRUNCATIONS = {   # name -> byte count kept (callables get the layout)
    "magic-only": lambda r: 4,
    "in-header-counts": lambda r: 20,
    "in-first-key": lambda r: 30,
    "in-token-list": lambda r: r.key_offset("tokenizer.ggml.tokens") + 50_000,
    "in-merges": lambda r: r.key_offset("tokenizer.ggml.merges") + 10_000,
    "in-tensor-infos": lambda r: r.tensor_info + 10,
    "end-of-tensor-infos": lambda r: r.data_offset - 10,
    "at-data-start": lambda r: r.data_offset,
    "in-first-tensor": lambda r: r.data_offset + 1000,
    "half": lambda r: len(r.data) // 2,
    "last-byte-missing": lambda r: len(r.data) - 1,
}


@pytest.mark.parametrize("where", list(TRUNCATIONS))
def test_truncated_gguf_library(tmp_path, real, where):
    n = TRUNCATIONS[where](real)
    path = write_variant(real, tmp_path / "t.gguf", truncate=n)
    t0 = time.perf_counter()
    with pytest.raises(GGUFError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "truncated" in msg or "not a GGUF file" in msg, msg
    assert time.perf_counter() - t0 < 60      # fails, never hangs


@pytest.mark.parametrize("where", ["in-header-counts", "in-token-list", "in-tensor-infos", "in-first-tensor",
                                   "last-byte-missing"])
def test_truncated_gguf_cli(tmp_path, real, where):
    path = write_variant(real, tmp_path / "t.gguf", truncate=TRUNCATIONS[where](real))
    assert_cli_error(kiln("inspect", path), "truncated")
    assert_cli_error(kiln("compile", path, "-o", tmp_path / "out", "--no-selftest"), "truncated")
    assert not (tmp_path / "out").exists()


# -- corrupt metadata -------------------------------------------------------------------------------------------
CORRUPTIONS = {   # name -> (flips [(offset, xor mask)] from the layout, expected error, message fragment)
    "version": (lambda r: [(4, 0xFF)], GGUFError, "version"),
    "kv-count": (lambda r: [(16 + 5, 0x01)], GGUFError, "metadata entries"),
    "first-key-length": (lambda r: [(24 + 6, 0x01)], GGUFError, "metadata key #0"),
    "key-bad-utf8": (lambda r: [(r.key_offset("general.architecture") + 10, 0xFF)], GGUFError, "corrupt"),
    "arch-bad-utf8": (lambda r: [(r.value_offset("general.architecture") + 10, 0xFF)], GGUFError,
                      "general.architecture"),
    "arch-renamed": (lambda r: [(r.value_offset("general.architecture") + 8, 0x01)], UnsupportedModelError,
                     "architecture 'mlama' is not supported"),
    "value-type": (lambda r: [(r.type_offset("llama.block_count"), 0x20)], GGUFError, "unknown value type"),
    "block-count": (lambda r: [(r.value_offset("llama.block_count") + 1, 0x01)], GGUFError, "block_count"),
    "head-count": (lambda r: [(r.value_offset("llama.attention.head_count"), 0xFF)], GGUFError,
                   "corrupt metadata"),
    "kv-head-count": (lambda r: [(r.value_offset("llama.attention.head_count_kv"), 0x01)], GGUFError,
                      "KV heads"),
    "embedding-length": (lambda r: [(r.value_offset("llama.embedding_length"), 0x01)], GGUFError,
                         "token_embd.weight"),
    "ffn-length": (lambda r: [(r.value_offset("llama.feed_forward_length") + 2, 0x01)], GGUFError,
                   "but the metadata implies"),
    "array-count": (lambda r: [(r.type_offset("tokenizer.ggml.token_type") + 4 + 7, 0x10)], GGUFError,
                    "tokenizer.ggml.token_type"),
    "string-in-array-length": (lambda r: [(r.type_offset("tokenizer.ggml.merges") + 4 + 8 + 5, 0x01)], GGUFError,
                               "tokenizer.ggml.merges"),
    "token-bad-utf8": (lambda r: [(r.type_offset("tokenizer.ggml.tokens") + 4 + 8 + 200, 0xFF)], GGUFError,
                       "tokenizer.ggml.tokens"),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corrupt_metadata_library(tmp_path, real, what):
    flips, exc, fragment = CORRUPTIONS[what]
    path = write_variant(real, tmp_path / "c.gguf", flips=flips(real))
    t0 = time.perf_counter()
    with pytest.raises(exc) as e:
        load_config(path)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("what", ["array-count", "head-count", "token-bad-utf8"])
def test_corrupt_metadata_cli(tmp_path, real, what):
    flips, _, fragment = CORRUPTIONS[what]
    path = write_variant(real, tmp_path / "c.gguf", flips=flips(real))
    assert_cli_error(kiln("inspect", path), fragment)
    assert_cli_error(kiln("compile", path, "-o", tmp_path / "out", "--no-selftest"), fragment)
    assert not (tmp_path / "out").exists()


def test_intact_file_passes_the_checks(real):
    cfg = load_config(real.path)
    assert (cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == ("llama", 30, 9, 3, 64)


# -- unsupported architecture / tensor type ---------------------------------------------------------------------
def test_unsupported_architecture(tmp_path):
    from compiler.pipeline import compile_model
    path = write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(UnsupportedModelError, match=r"architecture 'mamba' is not supported \(supported: .*llama"):
        compile_model(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for args in (["inspect", path], ["compile", path, "-o", tmp_path / "out"]):
        assert_cli_error(kiln(*args), "'mamba' is not supported", "llama", "gemma3")
    assert_cli_error(kiln("run", path, "-n", "1", "--prompt", "hi", env={"KILN_CACHE": str(tmp_path / "cache")}),
                     "'mamba' is not supported", first_line=False)


@pytest.mark.parametrize("qtype, n_embd", [(Q.Q8_1, 32), (Q.IQ4_XS, 256), (Q.IQ2_XXS, 256)])
def test_unsupported_tensor_type(tmp_path, qtype, n_embd):
    from compiler.pipeline import compile_model
    from compiler.quant import QuantScheme
    path = write_tiny_gguf(tmp_path / "t.gguf", q_type=qtype, n_embd=n_embd)
    with pytest.raises(UnsupportedModelError) as e:
        compile_model(path, tmp_path / "out")
    msg = str(e.value)
    supported = sorted(s.ggml_type.name for s in QuantScheme.registry.values() if s.ggml_type is not None)
    assert f"tensor type {qtype.name} is not supported" in msg
    assert all(name in msg for name in supported) and {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "F16"} <= set(supported)
    assert not (tmp_path / "out").exists()
    assert_cli_error(kiln("compile", path, "-o", tmp_path / "out"), qtype.name, "supported: ", "Q8_0")
    assert not (tmp_path / "out" / "manifest.json").exists()
    # inspect still describes the file (it is a valid GGUF), naming the type
    p = kiln("inspect", path)
    assert p.returncode == 0 and qtype.name in p.stdout, p.stderr


def test_tiny_gguf_compiles(tiny_artifact):
    """Control for the two tests above: the same tiny file with supported types compiles."""
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["config"]["n_layer"] == 1 and m["shards"] and (tiny_artifact / m["shards"][0]["file"]).exists()


# -- sampling flags ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, fragment", [
    ("--temperature", "-1", "temperature must be >= 0"), ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-p", "1.5", "top_p"), ("--min-p", "2", "min_p must be in [0, 1]"),
    ("--repeat-penalty", "0", "repeat_penalty must be > 0"), ("--temperature", "nan", "temperature"),
])
def test_invalid_sampling_flags(tmp_path, flag, value, fragment):
    from runtime_py.sampling import Sampler, SamplingParams
    name = {"--temperature": "temperature", "--top-p": "top_p", "--min-p": "min_p",
            "--repeat-penalty": "repeat_penalty"}[flag]
    with pytest.raises(KilnError, match=name):
        Sampler(SamplingParams(**{name: float(value)}))
    # checked before the model is even looked up: a model that does not exist is never reached
    assert_cli_error(kiln("run", tmp_path / "nope.gguf", flag, value, "--prompt", "hi"), fragment)


def test_unparseable_flag_is_a_usage_error():
    p = kiln("run", "--temperature", "warm", "--prompt", "hi")
    assert p.returncode == 2 and "invalid float value" in p.stderr and "Traceback" not in p.stderr


def test_inspect_bad_ctx():
    assert_cli_error(kiln("inspect", "smollm2", "--ctx", "0"), "--ctx must be at least 1")


# -- artifacts: manifest and shards -----------------------------------------------------------------------------
def test_missing_manifest(tmp_path, tiny_artifact):
    from compiler.manifest import read_manifest
    from runtime_py.model import Model
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    (art / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(art)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Model(art)
    assert_cli_error(kiln("run", art, "-n", "1", "--prompt", "ab"), "no manifest.json", "not a compiled kiln artifact")


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: {**m, "version": 99}, "v99"), (lambda m: {**m, "format": "other"}, "'other'"),
    (lambda m: {k: v for k, v in m.items() if k != "version"}, "vNone"),
])
def test_manifest_wrong_version(tmp_path, tiny_artifact, edit, fragment):
    from runtime_py.model import Model
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    path = art / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ArtifactError, match="recompile") as e:
        Model(art)                       # refused before any device is requested
    assert fragment in str(e.value)
    assert_cli_error(kiln("run", art, "-n", "1", "--prompt", "ab"), fragment, "recompile")


def test_manifest_not_json(tmp_path, tiny_artifact):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    (art / "manifest.json").write_text('{"format": "kiln", "vers')
    assert_cli_error(kiln("run", art, "-n", "1", "--prompt", "ab"), "corrupt manifest")


def test_shard_hash_check_without_gpu(tmp_path, tiny_artifact):
    """Model._read_shard is what loading runs for every shard; a fake `self` keeps the GPU out of it."""
    from runtime_py.model import Model
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    shard = json.loads((art / "manifest.json").read_text())["shards"][0]
    me = SimpleNamespace(dir=art)
    assert len(Model._read_shard(me, shard)) == shard["bytes"]
    flip_byte(art / shard["file"], shard["bytes"] // 2, 0x01)
    with pytest.raises(ArtifactError, match="sha256"):
        Model._read_shard(me, shard)
    with open(art / shard["file"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="size or sha256"):
        Model._read_shard(me, shard)
    (art / shard["file"]).unlink()
    with pytest.raises(ArtifactError, match="shard missing"):
        Model._read_shard(me, shard)


# -- adapter limits (a fake device) -----------------------------------------------------------------------------
def fake_device(**limits):
    base = {"max-storage-buffer-binding-size": 128 << 20, "max-buffer-size": 256 << 20,
            "max-storage-buffers-per-shader-stage": 8}
    return SimpleNamespace(limits={**base, **limits})


def test_check_fits_weight_part_over_the_binding_limit(tiny_artifact):
    from runtime_py.device import check_fits
    from runtime_py.model import buffer_bytes
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    largest = max(p["bytes"] for w in m["weights"].values() for p in w["parts"])
    sizes = buffer_bytes(m, 16)
    check_fits(fake_device(), m, sizes)                                    # fits the defaults
    with pytest.raises(ModelTooLargeError, match=r"\(a weight part\) but the adapter allows") as e:
        check_fits(fake_device(**{"max-storage-buffer-binding-size": largest - 4}), m, {"tokens": 16})
    assert "MiB" in str(e.value)
    with pytest.raises(ModelTooLargeError):        # max-buffer-size counts too
        check_fits(fake_device(**{"max-buffer-size": largest - 4}), m, {"tokens": 16})


def test_check_fits_kv_buffer_over_the_binding_limit(tiny_artifact):
    from runtime_py.device import check_fits
    from runtime_py.model import buffer_bytes
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    sizes = buffer_bytes(m, 1 << 22)              # 2^22 positions x 1 KV head x 16 x 4 B = 256 MiB per layer
    assert sizes["k_cache.0"] == (1 << 22) * 16 * 4
    with pytest.raises(ModelTooLargeError, match=r"256\.0 MiB storage buffer \(k_cache\.0\).*allows 128\.0 MiB; "
                                                 r"use a smaller --ctx"):
        check_fits(fake_device(), m, sizes)


def test_check_fits_storage_buffers_per_stage(tiny_artifact):
    from runtime_py.device import check_fits
    from runtime_py.model import buffer_bytes
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    with pytest.raises(ModelTooLargeError, match="storage buffers per stage"):
        check_fits(fake_device(**{"max-storage-buffers-per-shader-stage": 2}), m, buffer_bytes(m, 16))


def test_model_refuses_before_allocating(tiny_artifact):
    """Model() checks the limits of the device it is given before creating a single pipeline or buffer."""
    from runtime_py.model import Model

    class NoAlloc(SimpleNamespace):
        def __getattr__(self, name):
            raise AssertionError(f"device.{name} used before the limit check")
    with pytest.raises(ModelTooLargeError):
        Model(tiny_artifact, device=NoAlloc(limits=fake_device(**{"max-storage-buffer-binding-size": 64}).limits))


# -- no WebGPU adapter ------------------------------------------------------------------------------------------
# Hiding the Vulkan ICDs alone is not enough: wgpu then falls back to OpenGL through EGL (llvmpipe here), and runs.
# Hiding the EGL vendor files too leaves no adapter at all.
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="hides Linux Vulkan ICDs / EGL vendors")
NO_DRIVERS = {"VK_ICD_FILENAMES": "/nonexistent/icd.json", "VK_DRIVER_FILES": "/nonexistent/icd.json",
              "VK_ADD_DRIVER_FILES": None, "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent/egl.json",
              "__EGL_VENDOR_LIBRARY_DIRS": "/nonexistent", "WGPU_BACKEND_TYPE": None}


@linux_only
def test_no_adapter_library():
    code = ("from runtime_py.device import get_device, NoAdapterError\n"
            "try:\n    get_device()\n    print('ADAPTER FOUND')\n"
            "except NoAdapterError as e:\n    print('NoAdapterError:', e)\n")
    env = {k: v for k, v in {**os.environ, **NO_DRIVERS}.items() if v is not None}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=CLI_TIMEOUT)
    assert p.stdout.startswith("NoAdapterError: no WebGPU adapter found"), (p.stdout, p.stderr)
    assert "mesa-vulkan-drivers" in p.stdout and "vulkan drivers/libraries could not be loaded" in p.stdout


@linux_only
def test_no_adapter_cli(tiny_artifact):
    p = kiln("run", tiny_artifact, "-n", "1", "--prompt", "ab", env=NO_DRIVERS)
    assert_cli_error(p, "no WebGPU adapter found", "install a Vulkan driver",
                     "apt-get install -y mesa-vulkan-drivers libvulkan1")


@linux_only
def test_no_adapter_cli_forced_vulkan_backend(tiny_artifact):
    # WGPU_BACKEND_TYPE=Vulkan skips the GL fallback; wgpu-py logs "Forcing backend" first, the error is last
    p = kiln("run", tiny_artifact, "-n", "1", "--prompt", "ab",
             env={"VK_ICD_FILENAMES": "/nonexistent/icd.json", "VK_DRIVER_FILES": "/nonexistent/icd.json",
                  "VK_ADD_DRIVER_FILES": None, "WGPU_BACKEND_TYPE": "Vulkan"})
    assert_cli_error(p, "no WebGPU adapter found", "mesa-vulkan-drivers", first_line=False)


# -- compile output safety / interrupted compiles ---------------------------------------------------------------
def test_compile_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path):
    gg = write_tiny_gguf(tmp_path / "tiny.gguf")
    d = tmp_path / "precious"
    d.mkdir()
    (d / "thesis.txt").write_text("years of work")
    assert_cli_error(kiln("compile", gg, "-o", d, "--no-selftest"), "not a kiln artifact directory")
    assert (d / "thesis.txt").read_text() == "years of work"
    f = tmp_path / "afile"
    f.write_text("x")
    assert_cli_error(kiln("compile", gg, "-o", f, "--no-selftest"), "not a kiln artifact directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    p = kiln("compile", gg, "-o", empty, "--no-selftest")          # an empty directory is fine
    assert p.returncode == 0 and (empty / "manifest.json").exists(), p.stderr
    p = kiln("compile", gg, "-o", empty, "--no-selftest")          # and so is recompiling over an artifact
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_exception_in_shard_stage_leaves_no_manifest(tmp_path, monkeypatch, exc):
    from compiler.pipeline import compile_model
    from compiler.shards import ShardWriter
    gg = write_tiny_gguf(tmp_path / "tiny.gguf")
    calls = {"n": 0}
    real_add = ShardWriter.add

    def failing_add(self, words):
        calls["n"] += 1
        if calls["n"] == 4:
            raise exc
        return real_add(self, words)
    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(type(exc)):
        compile_model(gg, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "manifest.json").exists()

    # an artifact already at the target stays whole: the new one was being built beside it
    monkeypatch.setattr(ShardWriter, "add", real_add)
    old = compile_model(gg, tmp_path / "existing")
    before = (old / "manifest.json").read_text()
    calls["n"] = 0
    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(type(exc)):
        compile_model(gg, old)
    assert (old / "manifest.json").read_text() == before
    from runtime_py.model import Model
    m = json.loads(before)
    for shard in m["shards"]:
        Model._read_shard(SimpleNamespace(dir=old), shard)        # every shard still matches its hash


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_compile_leaves_no_artifact(tmp_path, sig):
    """Kill `kiln compile` while it writes shards: the target never gets a manifest.json."""
    out = tmp_path / "smol"
    env = {**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")}
    proc = subprocess.Popen(kiln_cmd() + ["compile", "smollm2", "-o", str(out), "--no-selftest"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CLI_TIMEOUT
    try:   # each compile stages in its own .<name>.kiln-tmp-<pid>-<random> directory (compiler/output.py)
        while not list(tmp_path.glob(".smol.kiln-tmp-*/shard-000.bin")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "compile finished before it could be interrupted"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "manifest.json").exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "kiln: interrupted" in stderr and "Traceback" not in stderr, stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    # what the user tries next gets a clear error, not a half-loaded model
    p = kiln("run", out, "-n", "1", "--prompt", "hi")
    assert_cli_error(p)
    if sig == signal.SIGINT:    # cleaned up on the way out
        assert not list(tmp_path.glob(".smol.kiln-tmp-*"))
    else:                       # a dead compile's staging directory goes with the next compile beside it
        assert list(tmp_path.glob(".smol.kiln-tmp-*"))
        from compiler.output import remove_artifact, staging_dir
        assert remove_artifact(staging_dir(out))
        assert not list(tmp_path.glob(".smol.kiln-tmp-*"))


def test_context_overflow_library_without_gpu():
    from runtime_py.generate import generate
    from runtime_py.sampling import GREEDY
    session = SimpleNamespace(ctx=32)
    with pytest.raises(ContextOverflowError, match="prompt is 40 tokens but the context holds 32.*--ctx"):
        next(generate(session, None, list(range(40)), GREEDY))
