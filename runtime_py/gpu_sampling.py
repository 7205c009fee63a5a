"""What the runtime writes for sampling on the GPU (kernels SamplePrep -> SampleTopK -> SampleDraw, see
shaders/sample_*.wgsl.j2): the request's settings (`pack_config`) and the PRNG seed; and which requests the GPU
sampler takes (`gpu_reason`): top-k between 1 and K_MAX candidates, or greedy. Others (top_k off, i.e. the whole
vocabulary as candidates, or larger than K_MAX) run on the CPU sampler (runtime_py/sampling.py), which reads the
logits back each token. Mirrored by web/gpu_sampling.js.

Exactness: the kernels repeat runtime_py/sampling.py's steps in float32 (the reference is float64), in the same
order, on exactly the same candidates (exact top-k, ties by index). Choices are therefore equal except where a
uniform draw or top_p falls within float32 rounding of a cumulative-sum boundary (about 1e-7 of the mass);
tests/gpu/test_sampling_gpu.py checks equality on random logits and on exact ties / boundaries.
"""
from __future__ import annotations

import numpy as np

from compiler.kernels import SampleDraw
from compiler.schedule import SAMPLE_MAX_BIAS, SAMPLE_RING

from .sampling import SamplingParams

K_MAX = SampleDraw.k_max    # most candidates the GPU sampler ranks
LP_MAX = SampleDraw.lp_max  # most top logprobs per token
RING = SAMPLE_RING          # decode steps one submit can collect (tokens, logprobs)
MAX_BIAS = SAMPLE_MAX_BIAS   # logit_bias entries
CFG_HEAD_WORDS = 12  # struct SampleCfg up to `bias`


def gpu_reason(params: SamplingParams) -> str | None:
    """None when the GPU sampler implements `params` exactly as the CPU sampler; else why not."""
    if params.greedy:
        return None
    if not 0 < params.top_k <= K_MAX:
        return f"top_k={params.top_k} (the GPU sampler ranks 1..{K_MAX} candidates)"
    if len(getattr(params, "logit_bias", None) or {}) > MAX_BIAS:
        return f"more than {MAX_BIAS} logit_bias entries"
    return None


def pack_config(params: SamplingParams, n_logprobs: int = 0) -> bytes:
    """struct SampleCfg (shaders/_sample_cfg.wgsl.j2) for this request."""
    bias = sorted((getattr(params, "logit_bias", None) or {}).items())
    head = np.zeros(CFG_HEAD_WORDS, np.uint32)
    f = head.view(np.float32)
    head[0] = int(params.greedy)
    head[1] = max(0, min(params.top_k, K_MAX))
    f[2], f[3], f[4], f[5] = params.top_p, params.min_p, params.temperature or 1.0, params.repeat_penalty
    head[6] = 0xFFFFFFFF if params.repeat_last_n < 0 else params.repeat_last_n   # -1: the whole history
    f[7], f[8] = params.presence_penalty, params.frequency_penalty
    head[9] = min(n_logprobs, LP_MAX)
    head[10] = len(bias)
    pairs = np.zeros((max(1, len(bias)), 2), np.uint32)
    for i, (tok, b) in enumerate(bias):
        pairs[i] = (int(tok), np.array(b, np.float32).view(np.uint32))
    return head.tobytes() + pairs.tobytes()


def seed_of(params: SamplingParams) -> int:
    """The request's seed, or a fresh one (as Sampler picks it)."""
    if params.seed is not None:
        return params.seed & 0xFFFFFFFF
    return int(np.random.SeedSequence().entropy & 0xFFFFFFFF)
