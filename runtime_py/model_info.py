"""`kiln inspect MODEL.gguf`: a GGUF's architecture, parameters, tensor types, the GPU memory a session needs, the paged KV pool `kiln serve` would allocate, what
kiln would refuse, and the dispatches per forward `kiln compile` would schedule — without compiling anything."""
from __future__ import annotations

import json
from collections import Counter

from compiler.errors import KilnError


def cmd_inspect(a):
    from compiler.config import read_config
    from compiler.refuse import unsupported
    from compiler.gguf_file import GGUFModel
    from compiler.quant import scheme_for
    from .artifacts import resolve_gguf
    g = GGUFModel(resolve_gguf(a.model))
    cfg = read_config(g, refuse_unsupported=False)   # listed below instead: what `kiln compile` would refuse
    refused = unsupported(g, cfg)
    cannot_run = set()
    for t in g.tensors.values():
        try:
            scheme_for(t.ggml_type)
        except KilnError:
            cannot_run.add(t.ggml_type.name)
    n_params = sum(int(__import__("math").prod(t.shape)) for t in g.tensors.values())
    from compiler.plan import tensor_types
    types = Counter()
    for kind, nbytes in tensor_types(g, a.quant).values():   # as packed, after --quant re-quantization
        types[kind] += nbytes
    weights = sum(types.values())
    if a.ctx is not None and a.ctx < 1:
        raise KilnError(f"--ctx must be at least 1 (got {a.ctx})")
    from compiler.pipeline import DEFAULT_PREFILL_CHUNK
    from compiler.schedule import activation_buffers, score_chunk
    from .model import DEFAULT_CTX, session_buffer_bytes
    ctx = min(a.ctx or DEFAULT_CTX, cfg.context_length)   # the context `kiln run` gives a session
    kv = cfg.kv_cache_bytes(ctx)
    bufs = {"limits": {"prefill_chunk": DEFAULT_PREFILL_CHUNK},
            "buffers": activation_buffers(cfg, score_chunk(cfg.vocab, DEFAULT_PREFILL_CHUNK))}
    act = sum(session_buffer_bytes(bufs, ctx).values()) - kv   # every other buffer a generating session allocates
    from compiler.kernels_rows import KV_PAGE
    from .pages import kv_plan
    pool = kv_plan(cfg.kv_cache_bytes(1), KV_PAGE, ctx, getattr(a, "kv_memory", None))   # kiln serve's paged pool
    info = {"file": str(g.path), "architecture": cfg.arch, "name": cfg.name, "parameters": n_params,
            "layers": cfg.n_layer, "n_embd": cfg.n_embd, "heads": cfg.n_head, "kv_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim, "n_ff": cfg.n_ff, "vocab": cfg.vocab, "context_length": cfg.context_length,
            "tensor_bytes_by_type": dict(types), "weights_bytes": weights, "ctx": ctx, "kv_cache_bytes_f32": kv,
            "activation_bytes": act, "total_gpu_bytes": weights + kv + act, "serve_kv_pool": pool,
            "unsupported_tensor_types": sorted(cannot_run), "not_implemented": refused,
            "dispatches": _dispatches(g, cfg, a.quant) if not refused else None}
    if a.json:
        print(json.dumps(info, indent=1))
        return
    print(f"{g.path.name}: {cfg.arch} '{cfg.name}', {n_params / 1e6:.1f}M parameters")
    print(f"  {cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads / {cfg.n_kv_head} KV heads, head_dim "
          f"{cfg.head_dim}, n_ff {cfg.n_ff}, vocab {cfg.vocab}, trained context {cfg.context_length}")
    for name, b in types.most_common():
        print(f"  {name:6s} {b / 2**20:9.2f} MiB" + ("  <- kiln cannot run this type" * (name in cannot_run)))
    print(f"  weights on GPU      {weights / 2**20:9.2f} MiB (stays quantized)")
    print(f"  KV cache @ ctx {ctx:<5d} {kv / 2**20:9.2f} MiB (2 x {cfg.n_layer} layers x {cfg.n_kv_head} kv heads x "
          f"{cfg.head_dim} x {ctx} x 4 B)")
    print(f"  activations         {act / 2**20:9.2f} MiB (prefill chunk {DEFAULT_PREFILL_CHUNK}, logits)")
    print(f"  total               {(weights + kv + act) / 2**20:9.2f} MiB")
    print(f"  kiln serve KV pool  {pool['bytes'] / 2**20:9.2f} MiB: {pool['pages']} pages of {pool['page_tokens']} "
          f"tokens = {pool['tokens']} tokens, {pool['full_context_sequences']} full-context sequences at ctx {ctx} "
          f"(--kv-memory; shorter requests share it, and full prefix pages are shared)")
    if info["dispatches"]:
        print("  dispatches per forward: " + ", ".join(f"{p} {n}" for p, n in info["dispatches"].items()))
    for item in refused:
        print(f"  not implemented: {item} (kiln compile refuses this file)")


def _dispatches(g, cfg, quant) -> dict[str, int] | None:
    """{program: dispatches} as `kiln compile` would schedule them (the manifest's `dispatches`), None where the
    schedule refuses the model (the reason is listed under not_implemented, or compile names it)."""
    from compiler.manifest import program_dispatches
    from compiler.plan import plan_weights
    from compiler.schedule import build_programs
    try:
        return program_dispatches(build_programs(cfg, plan_weights(g, cfg, requant=quant)))
    except KilnError:
        return None
