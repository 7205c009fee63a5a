"""Tampered and damaged manifests: every mutation is one clean ArtifactError that names the file and the field, never a
traceback later (issue 9: 33 tampered manifests used to end in tracebacks). The schema is compiler/manifest_schema.py's.

Two kinds of edits: `SCHEMA` mutations are re-sealed (manifest_sha256 recomputed, as a buggy compiler or a careful
attacker would), so the schema check is what must catch them; `RAW` edits change the file's bytes, so the checksum
(or the JSON parser) must.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from compiler.errors import ArtifactError, KilnError
from compiler.manifest import MANIFEST_FILE, manifest_bytes, read_manifest, write_manifest
from tests.unit.test_errors import assert_cli_error, compile_tiny, copy_artifact, kiln


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return compile_tiny(tmp_path_factory.mktemp("manifest"))


def _weight(m):
    return next(iter(m["weights"].values()))


def _step(m, prog="decode", i=0):
    return m["programs"][prog][i]


def _f32_param(m):
    """(step, index) of the first f32 uniform in the decode program."""
    for s in m["programs"]["decode"]:
        for i, (_, t) in enumerate(m["kernels"][s["kernel"]]["params"]):
            if t == "f32":
                return s, i
    raise AssertionError("no f32 param")


def _set(obj, key, value):
    obj[key] = value


def _kernel(m):
    return m["kernels"][_step(m)["kernel"]]


# (id, mutation of the parsed manifest, fragment of the message)
SCHEMA = [
    ("no-model", lambda m: m.pop("model"), "model is missing"),
    ("model-list", lambda m: _set(m, "model", []), "model must be an object, not a list"),
    ("source-sha", lambda m: _set(m["model"]["source"], "sha256", "xyz"), "model.source.sha256 must be a sha256"),
    ("requant-int", lambda m: _set(m["model"], "requant", 4), "model.requant must be a string"),
    ("vocab-0", lambda m: _set(m["config"], "vocab", 0), "config.vocab = 0 is out of range"),
    ("ctx-str", lambda m: _set(m["config"], "context_length", "2048"), "config.context_length must be an integer"),
    ("ctx-bool", lambda m: _set(m["config"], "context_length", True), "config.context_length must be an integer"),
    ("config-list", lambda m: _set(m, "config", [1]), "config must be an object"),
    ("tok-no-sha", lambda m: m["tokenizer"].pop("sha256"), "tokenizer.sha256 is missing"),
    ("tok-traversal", lambda m: _set(m["tokenizer"], "file", "../../etc/passwd"), "tokenizer.file"),
    ("tok-absolute", lambda m: _set(m["tokenizer"], "file", "/etc/passwd"), "is not a file name inside"),
    ("tok-eog-str", lambda m: _set(m["tokenizer"], "eog_ids", "0"), "tokenizer.eog_ids must be a list"),
    ("tok-eog-neg", lambda m: _set(m["tokenizer"], "eog_ids", [-1]), "tokenizer.eog_ids[0] = -1"),
    ("tok-add-bos-int", lambda m: _set(m["tokenizer"], "add_bos", 1), "tokenizer.add_bos must be true or false"),
    ("tok-bos-float", lambda m: _set(m["tokenizer"], "bos_id", 0.5), "tokenizer.bos_id must be an integer"),
    ("template-int", lambda m: _set(m, "chat_template", 5), "chat_template must be a string"),
    ("chunk-0", lambda m: _set(m["limits"], "prefill_chunk", 0), "limits.prefill_chunk = 0"),
    ("chunk-7", lambda m: _set(m["limits"], "prefill_chunk", 12), "limits.prefill_chunk = 12 is not a multiple"),
    ("chunk-neg", lambda m: _set(m["limits"], "prefill_chunk", -8), "limits.prefill_chunk = -8"),
    ("score-over-chunk", lambda m: _set(m["limits"], "score_chunk", 1000), "limits.score_chunk = 1000 exceeds"),
    ("no-max-part", lambda m: m["limits"].pop("max_part_bytes"), "limits.max_part_bytes is missing"),
    ("no-tokens-buffer", lambda m: m["buffers"].pop("tokens"), "buffers.tokens is missing"),
    ("buffer-dim-0", lambda m: _set(m["buffers"]["x"], "shape", ["T", 0]), "buffers.x.shape[1] = 0"),
    ("buffer-dim-sym", lambda m: _set(m["buffers"]["x"], "shape", ["N", 32]), "buffers.x.shape[0] must be an integer"),
    ("buffer-shape-empty", lambda m: _set(m["buffers"]["x"], "shape", []), "buffers.x.shape must not be empty"),
    ("buffer-f16", lambda m: _set(m["buffers"]["x"], "dtype", "f16"), "buffers.x.dtype = 'f16' is not one of"),
    ("no-logits-all", lambda m: m["buffers"].pop("logits_all"), "'logits_all' is neither a buffer nor a weight"),
    ("shards-empty", lambda m: _set(m, "shards", []), "shards must not be empty"),
    ("shard-traversal", lambda m: _set(m["shards"][0], "file", "../shard-000.bin"), "shards[0].file"),
    ("shard-bytes-neg", lambda m: _set(m["shards"][0], "bytes", -1), "shards[0].bytes = -1"),
    ("shard-sha-null", lambda m: _set(m["shards"][0], "sha256", None), "shards[0].sha256 must be a sha256"),
    ("part-shard", lambda m: _set(_weight(m)["parts"][0], "shard", 5), ".parts[0].shard = 5 is out of range"),
    ("part-outside", lambda m: _set(_weight(m)["parts"][0], "offset", m["shards"][0]["bytes"]), "lie outside"),
    ("part-bytes-0", lambda m: _set(_weight(m)["parts"][0], "bytes", 0), ".parts[0].bytes = 0"),
    ("part-huge", lambda m: _set(_weight(m)["parts"][0], "bytes", 2 << 30), ".parts[0].bytes = 2147483648"),
    ("part-unaligned", lambda m: _set(_weight(m)["parts"][0], "offset", 2), "not multiples of 4"),
    ("parts-empty", lambda m: _set(_weight(m), "parts", []), ".parts must not be empty"),
    ("weight-shape", lambda m: _set(_weight(m), "shape", [16]), ".shape must have 2 entries"),
    ("wbq-list", lambda m: _set(m, "weight_bytes_by_quant", []), "weight_bytes_by_quant must be an object"),
    ("kernels-empty", lambda m: _set(m, "kernels", {}), "kernels must not be empty"),
    ("kernel-file", lambda m: _set(_kernel(m), "file", "evil.wgsl"), "must start with 'shaders/'"),
    ("kernel-no-sha", lambda m: _kernel(m).pop("sha256"), ".sha256 is missing"),
    ("kernel-f64", lambda m: _set(_kernel(m)["params"][0], 1, "f64"), "is not one of u32, f32"),
    ("kernel-bindings", lambda m: _set(_kernel(m), "bindings", "x"), ".bindings must be a list"),
    ("no-decode", lambda m: m["programs"].pop("decode"), "programs.decode is missing"),
    ("decode-empty", lambda m: _set(m["programs"], "decode", []), "programs.decode must not be empty"),
    ("step-str", lambda m: _set(m["programs"]["decode"], 0, "x"), "programs.decode[0] must be an object"),
    ("step-kernel", lambda m: _set(_step(m), "kernel", "nope"), "programs.decode[0].kernel = 'nope' is not in"),
    ("step-bind-name", lambda m: _set(_step(m)["bind"], 0, "nope"), "'nope' is neither a buffer nor a weight part"),
    ("step-bind-part", lambda m: _set(_step(m)["bind"], 1, "token_embd.weight#7"), "neither a buffer nor a weight"),
    ("step-bind-count", lambda m: _step(m)["bind"].pop(), "programs.decode[0].bind must have 3 entries"),
    ("step-params-count", lambda m: _step(m)["params"].pop(), "programs.decode[0].params must have"),
    ("step-u32-neg", lambda m: _set(_step(m)["params"], 0, -1), "programs.decode[0].params[0] = -1"),
    ("step-u32-big", lambda m: _set(_step(m)["params"], 0, 2**32), "params[0] = 4294967296 is out of range"),
    ("step-u32-float", lambda m: _set(_step(m)["params"], 0, 1.5), "params[0] must be an integer"),
    ("step-f32-str", lambda m: (lambda s, i: _set(s["params"], i, "x"))(*_f32_param(m)), "must be a number"),
    ("dispatch-0", lambda m: _set(_step(m), "dispatch", [0, 1, 1]), "dispatch[0] = 0 is out of range"),
    ("dispatch-zeroed", lambda m: [_set(s, "dispatch", [1, 0, 1]) for s in m["programs"]["prefill"]],
     "programs.prefill[0].dispatch[1] = 0"),
    ("dispatch-big", lambda m: _set(_step(m), "dispatch", [70000, 1, 1]), "dispatch[0] = 70000 is out of range"),
    ("dispatch-T0", lambda m: _set(_step(m), "dispatch", ["T/0", 1, 1]), "is not an integer, \"T\", \"T/n\""),
    ("dispatch-N", lambda m: _set(_step(m), "dispatch", ["N", 1, 1]), "is not an integer"),
    ("dispatch-2d", lambda m: _set(_step(m), "dispatch", [1, 1]), ".dispatch must have 3 entries"),
    ("dispatches-count", lambda m: _set(m["dispatches"], "decode", m["dispatches"]["decode"] - 1),
     "dispatches.decode = "),
    ("dispatches-program", lambda m: _set(m["dispatches"], "nope", 3), "dispatches = 'nope' is not one of"),
    ("dispatches-list", lambda m: _set(m, "dispatches", [1]), "dispatches must be an object"),
    ("selftest-id", lambda m: _set(m, "selftest", {"prompt_ids": [1], "top5": [[99999, 1.0]], "tolerance": 0.02}),
     "selftest.top5[0][0] = 99999 is out of range"),
    ("selftest-empty", lambda m: _set(m, "selftest", {"prompt_ids": [], "top5": [[1, 1.0]], "tolerance": 0.02}),
     "selftest.prompt_ids must not be empty"),
    ("selftest-tol", lambda m: _set(m, "selftest", {"prompt_ids": [1], "top5": [[1, 1.0]], "tolerance": -1}),
     "selftest.tolerance = -1 is below 0"),
    ("selftest-str", lambda m: _set(m, "selftest", "ok"), "selftest must be an object"),
    ("variant-missing", lambda m: _set(m, "program_variants", {"decode@cpu_i9": {
        "adapter": "cpu", "activations": "int8", "wgsl_language_features": []}}), "is not in programs"),
    ("variant-activations", lambda m: m["program_variants"][next(iter(m["program_variants"]))].update(
        activations="int4"), "activations = 'int4' is not one of f32, int8"),
]


def _clean(e: ArtifactError, path: Path) -> str:
    msg = str(e)
    assert msg.startswith(str(path)), msg           # names the file
    assert "\n" not in msg and len(msg) < 400, msg  # one short line
    return msg


@pytest.mark.parametrize("edit, fragment", [c[1:] for c in SCHEMA], ids=[c[0] for c in SCHEMA])
def test_schema_mutation_is_a_clean_error(tmp_path, tiny, edit, fragment):
    art = copy_artifact(tiny, tmp_path / "art")
    m = json.loads((art / MANIFEST_FILE).read_text())
    edit(m)
    (art / MANIFEST_FILE).write_bytes(manifest_bytes(m, check=False))   # re-sealed: only the schema can catch it
    with pytest.raises(ArtifactError) as e:
        read_manifest(art)
    msg = _clean(e.value, art / MANIFEST_FILE)
    assert "invalid manifest" in msg and fragment in msg and "recompile" in msg, msg


def _replace_number(text: str, key: str, new: str) -> str:
    i = text.index(f'"{key}": ') + len(key) + 4
    j = i
    while text[j] not in ",\n}":
        j += 1
    return text[:i] + new + text[j:]


# (id, edit of the file's text or bytes, fragment)
RAW = [
    ("edited-field", lambda t: _replace_number(t, "rms_eps", "0.5"), "the manifest was modified after kiln wrote it"),
    ("edited-param", lambda t: re.sub(r'("params": \[\s+)32,', r"\g<1>31,", t, count=1), "was modified"),
    ("no-checksum", lambda t: t.replace('"manifest_sha256"', '"checksum"', 1), "no valid manifest_sha256"),
    ("bad-checksum", lambda t: t.replace('"manifest_sha256": "', '"manifest_sha256": "ab', 1), "no valid"),
    ("nan", lambda t: _replace_number(t, "rms_eps", "NaN"), "corrupt manifest"),
    ("infinity", lambda t: _replace_number(t, "rope_base", "-Infinity"), "corrupt manifest"),
    ("overflow", lambda t: _replace_number(t, "rope_base", "1e999"), "corrupt manifest"),
    ("truncated", lambda t: t[:len(t) // 2], "corrupt manifest"),
    ("empty", lambda t: "", "corrupt manifest"),
    ("array", lambda t: "[1, 2]", "not an object"),
    ("string", lambda t: '"kiln"', "not an object"),
    ("deep", lambda t: "[" * 200_000 + "]" * 200_000, "corrupt manifest"),
    ("not-utf8", lambda t: b"\xff\xfe" + t.encode(), "corrupt manifest"),
    ("version-str", lambda t: t.replace('"version": 2', '"version": "2"', 1), "manifest format 'kiln' v2 ("),
    ("version-old", lambda t: t.replace('"version": 2', '"version": 1', 1), "this kiln reads kiln v2"),
]


@pytest.mark.parametrize("edit, fragment", [c[1:] for c in RAW], ids=[c[0] for c in RAW])
def test_raw_edit_is_a_clean_error(tmp_path, tiny, edit, fragment):
    art = copy_artifact(tiny, tmp_path / "art")
    text = (art / MANIFEST_FILE).read_text()
    new = edit(text)
    assert new != text
    (art / MANIFEST_FILE).write_bytes(new if isinstance(new, bytes) else new.encode())
    with pytest.raises(ArtifactError) as e:
        read_manifest(art)
    assert fragment in _clean(e.value, art / MANIFEST_FILE)


def test_intact_manifest_reads_and_roundtrips(tmp_path, tiny):
    """Control: the untouched file passes; writing what was read reproduces it byte for byte."""
    m = read_manifest(tiny)
    assert m["version"] == 2 and len(m["manifest_sha256"]) == 64
    art = copy_artifact(tiny, tmp_path / "art")
    write_manifest(art, m)
    assert (art / MANIFEST_FILE).read_bytes() == (tiny / MANIFEST_FILE).read_bytes()


def test_every_file_has_a_sha256(tiny):
    from compiler.manifest import check_file
    m = read_manifest(tiny)
    files = [(s["file"], s["sha256"]) for s in m["shards"]] + [(k["file"], k["sha256"]) for k in m["kernels"].values()]
    files.append((m["tokenizer"]["file"], m["tokenizer"]["sha256"]))
    listed = {f for f, _ in files}
    on_disk = {str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file()}
    assert on_disk - listed == {"manifest.json", ".kiln-artifact"}     # nothing unhashed
    for f, sha in files:
        check_file(tiny, f, sha, "file")


def test_manifest_directory_and_unreadable(tmp_path, tiny):
    art = copy_artifact(tiny, tmp_path / "art")
    (art / MANIFEST_FILE).unlink()
    (art / MANIFEST_FILE).mkdir()
    with pytest.raises(ArtifactError, match="cannot read the manifest"):
        read_manifest(art)


@pytest.mark.parametrize("case", ["dispatch-zeroed", "part-outside", "chunk-neg"])
def test_writer_refuses_an_invalid_manifest(tmp_path, tiny, case):
    """kiln never seals a manifest it would refuse to read (the browser checks the seal, not the schema)."""
    art = copy_artifact(tiny, tmp_path / "art")
    m = read_manifest(art)
    dict((c[0], c) for c in SCHEMA)[case][1](m)
    with pytest.raises(ArtifactError, match="invalid manifest: .*refusing to write it"):
        write_manifest(art, m)
    read_manifest(art)                       # the old file is untouched


def test_writer_refuses_non_finite_numbers(tmp_path, tiny):
    art = copy_artifact(tiny, tmp_path / "art")
    m = read_manifest(art)
    m["config"]["rms_eps"] = float("nan")
    with pytest.raises(KilnError, match="NaN or infinite"):
        write_manifest(art, m)
    read_manifest(art)                       # the old file is untouched
    assert not [p for p in art.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("what", ["shader", "tokenizer"])
def test_edited_file_is_refused_by_name(tmp_path, tiny, what):
    """Model() checks tokenizer.json before asking for a device; shaders as it builds each pipeline (here through
    check_file, the function it calls; tests/gpu/test_artifact_files.py runs the real load)."""
    from compiler.manifest import check_file
    from runtime_py.model import Model
    art = copy_artifact(tiny, tmp_path / "art")
    m = read_manifest(art)
    entry = m["tokenizer"] if what == "tokenizer" else next(iter(m["kernels"].values()))
    path = art / entry["file"]
    path.write_bytes(path.read_bytes().replace(b"a", b"b", 1))
    with pytest.raises(ArtifactError) as e:
        check_file(art, entry["file"], entry["sha256"], what)
    assert f"{path}: {what} does not match the manifest's sha256" in str(e.value)
    if what == "tokenizer":
        class NoDevice(SimpleNamespace):
            def __getattr__(self, name):
                raise AssertionError("device used before the tokenizer check")
        with pytest.raises(ArtifactError, match="tokenizer does not match"):
            Model(art, device=NoDevice())


@pytest.mark.parametrize("case", ["edited-field", "dispatch-zeroed", "nan"])
def test_tampered_manifest_cli(tmp_path, tiny, case):
    """Through `kiln run`: one `kiln: error:` line naming the file, exit 1, no traceback."""
    art = copy_artifact(tiny, tmp_path / "art")
    path = art / MANIFEST_FILE
    if case in dict((c[0], c) for c in SCHEMA):
        m = json.loads(path.read_text())
        dict((c[0], c) for c in SCHEMA)[case][1](m)
        path.write_bytes(manifest_bytes(m, check=False))
    else:
        path.write_text(dict((c[0], c) for c in RAW)[case][1](path.read_text()))
    assert_cli_error(kiln("run", art, "-n", "1", "--prompt", "ab"), str(path), "recompile")
