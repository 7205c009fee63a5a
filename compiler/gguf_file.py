"""Stage 1 — read the GGUF file (memory-mapped with the `gguf` package) and check it is whole.

Everything later reads tensors through `GGUFModel`, so a truncated or corrupt file fails here with a one-line reason
instead of deep inside packing.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"


QUOTE_CHARS = 80            # file content quoted in an error message: at most this many characters of it


def escape(value, limit: int = QUOTE_CHARS) -> str:
    """File content (a key, a name, a string value) made safe for a one-line error message: at most `limit` characters
    of it, every non-printable character (newlines, terminal escape codes, bidi overrides) written as its Python
    escape (\\n, \\x1b, \\u202e) so that it prints and never acts, and the full length when cut. Every message that
    shows text read from a model file goes through here (or `quote`), so one "error:" line stays one short line."""
    s = value.decode("utf-8", "backslashreplace") if isinstance(value, (bytes, bytearray)) else str(value)
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    return out + (f"... ({len(s)} characters)" if len(s) > limit else "")


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """`escape` in single quotes: architecture 'mamba'."""
    return f"'{escape(value, limit)}'"


def _first_line(e: Exception) -> str:
    """An exception's message (which may embed file content) as one short, escaped line."""
    text = str(e).strip()
    return escape(text.splitlines()[0], 2 * QUOTE_CHARS) if text else ""


# GGUF value types (gguf.GGUFValueType) -> byte size of one scalar; 8 = STRING, 9 = ARRAY
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
GGUF_DEFAULT_ALIGNMENT = 32
# Bounds on the tensor table, far above any real model (ggml itself: 4 dims, 64-byte names) and far below what would
# overflow an offset computation: a value past them is a corrupt or hostile file.
MAX_ALIGNMENT = 1 << 16
MAX_NAME_BYTES = 256
MAX_DIMS = 4
MAX_DIM = 1 << 31
MAX_ELEMENTS = 1 << 40


