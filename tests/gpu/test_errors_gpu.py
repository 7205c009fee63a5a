"""User errors that only show once a model is on the GPU: a prompt longer than the context, a context whose KV cache
exceeds the adapter's binding limit, corrupt / missing artifact files found while loading, bad --ctx and
--chat-template values. Library exception and CLI behaviour both (see tests/unit/test_errors.py for the rest)."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from compiler.errors import ArtifactError, ContextOverflowError, ModelTooLargeError
from tests.unit.test_errors import assert_cli_error, compile_tiny, copy_artifact, flip_byte, kiln

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 12      # ~120 tokens


# -- context ----------------------------------------------------------------------------------------------------
def test_prompt_longer_than_context_library(smollm2_model, smollm2_tokenizer):
    from runtime_py.generate import generate
    from runtime_py.sampling import GREEDY
    ids = smollm2_tokenizer.encode(LONG_PROMPT)
    session = smollm2_model.session(ctx=32)
    assert session.ctx == 32 and len(ids) > 32
    with pytest.raises(ContextOverflowError, match=rf"prompt is {len(ids)} tokens but the context holds 32"):
        next(generate(session, smollm2_tokenizer, ids, GREEDY))
    with pytest.raises(ContextOverflowError, match="exceeds the context of 32"):
        session.reset()
        session.forward(ids)
    assert session.pos == 0                      # refused before anything ran


def test_prompt_longer_than_context_cli(smollm2_artifact):
    p = kiln("run", smollm2_artifact, "--ctx", "32", "--prompt", LONG_PROMPT, "-n", "4")
    assert_cli_error(p, "but the context holds 32", "--ctx")


def test_generation_stops_at_the_context_end(smollm2_artifact):
    """Prompt fits but prompt + max_tokens does not: generation is cut at the context, finish_reason length."""
    p = kiln("run", smollm2_artifact, "--ctx", "8", "--json", "--temperature", "0", "-n", "50", "--prompt",
             "The capital of France is")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["prompt_ids"]) + len(out["ids"]) <= 8 and out["finish_reason"] == "length"


@pytest.mark.parametrize("ctx", ["0", "-5"])
def test_bad_ctx(smollm2_model, smollm2_artifact, ctx):
    with pytest.raises(ContextOverflowError, match="at least 1"):
        smollm2_model.session(ctx=int(ctx))
    assert_cli_error(kiln("run", smollm2_artifact, f"--ctx={ctx}", "--prompt", "hi", "-n", "1"),
                     "context length must be at least 1")


# -- adapter limits ---------------------------------------------------------------------------------------------
def test_check_fits_against_fake_limits_on_the_real_model(smollm2_model):
    """The real SmolLM2 manifest against a device whose binding limit is below its largest weight part."""
    from runtime_py.device import check_fits
    from runtime_py.model import Model, buffer_bytes
    m = smollm2_model.manifest
    largest = max(p["bytes"] for w in m["weights"].values() for p in w["parts"])
    limits = dict(smollm2_model.device.limits)
    check_fits(SimpleNamespace(limits=limits), m, buffer_bytes(m, 2048))     # fits this adapter
    small = SimpleNamespace(limits={**limits, "max-storage-buffer-binding-size": largest - 256})
    with pytest.raises(ModelTooLargeError, match=r"MiB storage buffer \(a weight part\) but the adapter allows"):
        check_fits(small, m, buffer_bytes(m, 2048))
    with pytest.raises(ModelTooLargeError):
        Model(smollm2_model.dir, device=small)


@pytest.fixture(scope="module")
def long_context_tiny(tmp_path_factory, smollm2_model):
    """A tiny model whose trained context is long enough for one layer's KV cache to exceed this adapter's binding
    limit (16 floats per position per cache)."""
    lim = smollm2_model.device.limits
    max_bind = min(lim["max-storage-buffer-binding-size"], lim["max-buffer-size"])
    ctx = max_bind // 64 + 1
    art = compile_tiny(tmp_path_factory.mktemp("longctx"), context_length=ctx)
    return SimpleNamespace(art=art, ctx=ctx, kv_mib=ctx * 64 / 2**20, limit_mib=max_bind / 2**20)


def test_kv_cache_over_the_binding_limit_library(long_context_tiny):
    from runtime_py.model import Model
    model = Model(long_context_tiny.art)
    model.session(ctx=64)                                                   # a small context is fine
    with pytest.raises(ModelTooLargeError, match=r"\(k_cache\.0\) but the adapter allows .*use a smaller --ctx"):
        model.session(ctx=long_context_tiny.ctx)


def test_kv_cache_over_the_binding_limit_cli(long_context_tiny):
    t = long_context_tiny
    p = kiln("run", t.art, "--ctx", t.ctx, "-n", "1", "--prompt", "ab")
    assert_cli_error(p, f"model needs a {t.kv_mib:.1f} MiB storage buffer (k_cache.0)",
                     f"the adapter allows {t.limit_mib:.1f} MiB", "use a smaller --ctx")
    p = kiln("run", t.art, "--ctx", "64", "-n", "1", "--temperature", "0", "--prompt", "ab")   # and runs with less
    assert p.returncode == 0, p.stderr


# -- artifact files found broken while loading ------------------------------------------------------------------
def test_corrupt_shard(tmp_path, smollm2_artifact):
    from runtime_py.model import Model
    art = copy_artifact(smollm2_artifact, tmp_path / "art")
    shard = json.loads((art / "manifest.json").read_text())["shards"][-1]
    flip_byte(art / shard["file"], shard["bytes"] // 3, 0x01)
    with pytest.raises(ArtifactError, match=rf"{shard['file']}: shard is corrupt \(size or sha256"):
        Model(art)
    assert_cli_error(kiln("run", art, "-n", "1", "--prompt", "hi"), shard["file"], "sha256", "recompile")


def test_missing_shard_and_shader(tmp_path):
    from runtime_py.model import Model
    art = compile_tiny(tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    broken = copy_artifact(art, tmp_path / "no-shard")
    (broken / m["shards"][0]["file"]).unlink()
    with pytest.raises(ArtifactError, match="shard missing"):
        Model(broken)
    assert_cli_error(kiln("run", broken, "-n", "1", "--prompt", "ab"), "shard missing", "recompile")
    broken = copy_artifact(art, tmp_path / "no-shader")
    shader = next(iter(m["kernels"].values()))["file"]
    (broken / shader).unlink()
    with pytest.raises(ArtifactError, match="shader missing"):
        Model(broken)
    assert_cli_error(kiln("run", broken, "-n", "1", "--prompt", "ab"), "shader missing")
    shutil.rmtree(broken / "shaders")
    assert_cli_error(kiln("run", broken, "-n", "1", "--prompt", "ab"), "shader missing")


def test_missing_chat_template_file(smollm2_artifact, tmp_path):
    p = kiln("run", smollm2_artifact, "--chat", "--chat-template", tmp_path / "nope.jinja", "--prompt", "hi",
             "-n", "1")
    assert_cli_error(p, "No such file", "nope.jinja")


# -- files edited after compiling (issue 9) ---------------------------------------------------------------------
@pytest.mark.parametrize("what", ["shader", "tokenizer", "manifest"])
def test_edited_artifact_file(tmp_path, what):
    """An artifact directory of the user's (not the cache: nothing is rebuilt behind their back) with one file
    edited: Model() refuses it naming the file, and `kiln run` prints one line with the command that rebuilds it."""
    from runtime_py.model import Model
    art = compile_tiny(tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    rel = {"shader": m["programs"]["decode"][-1]["kernel"].join(["shaders/", ".wgsl"]), "tokenizer": "tokenizer.json",
           "manifest": "manifest.json"}[what]
    path = art / rel
    if what == "manifest":      # a hyperparameter: the kind of edit that used to run and print other tokens
        path.write_text(path.read_text().replace('"rope_base": 10000.0', '"rope_base": 10.0'))
        fragment = "the manifest was modified after kiln wrote it"
    else:
        path.write_bytes(path.read_bytes() + b"\n// edited\n")
        fragment = f"{what} does not match the manifest's sha256"
    with pytest.raises(ArtifactError, match=fragment):
        Model(art)
    assert_cli_error(kiln("run", art, "-n", "1", "--prompt", "ab"), str(path), fragment,
                     f"kiln compile tiny.gguf -o {art}")
