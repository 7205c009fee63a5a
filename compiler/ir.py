"""The types the compiler's stages hand each other. Every stage imports this module; it imports no stage.

    WeightRef   a planned weight (stage 3, plan.py): scheme, shape, row parts -- what the schedule binds
    Step        one kernel dispatch (stage 4, schedule.py): kernel, buffer refs, uniform values, workgroup counts
    Program     a flat list of steps the runtimes replay verbatim

Sizes and alignments every stage agrees on live here too: a part is at most SHARD_BYTES (one shard file, and below
the 128 MiB storage-binding limit every WebGPU adapter grants) and starts at a PART_ALIGN-byte offset in its shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedModelError

SHARD_BYTES = 64 << 20   # max bytes per shard file and per part (browser-friendly downloads, < any binding limit)
PART_ALIGN = 256         # each part starts at a multiple of this many bytes in its shard (zero padding between)
MAX_WORKGROUPS = 65535   # per dispatch dimension (WebGPU's default maxComputeWorkgroupsPerDimension)
# a weight part bound as a "texture" (the CPU-adapter kernels, compiler/kernels_cpu.py TEXTURE_QUANTS) is an rgba32uint
# texture_2d of this many texels per row (64 KiB: 4 packed u32 words per texel), as many rows as the part needs
# (SHARD_BYTES / 64 KiB = 1024 <= 8192, WebGPU's default maxTextureDimension2D); runtimes upload it that way
# (runtime_py/weight_texture.py, web/weight_texture.js)
TEXTURE_WIDTH = 4096
# ... and its quants region holds the rows TEXTURE_ROWS at a time, texel by texel: texel c of rows 8j .. 8j + 7 are 8
# adjacent texels, so the SIMD lanes of a CPU adapter (one row each) fetch one contiguous run; the rows are padded to
# a multiple of TEXTURE_ROWS, the scale region follows unchanged (runtime_py/weight_texture.py interleave)
TEXTURE_ROWS = 8


@dataclass(frozen=True)
class WeightRef:
    """A weight as the GPU will hold it, planned by formula before anything is packed."""
    name: str
    quant: str                        # the packed scheme's name (compiler/quant), e.g. "q4_1", "q4g128"
    rows: int
    k: int                            # row length
    parts: tuple[tuple[int, int], ...]   # (row0, rows) per part; each part is one GPU buffer

    def ref(self, part: int) -> str:
        """The buffer ref a step binds: "tensor#part"."""
        return f"{self.name}#{part}"


def split_ref(ref: str) -> tuple[str, int]:
    """"xn+9216" -> ("xn", 9216); "xn" -> ("xn", 0): a buffer ref and the byte offset it binds at."""
    name, _, off = ref.partition("+")
    return name, int(off or 0)


@dataclass(frozen=True)
class Step:
    """One dispatch. JSON: {"kernel": name, "bind": [refs, binding 2..], "params": [values], "dispatch": [x, y, z]}.
    A buffer ref is an activation buffer name (e.g. "x", "k_cache.3"), optionally with a byte offset ("xn+9216": a
    uniform x window of the CPU-adapter kernels), or a weight part "tensor#part"; a dispatch entry is an int, "T/n" =
    ceil(T / n), or "T>n" / "T<=n" (1 or 0), T = tokens in this forward (see `dispatch_size`)."""
    kernel: Any                       # a compiler.kernels.Kernel (frozen dataclass)
    bind: tuple[str, ...]
    params: tuple                     # values in kernel.params order
    dispatch: tuple

    def json(self) -> dict:
        return {"kernel": self.kernel.name, "bind": list(self.bind), "params": list(self.params),
                "dispatch": list(self.dispatch)}


@dataclass
class Program:
    steps: list[Step] = field(default_factory=list)

    def add(self, kernel, bind: list[str], params: dict, dispatch: list):
        """Appends a step, checking it against the kernel's declared uniforms and bindings."""
        names = [n for n, _ in kernel.params]
        if set(params) != set(names):
            raise AssertionError(f"{kernel.name}: params {sorted(params)} != {names}")
        if len(bind) != len(kernel.bindings()):
            raise AssertionError(f"{kernel.name}: {len(bind)} buffers for {len(kernel.bindings())} bindings")
        for d in dispatch:
            if isinstance(d, int) and d > MAX_WORKGROUPS:
                raise UnsupportedModelError(f"{kernel.name}: {d} workgroups exceed {MAX_WORKGROUPS} per dimension")
        self.steps.append(Step(kernel, tuple(bind), tuple(params[n] for n in names), tuple(dispatch)))

    def json(self) -> list[dict]:
        return [s.json() for s in self.steps]


def dispatch_size(dim, n_tokens: int) -> int:
    """Reference evaluation of a dispatch entry; runtime_py and web/ implement exactly this. "T>n" / "T<=n": 1 or 0
    (a step for the x window of tokens n.. runs only when the chunk reaches it); a 0 entry skips the step."""
    if isinstance(dim, int):
        return dim
    assert dim.startswith("T"), dim
    if dim.startswith("T>"):
        return int(n_tokens > int(dim[2:]))
    if dim.startswith("T<="):
        return int(n_tokens <= int(dim[3:]))
    div = int(dim[2:]) if "/" in dim else 1
    return -(-n_tokens // div)
