"""Stage 4, CPU adapters: the attention steps of the `@cpu` single-sequence programs (decode@cpu, prefill@cpu,
score@cpu; `<program>@cpu_i8` alike), `attention_cpu` (shaders/attention_cpu.wgsl.j2: lane = key, q from a uniform
binding). compiler/schedule.py's Builder calls these where its adapter is "cpu"; the other programs keep
attention_split. See ARCHITECTURE.md, "CPU adapters".
"""
from __future__ import annotations

from .config import ModelConfig
from .ir import Program
from .kernels import AttentionReduce
from .kernels_cpu import UNIFORM_BINDING_BYTES, AttentionCPU

# the decode attention splits the keys so that one dispatch has about this many workgroups of 8 lanes: few, long
# splits, since each workgroup's lane merge is a fixed cost and a CPU adapter runs a workgroup per core
CPU_ATTENTION_WORKGROUPS = 4
DECODE_SPLITS_MAX = 16   # = compiler/schedule.py DECODE_SPLITS: the attn_part buffer holds that many splits


def qkv_dim(cfg: ModelConfig) -> int:
    return (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim


def cpu_attention_fits(cfg: ModelConfig) -> bool:
    """Whether attention_cpu can run this model: one qkv row in a uniform binding, whole vec4s, whole GQA groups."""
    return qkv_dim(cfg) * 4 <= UNIFORM_BINDING_BYTES and cfg.head_dim % 4 == 0 and cfg.n_head % cfg.n_kv_head == 0


def cpu_decode_splits(n_kv: int) -> int:
    """Key splits per KV head of decode@cpu's attention: CPU_ATTENTION_WORKGROUPS workgroups in all (at most
    DECODE_SPLITS_MAX). SmolLM2 (3 KV heads): 2; Gemma 3 (1): 4."""
    return max(1, min(DECODE_SPLITS_MAX, -(-CPU_ATTENTION_WORKGROUPS // n_kv)))


def cpu_q_window(cfg: ModelConfig, chunk: int) -> int:
    """Query rows per uniform q window of the prefill form: the largest power of two dividing the chunk whose qkv
    rows fit a uniform binding; 0 where a row's bytes are no multiple of 256 (uniform offsets) or attention_cpu does
    not fit (then prefill keeps attention_split). SmolLM2: 16, Gemma 3: 8."""
    row = qkv_dim(cfg) * 4
    if row % 256 or not cpu_attention_fits(cfg):
        return 0
    w = 1
    while chunk % (2 * w) == 0 and 2 * w * row <= UNIFORM_BINDING_BYTES:
        w *= 2
    return w


def cpu_kv_textures(cfg: ModelConfig, chunks: dict[str, int]) -> bool:
    """Whether the @cpu programs keep K/V in rgba32float textures (k_tex.L / v_tex.L: AttentionCPU kv_tex, rope_kv
    writing a storage texture): only where every one of them runs attention_cpu (decode, and prefill / score with a
    uniform q window), since a step falling back to attention_split would read storage. SmolLM2, Gemma 3: yes."""
    return cpu_attention_fits(cfg) and all(cpu_q_window(cfg, chunks[n]) for n in ("prefill", "score"))


def kv_names(L: int, tex: bool) -> tuple[str, str]:
    """Layer L's K and V cache buffers: the @cpu programs' textures (cpu_kv_textures), else the storage caches that
    decode / prefill / score / rows bind."""
    return (f"k_tex.{L}", f"v_tex.{L}") if tex else (f"k_cache.{L}", f"v_cache.{L}")


def _params(cfg: ModelConfig, window: int, splits: int) -> dict:
    params = dict(n_head=cfg.n_head, n_kv=cfg.n_kv_head, head_dim=cfg.head_dim, window=window,
                  scale=cfg.softmax_scale, splits=splits)
    if cfg.attn_softcap:   # gemma2
        params["cap"] = cfg.attn_softcap
    return params


def attention_cpu_decode(p: Program, cfg: ModelConfig, L: int, window: int, kv_tex: bool = False):
    """decode@cpu, layer L: attention_cpu's partials (cpu_decode_splits per KV head), then attention_reduce into
    `attn`. q is qkv's row 0, already RoPE'd (and QK-normed) by the steps before, which also wrote position pos."""
    splits = cpu_decode_splits(cfg.n_kv_head)
    k = AttentionCPU(n_head=cfg.n_head, n_kv=cfg.n_kv_head, head_dim=cfg.head_dim, softcap=bool(cfg.attn_softcap),
                     kv_tex=kv_tex)
    p.add(k, ["qkv", *kv_names(L, kv_tex), "attn_part"], _params(cfg, window, splits),
          [cfg.n_kv_head, splits, 1])
    p.add(AttentionReduce(), ["attn_part", "attn"], dict(n_head=cfg.n_head, head_dim=cfg.head_dim, splits=splits),
          [cfg.n_head, "T", 1])


def attention_cpu_prefill(p: Program, cfg: ModelConfig, L: int, window: int, chunk: int, kv_tex: bool = False):
    """prefill@cpu / score@cpu, layer L: attention_cpu over one split into `attn`, a step per uniform window of
    cpu_q_window query rows (qkv bound at the window's byte offset, "qkv+OFF"; a window at or past T dispatches
    nothing, "T>t0"), one workgroup per (KV head, token of the window)."""
    w = cpu_q_window(cfg, chunk)
    k = AttentionCPU(n_head=cfg.n_head, n_kv=cfg.n_kv_head, head_dim=cfg.head_dim, softcap=bool(cfg.attn_softcap),
                     prefill=True, tokens=w, kv_tex=kv_tex)
    for t0 in range(0, chunk, w):
        q = f"qkv+{t0 * qkv_dim(cfg) * 4}" if t0 else "qkv"
        p.add(k, [q, *kv_names(L, kv_tex), "attn"], dict(_params(cfg, window, 1), t0=t0),
              [cfg.n_kv_head, f"T>{t0}", w])
