"""runtime_py/gpu_sampling.py and its mirror web/gpu_sampling.js: the same SampleCfg bytes for the same request, and
the same choice of which requests the GPU sampler takes (no GPU needed: the kernels are tests/gpu/test_sampling_gpu.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runtime_py.gpu_sampling import K_MAX, LP_MAX, MAX_BIAS, RING, gpu_reason, pack_config
from runtime_py.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = [
    dict(temperature=0.7, top_p=0.9, seed=1),
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.2, top_k=64, top_p=0.5, min_p=0.1, repeat_penalty=1.3, repeat_last_n=-1, presence_penalty=0.5,
         frequency_penalty=-0.25, logit_bias={7: 1.5, 3: -100.0}),
    dict(temperature=0.8, top_k=0),
    dict(temperature=0.8, top_k=65),
]


def test_pack_config_layout():
    p = SamplingParams(**REQUESTS[2])
    words = np.frombuffer(pack_config(p, n_logprobs=30), np.uint32)
    f = words.view(np.float32)
    assert words[0] == 0 and words[1] == 64 and words[6] == 0xFFFFFFFF and words[9] == LP_MAX and words[10] == 2
    assert np.allclose(f[[2, 3, 4, 5, 7, 8]], [0.5, 0.1, 1.2, 1.3, 0.5, -0.25])
    assert words[12:16].tolist() == [3, np.float32(-100.0).view(np.uint32), 7, np.float32(1.5).view(np.uint32)]


def test_which_requests_run_on_the_gpu():
    assert [gpu_reason(SamplingParams(**r)) is None for r in REQUESTS] == [True, True, True, False, False]
    assert "top_k=0" in gpu_reason(SamplingParams(**REQUESTS[3]))
    assert gpu_reason(SamplingParams(top_k=5, logit_bias={i: 1.0 for i in range(MAX_BIAS + 1)}))


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_web_mirror_packs_the_same_bytes(tmp_path):
    manifest = {"buffers": {"cand": {"shape": [2, 2, K_MAX]}, "ring": {"shape": [2 * RING + RING * LP_MAX * 2]},
                            "sampler_cfg": {"shape": [12 + 2 * MAX_BIAS]}}}
    script = tmp_path / "cfg.mjs"
    script.write_text(
        f'import {{ packConfig, gpuReason, sampleLimits }} from "{(ROOT / "web" / "gpu_sampling.js").as_uri()}";\n'
        f'import {{ SamplingParams }} from "{(ROOT / "web" / "sampler.js").as_uri()}";\n'
        f'const lim = sampleLimits({json.dumps(manifest)});\n'
        f'const reqs = {json.dumps(REQUESTS)};\n'
        'console.log(JSON.stringify({lim, out: reqs.map((r) => { const p = new SamplingParams(r);\n'
        '  return [Array.from(packConfig(p, 5, lim)), gpuReason(p, lim) === null]; })}));\n')
    js = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True,
                                   timeout=60).stdout)
    assert js["lim"] == {"kMax": K_MAX, "ring": RING, "maxBias": MAX_BIAS}
    for r, (words, on_gpu) in zip(REQUESTS, js["out"]):
        p = SamplingParams(**r)
        assert words == np.frombuffer(pack_config(p, 5), np.uint32).tolist(), r
        assert on_gpu == (gpu_reason(p) is None)
