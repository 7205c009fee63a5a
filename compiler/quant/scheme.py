"""A quantization scheme, declared once: its GGUF block, its packed regions, its WGSL reader.

GGUF stores a quantized row as a run of blocks, each block = small header (f16 scale, maybe a min / high bits) followed by
packed integers. Many block sizes (Q4_0: 18 bytes, Q8_0: 34 bytes) are not multiples of 4, and WGSL can only read u32, so
every scheme repacks a (rows, K) matrix *without changing a single bit of information* into a planar, u32-aligned
layout: the same bytes, grouped by kind, region after region (nb = rows * K / block_size blocks):

    region 0: packed integers   (nb, words) u32    -- e.g. the block's `qs` bytes, unchanged
    region 1..: extras, scales  (nb, words) u32    -- e.g. Q5_0's high bits, Q4_K's 12 scale bytes
    last region may be halves   f16 values, two per u32 across blocks (`unpack2x16float` in WGSL, no shader-f16)

Each scheme lists its `regions` (name, byte range within a GGUF block, halves or not) and nothing else about the
layout: `pack` (GGUF bytes -> words), `packed_words` (the size, by formula: the plan stage sizes weights without packing
them), `offset` (where a region starts, used by `dequantize_packed`) and `layout()` (the word counts and offsets the
`_quant_*.wgsl.j2` readers render into WGSL) all derive from it. Region offsets are multiples of nb, a function of
(rows, K) alone, so a kernel computes them from its uniforms; nothing else is stored. The packed size equals the GGUF size
up to a few bytes of u32 padding: the GPU holds exactly the quantized weights.

Each scheme also has `dequantize_packed`, a numpy reading of its own packed layout. Tests compare it bit-exactly with
`gguf.quants.dequantize` on the original blocks, so the layout declared here is the layout the kernels read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UnsupportedModelError

GROUP = 32  # every kernel consumes weights 32 at a time; K must be a multiple of 32


@dataclass(frozen=True)
class Region:
    """Bytes [start, stop) of every GGUF block, stored together: as u32 words, or (halves) as f16 pairs."""
    name: str
    start: int
    stop: int
    halves: bool = False

    @property
    def words(self) -> int:
        """u32 words per block (a halves region has no whole-word count per block)."""
        assert not self.halves and (self.stop - self.start) % 4 == 0, self
        return (self.stop - self.start) // 4

    def take(self, blocks: np.ndarray) -> np.ndarray:
        """(nb, block_bytes) uint8 -> this region's u32 words."""
        b = blocks[:, self.start:self.stop]
        return f16_pairs(b.copy().view(np.uint16)) if self.halves else u32(b)


def f16_pairs(h: np.ndarray) -> np.ndarray:
    """(n,) f16 bit patterns (u16) -> (ceil(n/2),) u32, element 2i in the low half (what unpack2x16float reads)."""
    h = np.ascontiguousarray(h, dtype=np.uint16).reshape(-1)
    if h.size % 2:
        h = np.concatenate([h, np.zeros(1, np.uint16)])
    return h.view(np.uint32)


def u32(b: np.ndarray) -> np.ndarray:
    """(..., 4k) uint8 -> (..., k) u32 little-endian, flattened."""
    return np.ascontiguousarray(b).reshape(-1).view(np.uint32)


def halves_from(packed: np.ndarray, start: int, n: int) -> np.ndarray:
    """n f16 values starting at word `start` -> (n,) float32."""
    return packed[start:].view(np.uint16)[:n].view(np.float16).astype(np.float32)


