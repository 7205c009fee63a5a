"""The int8-activation program variants of CPU adapters: `prefill@cpu_i8`, `decode@cpu_i8`, `score@cpu_i8` (stage 4,
beside schedule.py).

The same steps as `<program>@cpu` on the same buffers, except that every mat-vec whose weights have an int8 dot (q8_0,
q4_1: compiler/kernels_i8.py I8_QUANTS) first quantises its x to int8 per 32-block into `xq` (quantize_act, once per
x: Q, K and V share one) and then runs matvec_cpu_i8 / matmul_cpu_i8 (dot4I8Packed on whole blocks) instead of
matvec_cpu / matmul_cpu, on xq windows as schedule.py's CPU windows (bind ref "xq+OFF"). Other
weights (k-quants, q5_0, ...) keep the float32 kernels on the float32 x, which is still written.

It is an approximate path (x rounded to 8 bits per block, as llama.cpp does): a runtime runs it only when asked
(`--activations int8`, KILN_ACTIVATIONS=int8) on an adapter of its class with the WGSL language feature it needs
(manifest `program_variants`), never by default. See ARCHITECTURE.md, "CPU adapters".
"""
from __future__ import annotations

from .errors import UnsupportedModelError
from .ir import split_ref
from .kernels import AttentionReduce
from .kernels_cpu import UNIFORM_BINDING_BYTES
from .kernels_i8 import I8_QUANTS, MatmulCPUI8, MatvecCPUI8, QuantizeAct, xq_words
from .schedule import CPU_WINDOW, DECODE_SPLITS, PREFILL_TILE, Builder
from .schedule_cpu_attention import cpu_kv_textures

# "<adapter class>_i8": (programs); a variant runs where its adapter class would run "<program>@<class>"
I8_VARIANTS = {"cpu_i8": ("prefill", "decode", "score")}
ACTIVATIONS = ("f32", "int8")   # the runtimes' --activations / KILN_ACTIVATIONS choices


def i8_window(k: int) -> int:
    """xq rows per window of the CPU-adapter prefill for row length K: a power of two <= CPU_WINDOW whose window fits
    a uniform binding and whose byte size is a multiple of 256 (uniform offsets); 0 if none."""
    t = CPU_WINDOW
    while t >= 1:
        nbytes = t * xq_words(k) * 4
        if nbytes <= UNIFORM_BINDING_BYTES and nbytes % 256 == 0:
            return t
        t //= 2
    return 0


def i8_fits(wr) -> bool:
    """Whether the mat-vec of weight `wr` has an int8 kernel: an int8 dot for its scheme, xq (K / 32 blocks of 48
    bytes) within a uniform binding."""
    return wr.quant in I8_QUANTS and wr.k % 32 == 0 and xq_words(wr.k) * 4 <= UNIFORM_BINDING_BYTES