def check_layout(path: Path, size: int):
    """Walk the header with bounds checks before gguf.GGUFReader parses it. The reader trusts every count: a corrupt
    array length makes it loop (and allocate a list entry) for up to 2^64 elements past the end of the file instead of
    failing, so a flipped byte would hang the compiler. Here every length is checked against the bytes left."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        def fail(what: str, off: int, n: int):
            raise GGUFError(f"{path}: truncated or corrupt GGUF: {what} at byte {off} needs {n} bytes "
                            f"but the file has {size}")

        if size < 24:
            fail("the header", 0, 24)
        e = ">" if struct.unpack_from("<I", mm, 4)[0] & 0xFFFF == 0 else "<"   # big-endian files exist
        n_tensors, n_kv = struct.unpack_from(e + "QQ", mm, 8)
        u32, u64, u32u64 = struct.Struct(e + "I"), struct.Struct(e + "Q"), struct.Struct(e + "IQ")
        off = 24
        if n_kv * 13 > size - off:          # smallest entry: empty key (8) + type (4) + one byte
            fail(f"{n_kv} metadata entries", off, n_kv * 13)

        def string(off: int, what: str) -> int:
            if off + 8 > size:
                fail(what, off, 8)
            n = u64.unpack_from(mm, off)[0]
            if off + 8 + n > size:
                fail(what, off, 8 + n)
            return off + 8 + n

        def value(t: int, off: int, key: str, depth: int = 0) -> int:
            if t in _SCALAR_BYTES:
                if off + _SCALAR_BYTES[t] > size:
                    fail(f"metadata {key}", off, _SCALAR_BYTES[t])
                return off + _SCALAR_BYTES[t]
            if t == _STRING:
                return string(off, f"metadata {key}")
            if t != _ARRAY or depth > 4:
                raise GGUFError(f"{path}: corrupt GGUF: metadata {key} has unknown value type {t} (byte {off - 4})")
            if off + 12 > size:
                fail(f"metadata {key}", off, 12)
            it, count = u32u64.unpack_from(mm, off)
            off += 12
            item = _SCALAR_BYTES.get(it, 8 if it == _STRING else 12)
            if count * item > size - off:
                fail(f"metadata {key} ({count} items)", off, count * item)
            if it in _SCALAR_BYTES:
                return off + count * item
            if it == _STRING:
                for _ in range(count):
                    off = string(off, f"metadata {key}")
                return off
            for _ in range(count):
                off = value(it, off, key, depth + 1)
            return off

        keys, alignment = set(), GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            end = string(off, f"metadata key #{i}")
            raw_key = mm[off + 8:end]
            key = quote(raw_key)
            if raw_key in keys:
                raise GGUFError(f"{path}: corrupt GGUF: metadata key {key} appears twice (byte {off})")
            keys.add(raw_key)
            if end + 4 > size:
                fail(f"metadata {key}", end, 4)
            t = u32.unpack_from(mm, end)[0]
            if raw_key == b"general.alignment":
                if t != 4:   # UINT32, as the spec (and gguf.GGUFReader) require
                    raise GGUFError(f"{path}: corrupt GGUF: general.alignment has value type {t}, not UINT32")
                alignment = u32.unpack_from(mm, end + 4)[0] if end + 8 <= size else 0
                if not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
                    raise GGUFError(f"{path}: corrupt GGUF: general.alignment = {alignment} is not a power of two "
                                    f"<= {MAX_ALIGNMENT}")
            off = value(t, end + 4, key)
        if n_tensors * 24 > size - off:      # smallest tensor info: empty name, no dims, type, offset
            fail(f"{n_tensors} tensor infos", off, n_tensors * 24)
        infos = []                           # (name, dims, ggml type, offset relative to the data section)
        for i in range(n_tensors):
            end = string(off, f"tensor info #{i}")
            name = mm[off + 8:end]
            if end + 4 > size:
                fail(f"tensor info #{i}", end, 4)
            n_dims = u32.unpack_from(mm, end)[0]
            if n_dims > 8:
                raise GGUFError(f"{path}: corrupt GGUF: tensor info #{i} has {n_dims} dimensions (byte {end})")
            off = end + 4 + 8 * n_dims + 12
            if off > size:
                fail(f"tensor info #{i}", end, off - end)
            dims = struct.unpack_from(e + "Q" * n_dims, mm, end + 4)
            ggml_type, rel = struct.unpack_from(e + "IQ", mm, end + 4 + 8 * n_dims)
            infos.append((name, dims, ggml_type, rel))
        data_start = -(-off // alignment) * alignment
        check_tensor_table(path, infos, data_start, size, alignment)


def check_tensor_table(path: Path, infos: list, data_start: int, size: int, alignment: int):
    """Every tensor info must describe a real, sane block of the file: a UTF-8 name seen once, 1..4 dimensions each in
    [1, MAX_DIM] (a 0-sized dimension used to crash packing; products past 2^64 wrap in gguf.GGUFReader's numpy
    arithmetic), a known ggml type whose block size divides the row, an offset aligned to `general.alignment`, and
    bytes inside the file that no other tensor claims. Python integers here: nothing can wrap around."""
    def bad(i, name, msg):
        who = f"tensor {quote(name)}" if name is not None else f"tensor info #{i}"
        return GGUFError(f"{path}: corrupt GGUF: {who} {msg}")

    seen, spans = set(), []
    for i, (raw, dims, ggml_type, rel) in enumerate(infos):
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(i, None, f"has a name that is not UTF-8 ({quote(raw)})") from None
        if not name or len(raw) > MAX_NAME_BYTES:
            raise bad(i, name if name else None, f"has a name of {len(raw)} bytes (1..{MAX_NAME_BYTES} allowed)")
        if name in seen:
            raise bad(i, name, "appears twice in the tensor table")
        seen.add(name)
        if not 1 <= len(dims) <= MAX_DIMS:
            raise bad(i, name, f"has {len(dims)} dimensions (1..{MAX_DIMS} allowed)")
        if not all(1 <= d <= MAX_DIM for d in dims):
            raise bad(i, name, f"has dimensions {list(dims)} (each must be in 1..{MAX_DIM})")
        n = math.prod(dims)
        if n > MAX_ELEMENTS:
            raise bad(i, name, f"has {n} elements (more than {MAX_ELEMENTS})")
        try:
            qt = gguf.GGMLQuantizationType(ggml_type)
            block, type_bytes = gguf.GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise bad(i, name, f"has unknown ggml type {ggml_type}") from None
        if dims[0] % block:
            raise bad(i, name, f"has rows of {dims[0]} values, not a multiple of {qt.name}'s block of {block}")
        n_bytes = n // block * type_bytes
        if rel % alignment:
            raise bad(i, name, f"starts at data offset {rel}, not a multiple of the alignment {alignment}")
        if data_start + rel + n_bytes > size:
            raise bad(i, name, f"needs bytes {data_start + rel}..{data_start + rel + n_bytes} but the file has "
                               f"{size} (truncated or a corrupt offset)")
        spans.append((rel, rel + n_bytes, name))
    spans.sort()
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GGUFError(f"{path}: corrupt GGUF: tensors {quote(a)} (data bytes {a0}..{a1}) and {quote(b)} "
                            f"(from {b0}) overlap")


# ggml type -> (block bytes, byte offsets of the block's f16 scale fields): a quantized block's values are its small
# integers times these scales, so they are finite iff the scales are (gguf.quants' block layouts).
_F16_FIELDS = {"Q4_0": (18, (0,)), "Q4_1": (20, (0, 2)), "Q5_0": (22, (0,)), "Q5_1": (24, (0, 2)), "Q8_0": (34, (0,)), "IQ4_NL": (18, (0,)),
               "Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
               "Q6_K": (210, (208,))}


def check_finite(path: Path, t: "TensorInfo"):
    """A NaN or infinity in a weight (or in a block's scale) makes every logit NaN: the model would "run" and print
    nothing. Refused here, by tensor name. Checks the f16 scales of quantized blocks, not the dequantized values, so it
    costs a pass over a few percent of the bytes."""
    kind = t.ggml_type.name
    raw = np.asarray(t.data).reshape(-1)
    if kind in ("F32", "F16", "BF16"):
        vals = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind])
        if kind == "BF16":   # exponent all ones = inf or NaN
            bad = np.flatnonzero((vals & 0x7F80) == 0x7F80)
        else:
            bad = np.flatnonzero(~np.isfinite(vals))
    elif kind in _F16_FIELDS:
        block, offsets = _F16_FIELDS[kind]
        blocks = raw.reshape(-1, block)
        bad = np.concatenate([np.flatnonzero(~np.isfinite(np.ascontiguousarray(blocks[:, o:o + 2]).view(np.float16)
                                                          .reshape(-1))) for o in offsets])
    else:
        return   # a type kiln does not read: refused by name when packing
    if bad.size:
        raise GGUFError(f"{path}: tensor {quote(t.name)} holds {bad.size} non-finite value(s) (NaN or infinity; "
                        f"first at {'element' if kind in ('F32', 'F16', 'BF16') else 'block'} {int(bad.min())})")


@dataclass
class TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]   # numpy order: (rows, K) for a matrix, (n,) for a vector
    n_bytes: int
    data: np.ndarray         # raw bytes (uint8 memmap view)


class GGUFModel:
    """A GGUF file: metadata fields and tensors by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: not a file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        check_layout(self.path, size)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on damaged headers,
            # and on tensor data cut short (it maps every tensor while parsing)
            raise GGUFError(f"{self.path}: corrupt or truncated GGUF file of {size} bytes "
                            f"({type(e).__name__}: {_first_line(e)})") from None
        for f in self.reader.fields.values():   # decode every field now (~0.1 s): bad UTF-8 fails here, by name
            try:
                f.contents()
            except Exception as e:
                raise GGUFError(f"{self.path}: metadata field {quote(f.name)} is corrupt ({_first_line(e)})") from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise GGUFError(f"{self.path}: truncated: tensor {t.name} ends at byte {end} but the file has {size}")
            raw = np.asarray(self.reader.data[t.data_offset:end])
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, t.tensor_type, shape, int(t.n_bytes), raw)
            check_finite(self.path, self.tensors[t.name])
        self.file_bytes = size

    def get(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: metadata field {key} is corrupt ({_first_line(e)})") from None

    def require(self, key: str):
        v = self.get(key)
        if v is None:
            raise GGUFError(f"{self.path}: metadata field {key} is missing")
        return v

    @property
    def arch(self) -> str:
        return str(self.require("general.architecture"))

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name} is missing")
        return self.tensors[name]