class QuantScheme:
    """A tensor type as the GPU sees it. Concrete subclasses register themselves in `registry` by `name`: the GGUF
    types (ggml_type set) and kiln's own re-quantization targets (ggml_type None, compiler/quant/q4g.py)."""
    name: ClassVar[str]
    ggml_type: ClassVar[T | None]
    block_size: ClassVar[int]          # elements per block
    block_bytes: ClassVar[int]         # bytes per GGUF block
    regions: ClassVar[tuple[Region, ...]]

    registry: ClassVar[dict[str, type["QuantScheme"]]] = {}   # every scheme, by manifest name

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:   # concrete schemes only (not shared bases like _KQuant)
            assert all(not r.halves for r in cls.regions[:-1]), f"{cls.name}: only the last region may be halves"
            QuantScheme.registry[cls.name] = cls

    # -- the declaration's consequences ------------------------------------------------------------------------
    @classmethod
    def check_k(cls, k: int):
        """Kernels read 32 weights at a time; a K-quant row is whole 256-element super-blocks."""
        if cls.block_size > GROUP and k % cls.block_size:
            raise UnsupportedModelError(f"{cls.ggml_type.name} row length {k} is not a multiple of {cls.block_size}")
        if cls.block_size > 1 and k % GROUP:
            raise UnsupportedModelError(f"row length {k} is not a multiple of {GROUP}")

    @classmethod
    def n_blocks(cls, rows: int, k: int) -> int:
        return rows * k // cls.block_size

    @classmethod
    def offset(cls, region: str, nb: int) -> int:
        """First word of `region` in a tensor of nb blocks (every region before it has whole words per block)."""
        words = 0
        for r in cls.regions:
            if r.name == region:
                return nb * words
            words += r.words
        raise KeyError(f"{cls.name} has no region {region!r}")

    @classmethod
    def region_words(cls, r: Region, rows: int, k: int) -> int:
        nb = cls.n_blocks(rows, k)
        return -(-nb * (r.stop - r.start) // 4) if r.halves else nb * r.words

    @classmethod
    def packed_words(cls, rows: int, k: int) -> int:
        """Size of the packed tensor in u32 words, by formula (nothing is packed to measure it)."""
        cls.check_k(k)
        return sum(cls.region_words(r, rows, k) for r in cls.regions)

    @classmethod
    def layout(cls) -> dict:
        """What a `_quant_*.wgsl.j2` reader renders (as `quant`): words per block and the word offset (in blocks) of
        every whole-word region, and the halves region's offset."""
        words, off, at = {}, {}, 0
        for r in cls.regions:
            off[r.name] = at
            if not r.halves:
                words[r.name] = r.words
                at += r.words
        return {"name": cls.name, "reader": cls.reader(), "block": cls.block_size, "words": words, "off": off}

    @classmethod
    def reader(cls) -> str:
        """The WGSL reader template (shaders/), imported by matmul / embed with the kernel's context."""
        return f"_quant_{cls.name}.wgsl.j2"

    # -- packing (offline, numpy) ---------------------------------------------------------------------------------
    @classmethod
    def blocks(cls, raw: np.ndarray, rows: int, k: int) -> np.ndarray:
        """Raw GGUF bytes of a (rows, K) tensor -> (rows * K / block_size, block_bytes) uint8."""
        cls.check_k(k)
        return np.ascontiguousarray(raw, dtype=np.uint8).reshape(cls.n_blocks(rows, k), cls.block_bytes)

    @classmethod
    def pack(cls, raw: np.ndarray, rows: int, k: int) -> np.ndarray:
        """GGUF bytes -> planar u32 words (the GPU buffer): the declared regions, in order."""
        b = cls.blocks(raw, rows, k)
        return np.concatenate([r.take(b) for r in cls.regions])

    @classmethod
    def dequantize_packed(cls, packed: np.ndarray, rows: int, k: int) -> np.ndarray:
        """Numpy reading of the packed layout -> (rows, K) float32; the kernels' reference."""
        raise NotImplementedError(cls.name)


def scheme_named(name: str) -> type[QuantScheme]:
    """Any scheme by its manifest name: a GGUF type's or kiln's own."""
    if name not in QuantScheme.registry:
        raise KeyError(f"no quantization scheme {name!r} (known: {', '.join(QuantScheme.registry)})")
    return QuantScheme.registry[name]


def scheme_for(ggml_type: T) -> type[QuantScheme]:
    """The scheme of a GGUF tensor type (clear error naming the supported types otherwise)."""
    gguf = [s for s in QuantScheme.registry.values() if s.ggml_type is not None]
    for s in gguf:
        if s.ggml_type == ggml_type:
            return s
    supported = ", ".join(sorted(s.ggml_type.name for s in gguf))
    raise UnsupportedModelError(f"tensor type {ggml_type.name} is not supported (supported: {supported})")