class BuilderI8(Builder):
    """Builder of the `<program>@cpu_i8` variants: Builder's model walk (adapter "cpu"), with the int8 kernels for
    every mat-vec / mat-mat where `i8_fits` (decode: matvec_cpu_i8; prefill / score: matmul_cpu_i8 per xq window,
    the last-token LM head matvec_cpu_i8 on its window), each after a quantize_act of its x."""

    def __init__(self, cfg, weights, tile: int, score: bool = False, chunk: int = 128, kv_tex: bool = False):
        super().__init__(cfg, weights, tile, score=score, adapter="cpu", chunk=chunk, kv_tex=kv_tex)
        # (x, K, norm weight, step index) of the quantize_act that last wrote xq
        self._xq: tuple[str, int, str | None, int] | None = None
        self._xn, self._xn_step = None, 0   # (x, weight) whose norm the deferred-norm fallback last wrote to xn

    def matmul(self, x: str | None, w: str, y: str, *, n_offset=0, n_stride=None, residual=False, gate=None,
               up: str | None = None, last_only=False, pre=None):
        """pre (decode fusion, schedule.py): ("norm", src, weight) -> the norm is fused into quantize_act;
        ("reduce",) -> attention_reduce runs, then quantize_act of its output."""
        wr = self.W(w)
        ur = self.W(up) if up else None
        window = i8_window(wr.k) if self.tile > 1 else 1
        if not i8_fits(wr) or not window:
            if pre and pre[0] == "norm" and not self.fuse_prologues:   # our pre_norm's deferred norm: run it here
                if self._xn != pre[1:] or self.written_since(pre[1], self._xn_step):
                    self.rmsnorm(pre[1], pre[2], "xn", width=wr.k)
                    self._xn, self._xn_step = pre[1:], len(self.p.steps)
                x, pre = "xn", None
            return super().matmul(x, w, y, n_offset=n_offset, n_stride=n_stride, residual=residual, gate=gate,
                                  up=up, last_only=last_only, **({"pre": pre} if pre else {}))
        if ur and ur.quant != wr.quant:
            raise UnsupportedModelError(f"{w} and {up} have different types ({wr.quant}, {ur.quant})")
        if pre and pre[0] == "norm":
            self.quantize(pre[1], wr.k, norm=pre[2])
        elif pre:   # "reduce": the split-K partials into attn first
            c = self.cfg
            self.p.add(AttentionReduce(), ["attn_part", "attn"],
                       dict(n_head=c.n_head, head_dim=c.head_dim, splits=DECODE_SPLITS), [c.n_head, "T", 1])
            self.quantize("attn", wr.k)
        else:
            self.quantize(x, wr.k)
        for i, (row0, rows) in enumerate(wr.parts):
            bind = [wr.ref(i)] + ([ur.ref(i)] if ur else []) + [y]
            params = dict(k=wr.k, rows=rows, n_offset=n_offset + row0, n_stride=n_stride or wr.rows,
                          last_only=int(last_only))
            if self.tile == 1:   # decode: token 0's xq
                k = MatvecCPUI8(quant=wr.quant, xk=wr.k, gate=gate, residual=residual)
                self.p.add(k, ["xq", *bind], params, [-(-rows // k.rows), 1 if last_only else "T/1", 1])
                continue
            for t0 in range(0, self.chunk, window):   # prefill / score: a step per xq window (schedule.py's CPU windows)
                xw = f"xq+{t0 * xq_words(wr.k) * 4}" if t0 else "xq"
                if last_only:   # the LM head on token T-1: the window holding it
                    k = MatvecCPUI8(quant=wr.quant, xk=wr.k, tokens=window, gate=gate, residual=residual)
                    self.p.add(k, [xw, *bind], params, [-(-rows // k.rows), f"T>{t0}", f"T<={t0 + window}"])
                else:
                    k = MatmulCPUI8(quant=wr.quant, xk=wr.k, tokens=window, gate=gate, residual=residual)
                    self.p.add(k, [xw, *bind], dict(params, t0=t0), [-(-rows // k.rows_per_wg), f"T>{t0}", 1])

    def pre_norm(self, x: str, weight: str, k: int):
        """Decode: the norm is deferred to the consuming mat-vec, which fuses it into its quantize_act (or, for a
        weight without an int8 kernel, runs it then); prefill / score: as Builder."""
        if self.fuse and k % 32 == 0:
            return ("norm", x, weight)
        return super().pre_norm(x, weight, k)

    def quantize(self, x: str, k: int, norm: str | None = None):
        """xq = int8(x) (norm: of rmsnorm(x) * that weight, fused) for K = k, unless xq already holds it and no step
        since has written x."""
        if self._xq and self._xq[:3] == (x, k, norm) and not self.written_since(x, self._xq[3]):
            return
        if norm:
            self.p.add(QuantizeAct(norm=True), [x, self.W(norm).ref(0), "xq"], dict(k=k, eps=self.cfg.rms_eps),
                       [1, "T", 1])
        else:
            self.p.add(QuantizeAct(), [x, "xq"], dict(k=k), [1, "T", 1])
        self._xq = (x, k, norm, len(self.p.steps))

    def written_since(self, buf: str, i: int) -> bool:
        """Whether a step from index i on binds `buf` read_write."""
        for s in self.p.steps[i:]:
            for ref, (_, access) in zip(s.bind, s.kernel.bindings()):
                if access == "read_write" and split_ref(ref)[0] == buf:
                    return True
        return False


def build_i8_programs(cfg, weights, chunks: dict[str, int]) -> dict:
    """{"prefill@cpu_i8": Program, ...} (I8_VARIANTS), without those where no mat-vec of the model has an int8
    kernel."""
    out = {}
    for cls, names in I8_VARIANTS.items():
        for name in names:
            prog = BuilderI8(cfg, weights, 1 if name == "decode" else PREFILL_TILE, score=name == "score",
                             chunk=chunks[name], kv_tex=cpu_kv_textures(cfg, chunks)).build()
            if any(isinstance(s.kernel, (MatvecCPUI8, MatmulCPUI8)) for s in prog.steps):
                out[f"{name}@{cls}"] = prog
    return out


def xq_buffer(programs: dict) -> dict:
    """The activation buffer the int8 variants add: {"xq": {shape: ["T", words], dtype, programs}}, or {} if none
    binds it. Words per token: the largest K any of its quantize_act steps writes (compiler/kernels_i8.py layout)."""
    ks = [dict(zip((n for n, _ in s.kernel.params), s.params))["k"]
          for p in programs.values() for s in p.steps if isinstance(s.kernel, QuantizeAct)]
    if not ks:
        return {}
    progs = list(dict.fromkeys(n.split("@")[0] for n, p in programs.items()
                               if any("xq" in s.bind for s in p.steps)))
    return {"xq": {"shape": ["T", xq_words(max(ks))], "dtype": "u32", "programs": progs}}


def program_variants(programs: dict) -> dict:
    """The manifest's `program_variants`: per `<program>@<variant>`, the adapter class that runs it, its activations
    and the WGSL language features its kernels need (the runtimes check those before choosing it)."""
    out = {}
    for name, p in programs.items():
        if "@" not in name:
            continue
        variant = name.split("@", 1)[1]
        feats = sorted({f for s in p.steps for f in getattr(s.kernel, "language_features", ())})
        out[name] = {"adapter": variant.removesuffix("_i8"), "activations": "int8" if variant.endswith("_i8") else "f32",
                     "wgsl_language_features": feats}
    return out
