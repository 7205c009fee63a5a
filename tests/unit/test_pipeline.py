"""compiler/pipeline.py: the stages run in the documented order, KILN_DEBUG=1 dumps each one, weights are packed once.

Uses the 1-layer f32 GGUF of tests/unit/test_errors.py (written with gguf.GGUFWriter): no GPU, a second to compile.
"""
from __future__ import annotations

import json

import pytest

from compiler import pipeline
from compiler.quant import QuantScheme
from tests.unit.test_errors import write_tiny_gguf


def test_stages_are_the_documented_order():
    names = [n for n, _ in pipeline.STAGES]
    assert names == ["read", "config", "plan", "schedule", "render", "shards", "manifest"]
    doc = pipeline.__doc__
    assert [doc.index(f" {i + 1} {n} ") for i, n in enumerate(names)] == sorted(doc.index(f" {i + 1} {n} ")
                                                                             for i, n in enumerate(names))


def test_debug_dumps_every_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_DEBUG", "1")
    out = pipeline.compile_model(write_tiny_gguf(tmp_path / "t.gguf"), tmp_path / "art")
    text = capsys.readouterr().out
    for name, _ in pipeline.STAGES:
        assert f"== {name} ==\n" in text, name
    assert "prefill[0] {\"kernel\": \"embed_f32_wg64\"" in text        # the programs, step by step
    assert "// kiln kernel argmax_wg256" in text                       # every rendered shader
    assert json.loads((out / "manifest.json").read_text())["features"] == []


def test_each_part_is_packed_once_and_planned_sizes_hold(tmp_path, monkeypatch):
    packed = []
    for s in QuantScheme.registry.values():
        orig = s.pack.__func__

        def counting(cls, raw, rows, k, _orig=orig):
            words = _orig(cls, raw, rows, k)
            packed.append(cls.name)
            return words
        monkeypatch.setattr(s, "pack", classmethod(counting))
    out = pipeline.compile_model(write_tiny_gguf(tmp_path / "t.gguf"), tmp_path / "art", shard_bytes=4096)
    m = json.loads((out / "manifest.json").read_text())
    parts = [p for w in m["weights"].values() for p in w["parts"]]
    assert len(packed) == len(parts) and max(p["bytes"] for p in parts) <= 4096   # once per part, nothing to measure
    for w in m["weights"].values():
        s = QuantScheme.registry[w["quant"]]
        assert [p["bytes"] for p in w["parts"]] == [4 * s.packed_words(p["rows"], w["shape"][1]) for p in w["parts"]]


@pytest.mark.parametrize("until", ["plan", "schedule"])
def test_front_stages_write_nothing(tmp_path, until):
    c = pipeline.run_stages(pipeline.Compilation(write_tiny_gguf(tmp_path / "t.gguf"), tmp_path / "art"), until=until)
    assert c.plan is not None and not (tmp_path / "art").exists()
