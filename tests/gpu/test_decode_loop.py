"""generate() sampling on the GPU with several decode steps per submit (Session.prefill_sample / decode_sample, the
`sample` program) against the per-token CPU path (logits read back, runtime_py/sampling.py) on SmolLM2, with the GPU
traffic counted at wgpu-py's API (submits, bytes read back), as /work/shared/tools/count_traffic.py does."""
from __future__ import annotations

import numpy as np
import pytest
from wgpu.backends.wgpu_native import _api

from runtime_py.generate import generate
from runtime_py.sampling import GREEDY, SamplingParams

try:
    from .test_smollm2 import LAST_LOGITS, MAX_ABS_LOGIT_DIFF, TRANSFORMERS, first_tie_step
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from test_smollm2 import LAST_LOGITS, MAX_ABS_LOGIT_DIFF, TRANSFORMERS, first_tie_step


class CPUPath:
    """The session without its GPU sampler: generate() falls back to one forward + logits read per token."""

    def __init__(self, session):
        self.s = session

    def __getattr__(self, name):
        if name == "gpu_sampling":
            raise AttributeError(name)
        return getattr(self.s, name)


class Traffic:
    """Counts dispatches, queue submits and bytes read back (queue.read_buffer, buffer map_async) while active."""

    def __enter__(self):
        self.submits = self.read_bytes = self.dispatches = 0
        self._orig = (_api.GPUQueue.submit, _api.GPUQueue.read_buffer, _api.GPUBuffer.map_async)
        self._orig_dispatch = _api.GPUComputePassEncoder.dispatch_workgroups
        sub, rb, mp = self._orig
        me = self

        def dispatch(cp, *a, **k):
            me.dispatches += 1
            return me._orig_dispatch(cp, *a, **k)
        _api.GPUComputePassEncoder.dispatch_workgroups = dispatch

        def submit(q, *a, **k):
            me.submits += 1
            return sub(q, *a, **k)

        def read_buffer(q, buf, offset=0, size=None, *a, **k):
            me.read_bytes += size if size is not None else buf.size - offset
            me._in_read = True
            try:
                return rb(q, buf, offset, size, *a, **k)
            finally:
                me._in_read = False

        def map_async(b, mode, offset=0, size=None, *a, **k):
            if not getattr(me, "_in_read", False):   # read_buffer maps a staging buffer: counted once above
                me.read_bytes += size if size is not None else b.size - offset
            return mp(b, mode, offset, size, *a, **k)

        _api.GPUQueue.submit, _api.GPUQueue.read_buffer, _api.GPUBuffer.map_async = submit, read_buffer, map_async
        return self

    def __exit__(self, *exc):
        _api.GPUQueue.submit, _api.GPUQueue.read_buffer, _api.GPUBuffer.map_async = self._orig
        _api.GPUComputePassEncoder.dispatch_workgroups = self._orig_dispatch


def run(session, tok, ids, params, n, logprobs=0, eog=()):
    evs = list(generate(session, tok, ids, params, max_tokens=n, logprobs=logprobs, eog_ids=eog))
    return evs[-1], [e for e in evs[:-1] if e.id >= 0]


@pytest.fixture(scope="module")
def session(smollm2_model):
    s = smollm2_model.session(ctx=256)
    assert s.gpu_sampling()
    return s


PROMPT = TRANSFORMERS[next(iter(TRANSFORMERS))]["prompt_ids"]


def test_sampled_decoding_on_the_gpu(session, smollm2_tokenizer):
    """temperature 0.7, top_p 0.9, seed 1, 64 tokens: the CPU sampler's tokens, <= 0.25 submits and <= 256 bytes
    read back per generated token."""
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    with Traffic() as t:
        done, _ = run(session, smollm2_tokenizer, PROMPT, params, 64)
    n = len(done.ids)
    assert n == 64
    print(f"GPU sampling: {t.submits} submits, {t.read_bytes} bytes read for {n} tokens")
    assert t.submits / n <= 0.25
    assert t.read_bytes / n <= 256
    cpu, _ = run(CPUPath(session), smollm2_tokenizer, PROMPT, params, 64)
    assert done.ids == cpu.ids


