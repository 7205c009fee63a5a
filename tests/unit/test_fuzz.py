"""A bounded, seeded slice of the fuzz suite (tests/fuzz.py; `make fuzz` runs 10,000 cases): mutated GGUF headers,
metadata, tensor tables and data, and mutated manifests, must each end in a clean refusal (a KilnError with a short
one-line message) or a correct compile / load: no traceback, no hang, no NaN in a manifest."""
from __future__ import annotations

import pytest

from tests.fuzz import CLEAN, fuzz, report

GGUF_CASES = 300        # ~20-40 s on 2 busy cores
MANIFEST_CASES = 100


@pytest.mark.parametrize("kind, cases, share, seed", [("gguf", GGUF_CASES, 0.0, 11), ("manifest", MANIFEST_CASES, 1.0, 12)])
def test_fuzz_outcomes_are_clean(kind, cases, share, seed):
    result = fuzz(cases, seed, manifest_share=share, log=None)
    print(report(result))
    assert result["cases"] == cases
    assert not result["bad"], report(result)
    outcomes = {k.split(":")[0] for k in result["counts"]}
    assert outcomes <= set(CLEAN)
    # the mutations reach every stage: some files are refused, some still compile / load
    assert "refused" in outcomes and ("compiled" if kind == "gguf" else "accepted") in outcomes, result["counts"]


def test_a_known_bad_case_is_reported(monkeypatch):
    """The harness itself: a stage that raises a plain exception is counted as a traceback, not a refusal."""
    import compiler.pipeline
    monkeypatch.setattr(compiler.pipeline, "compile_model", lambda *a, **k: (_ for _ in ()).throw(IndexError("x")))
    result = fuzz(3, 5, manifest_share=0.0, log=None, start_method="fork")   # the patch must reach the worker
    assert result["counts"].get("traceback", 0) + sum(v for k, v in result["counts"].items()
                                                      if k.startswith("refused")) == 3
    assert result["counts"].get("traceback", 0) >= 1 and result["bad"]
