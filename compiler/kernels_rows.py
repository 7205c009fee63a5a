"""Kernel dataclasses of the `rows` program (compiler/schedule_rows.py): one forward over R rows, each row its own
(KV slot, position, token). Every other step of that program is a prefill kernel (compiler/kernels.py): embedding,
norms and matmuls treat rows like a prompt's tokens. These three are the row-indexed steps: they read the per-row
info buffer `rows` — (R, 4) u32 per row: [table0, pos, 0, 0] — instead of State.pos0, and reach the KV pool through
the buffer `page_table`: the row's sequence holds positions [i * KV_PAGE, (i + 1) * KV_PAGE) in pool page
page_table[table0 + i], i.e. position j in pool row page_table[table0 + j // KV_PAGE] * KV_PAGE + j % KV_PAGE (a
forward's rows of one sequence share its table0; runtime_py/pages.py allocates the pages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .kernels import Kernel, Param

ROW_INFO_WORDS = 4   # u32 per row of the `rows` buffer: table0, pos, two spare (16 bytes: one vec4 each)
KV_PAGE = 16         # positions per KV page (manifest limits.kv_page)


@dataclass(frozen=True)
class RopeKVRows(Kernel):
    """rope_kv per row: q, k rotated at the row's own position, k and v written to the KV pool at position pos of
    the row's sequence (through its page table)."""
    template: ClassVar[str] = "rope_kv_rows"
    params: ClassVar[tuple[Param, ...]] = (("n_head", "u32"), ("n_kv", "u32"), ("head_dim", "u32"), ("rot_dim", "u32"))
    style: str = "norm"   # "norm" | "neox"
    page: int = KV_PAGE
    wg: int = 64

    def bindings(self):
        return [("qkv", "read_write"), ("inv_freq", "read"), ("rows", "read"), ("page_table", "read"),
                ("k_cache", "read_write"), ("v_cache", "read_write")]


@dataclass(frozen=True)
class AttentionRows(Kernel):
    """Causal attention per row over its own sequence's keys [start .. pos] (through its page table): one workgroup
    per (KV head, row), the GQA group's query heads together, tiles of WG keys with an online softmax
    (attention_split with one split)."""
    template: ClassVar[str] = "attention_rows"
    params: ClassVar[tuple[Param, ...]] = (("n_head", "u32"), ("n_kv", "u32"), ("head_dim", "u32"), ("window", "u32"),
                                           ("scale", "f32"))
    softcap: ClassVar[bool] = False   # AttentionRowsSoftcap
    group: int = 1             # query heads per KV head (n_head / n_kv)
    outs_per_thread: int = 1   # ceil(group * head_dim / wg)
    page: int = KV_PAGE
    wg: int = 64

    @classmethod
    def for_heads(cls, n_head: int, n_kv: int, head_dim: int) -> "AttentionRows":
        g = n_head // n_kv
        return cls(group=g, outs_per_thread=-(-g * head_dim // cls.wg))

    def bindings(self):
        return [("qkv", "read"), ("rows", "read"), ("page_table", "read"), ("k_cache", "read"), ("v_cache", "read"),
                ("out", "read_write")]


@dataclass(frozen=True)
class AttentionRowsSoftcap(AttentionRows):
    """AttentionRows with gemma2's score soft-capping (scores = cap * tanh(scores / cap) after the scale)."""
    params: ClassVar[tuple[Param, ...]] = AttentionRows.params + (("cap", "f32"),)
    softcap: ClassVar[bool] = True

    @property
    def name(self) -> str:   # the same template: the name (pipeline cache key, file name) says which
        return "attention_rows_softcap" + super().name[len("attention_rows"):]


@dataclass(frozen=True)
class ArgmaxRows(Kernel):
    """token[t] = argmax(logits[t, :n]) per row t, first index on ties: one workgroup per row."""
    template: ClassVar[str] = "argmax_rows"
    params: ClassVar[tuple[Param, ...]] = (("n", "u32"),)
    wg: int = 256

    def bindings(self):
        return [("logits", "read"), ("token", "read_write")]