def test_top_logprobs_on_the_gpu(session, smollm2_tokenizer):
    params = SamplingParams(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05)   # what `kiln run --json` does
    with Traffic() as t:
        done, toks = run(session, smollm2_tokenizer, PROMPT, params, 24, logprobs=5)
    assert len(done.ids) == 24
    print(f"GPU logprobs: {t.submits} submits, {t.read_bytes} bytes read for 24 tokens")
    assert t.read_bytes / 24 <= 1024
    cpu, cpu_toks = run(CPUPath(session), smollm2_tokenizer, PROMPT, params, 24, logprobs=5)
    assert done.ids == cpu.ids
    for a, b in zip(toks, cpu_toks):
        assert len(a.top_logprobs) == 5
        np.testing.assert_allclose([v for _, v in a.top_logprobs], [v for _, v in b.top_logprobs], atol=2e-4)
        ids_a, ids_b = [i for i, _ in a.top_logprobs], [i for i, _ in b.top_logprobs]
        vals = dict(b.top_logprobs)
        # same ids in the same order, except where two alternatives tie within float32 rounding
        assert all(x == y or abs(vals.get(x, 1e9) - vals[y]) < 1e-4 for x, y in zip(ids_a, ids_b))


def test_greedy_gpu_loop_matches_transformers(session, smollm2_tokenizer):
    case = TRANSFORMERS[next(iter(TRANSFORMERS))]
    done, _ = run(session, smollm2_tokenizer, case["prompt_ids"], GREEDY, 32)
    upto = min(len(case["greedy_ids"]), first_tie_step(case), 32)
    assert done.ids[:upto] == case["greedy_ids"][:upto]


def test_eos_and_stop_strings_inside_a_submit(session, smollm2_tokenizer):
    """EOS and stop strings found after a ring read: the surplus tokens of that submit are dropped."""
    tok = smollm2_tokenizer
    ids = tok.encode("The capital of France is")
    full, _ = run(CPUPath(session), tok, ids, GREEDY, 12)
    assert len(full.ids) == 12
    eos = full.ids[5]   # an id the 6th step produces, pretended to be EOS
    for kw in [dict(eog=(eos,)), dict(stop=full.text[len(full.text) // 2:len(full.text) // 2 + 3])]:
        params = SamplingParams(**{**GREEDY.__dict__, "stop": [kw["stop"]]}) if "stop" in kw else GREEDY
        gpu, _ = run(session, tok, ids, params, 12, eog=kw.get("eog", ()))
        cpu, _ = run(CPUPath(session), tok, ids, params, 12, eog=kw.get("eog", ()))
        assert (gpu.ids, gpu.text, gpu.finish_reason) == (cpu.ids, cpu.text, cpu.finish_reason)
        assert gpu.finish_reason == "stop" and len(gpu.ids) < 12


@pytest.mark.parametrize("variant", ["decode", "decode@cpu"])
def test_decode_dispatches(smollm2_model, smollm2_artifact, variant, monkeypatch):
    """A SmolLM2 decode token is <= 160 dispatches with the plain program (issue 14; 334 before the fusion) and 274 with
    the CPU-adapter variant (334 before; it fuses Q/K/V but has no mat-vec prologue, compiler/schedule.py
    Builder.fuse_prologues, and keeps RoPE + KV write as a step before attention_cpu, whose q is a uniform), counted at wgpu-py's API while the program replays, each on a model
    loaded for the adapter class that runs it (KILN_ADAPTER_CLASS); the manifest's `dispatches` says the same; and
    the logits of a prompt whose last token is decoded by that variant match float32 transformers (each variant is
    correct on any adapter)."""
    from runtime_py.model import Model
    cls = "cpu" if variant.endswith("@cpu") else "gpu"
    if smollm2_model.adapter_class == cls:
        model = smollm2_model
    else:
        monkeypatch.setenv("KILN_ADAPTER_CLASS", cls)
        model = Model(smollm2_artifact)
    assert model.program_for["decode"] == variant
    m = model.manifest
    name = next(iter(TRANSFORMERS))
    ids = TRANSFORMERS[name]["prompt_ids"]
    s = model.session(ctx=256)
    s.forward(ids[:-1])
    with Traffic() as t:
        s.forward(ids[-1:])
    assert t.dispatches == m["dispatches"][variant] == len(m["programs"][variant])
    print(f"{variant}: {m['dispatches'][variant]} dispatches per decode token")
    assert m["dispatches"][variant] <= (160 if variant == "decode" else 274)
    logits, ref = s.logits(), LAST_LOGITS[name]
    assert int(logits.argmax()) == int(ref.argmax())
    assert float(np.abs(logits - ref).max()) <= MAX_ABS_LOGIT_DIFF
