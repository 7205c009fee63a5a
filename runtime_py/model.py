"""Load a compiled artifact onto the GPU and replay its programs. Mirrors web/engine.js step for step.

    Model    — what every sequence shares: device, pipelines, weight buffers, the per-step uniform buffer.
    Session  — one sequence: activation buffers, its KV cache, bind groups; `forward(ids)` runs prefill or decode.

Nothing here knows the architecture: the manifest's programs say which kernel runs on which buffers.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import wgpu

from compiler.errors import ArtifactError, ContextOverflowError, KilnError
from compiler.kernels_i8 import DOT4I8
from compiler.manifest import check_file, read_manifest
from compiler.schedule import GENERATE, SAMPLE_RING, dispatch_size, split_ref

from .device import adapter_class, check_fits, get_device, supports_dot4i8
from .kv_texture import KV_ACCESSES, create_kv_texture, kv_layout_entry
from .weight_texture import BINDING_TYPES, layout_entry, upload_texture  # noqa: F401  (BINDING_TYPES: re-exported)

UNIFORM_ALIGN = 256          # minUniformBufferOffsetAlignment's default (and maximum)
UNIFORM_BINDING_MAX = 65536  # maxUniformBufferBindingSize's default: an activation bound as "uniform" binds this much
STATE_BYTES = 16             # struct State { n_tokens, pos0, step, pad }; one record per decode step of a submit,
                             # UNIFORM_ALIGN apart, bound with a dynamic offset
DEFAULT_CTX = 2048



def session_buffer_bytes(manifest: dict, ctx: int, programs=GENERATE) -> dict[str, int]:
    """The buffers a session allocates to run `programs` (a generating session: prefill + decode), with their sizes.
    A buffer bound only by other programs (`logits_all`: score) is allocated when one of those first runs."""
    sizes = buffer_bytes(manifest, ctx)
    return {n: sizes[n] for n, b in manifest["buffers"].items() if set(b.get("programs", programs)) & set(programs)}


def buffer_bytes(manifest: dict, ctx: int) -> dict[str, int]:
    """Byte size of each activation / KV buffer, with T = prefill chunk and ctx substituted (4-byte elements)."""
    sym = {"T": manifest["limits"]["prefill_chunk"], "ctx": ctx}
    out = {}
    for name, b in manifest["buffers"].items():
        n = 1
        for d in b["shape"]:
            n *= sym[d] if isinstance(d, str) else d
        out[name] = max(16, 4 * n)
    return out


def pack_params(kernel: dict, values: list) -> bytes:
    dtypes = {"u32": np.uint32, "f32": np.float32}
    words = [np.array(v, dtype=dtypes[t]).view(np.uint32) for (_, t), v in zip(kernel["params"], values)]
    return np.array(words, dtype=np.uint32).tobytes()


def requested_activations(activations: str | None = None) -> str:
    """"f32" | "int8": the argument, else KILN_ACTIVATIONS, else "f32" (the exact path). Mirrors web/engine.js."""
    from compiler.schedule_i8 import ACTIVATIONS
    a = activations or os.environ.get("KILN_ACTIVATIONS") or "f32"
    if a not in ACTIVATIONS:
        raise KilnError(f"activations must be one of {', '.join(ACTIVATIONS)} (got {a!r}; --activations / "
                        "KILN_ACTIVATIONS)")
    return a


def choose_programs(manifest: dict, cls: str, activations: str = "f32", language_features=frozenset()):
    """({program: the variant to run}, activations they use, note): programs["decode@cpu"] replaces "decode" on a CPU
    adapter; with activations "int8", "decode@cpu_i8" replaces that where the artifact has it and the adapter has the
    WGSL language features it needs (manifest program_variants), else f32 runs and `note` says why. Mirrors
    web/engine.js choosePrograms."""
    progs, pv = manifest["programs"], manifest.get("program_variants", {})
    out = {p: f"{p}@{cls}" if f"{p}@{cls}" in progs else p for p in progs if "@" not in p}
    note = None
    if activations == "int8":
        i8 = {p: f"{p}@{cls}_i8" for p in out if f"{p}@{cls}_i8" in progs}
        missing = sorted({f for v in i8.values() for f in pv.get(v, {}).get("wgsl_language_features", [])}
                         - set(language_features))
        if not i8:
            note = (f"this artifact has no int8-activation programs for {cls} adapters (only CPU adapters have "
                    "them; an older artifact: recompile); running float32 activations")
        elif missing:
            note = f"the adapter lacks WGSL {', '.join(missing)}; running float32 activations"
        else:
            out.update(i8)
    used = "int8" if any(v.endswith("_i8") for v in out.values()) else "f32"
    return out, used, note


class Model:
    def __init__(self, art_dir, *, device=None, progress=None, activations: str | None = None):
        """activations: "f32" (default) | "int8" (the CPU adapters' int8-activation variants, approximate; None:
        KILN_ACTIVATIONS). What runs is `self.activations`; `self.activations_note` says why int8 did not."""
        self.dir = Path(art_dir)
        self.manifest = m = read_manifest(self.dir)
        self.config = m["config"]
        tok = m["tokenizer"]      # loaded by runtime_py/tokenizer.py; checked here, with every other file
        check_file(self.dir, tok["file"], tok["sha256"], "tokenizer")
        want = requested_activations(activations)
        self.device = device or get_device()
        check_fits(self.device, m, buffer_bytes(m, 16))
        self.adapter_class = adapter_class(self.device.adapter.info)
        # program variant per phase for this adapter class: programs["decode@cpu"] replaces "decode" on a CPU adapter
        feats = {DOT4I8} if want == "int8" and supports_dot4i8(self.device) else set()
        self.program_for, self.activations, self.activations_note = choose_programs(m, self.adapter_class, want, feats)
        self.pipelines = {name: self._pipeline(name, k) for name, k in m["kernels"].items()}
        self.weights = self._upload_weights(progress)
        self.params_buf, self.param_offsets = self._params()

    # -- load ---------------------------------------------------------------------------------------------------
    def _pipeline(self, name: str, k: dict):
        code = check_file(self.dir, k["file"], k["sha256"], "shader").decode("utf-8")
        entries = [{"binding": 0, "visibility": wgpu.ShaderStage.COMPUTE,
                    "buffer": {"type": "uniform", "has_dynamic_offset": True}},
                   {"binding": 1, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": "uniform"}}]
        entries += [kv_layout_entry(i + 2, access) if access in KV_ACCESSES else layout_entry(i + 2, access)
                    for i, (_, access) in enumerate(k["bindings"])]
        layout = self.device.create_bind_group_layout(entries=entries, label=name)
        module = self.device.create_shader_module(code=code, label=name)
        pipeline = self.device.create_compute_pipeline(
            layout=self.device.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": module, "entry_point": "main"}, label=name)
        return pipeline, layout

    def _weight_uses(self) -> tuple[set, set]:
        """(parts the programs this adapter runs bind as a texture, parts they bind as a buffer)."""
        m, tex, buf = self.manifest, set(), set()
        for prog in self.program_for.values():
            for s in m["programs"][prog]:
                for ref, (_, access) in zip(s["bind"], m["kernels"][s["kernel"]]["bindings"]):
                    (tex if access == "texture" else buf).add(ref)
        return tex, buf

    def _upload_weights(self, progress) -> dict[str, object]:
        """Each weight part as a storage buffer, or as a texture (self.textures) where the programs this adapter runs
        bind it so (the CPU-adapter kernels: runtime_py/weight_texture.py); both if both."""
        m = self.manifest
        as_tex, as_buf = self._weight_uses()
        self.textures = {}
        by_shard: dict[int, list] = {}
        for name, w in m["weights"].items():
            for i, p in enumerate(w["parts"]):
                by_shard.setdefault(p["shard"], []).append((f"{name}#{i}", p, w))
        out, total, done = {}, sum(s["bytes"] for s in m["shards"]), 0
        for si, shard in enumerate(m["shards"]):
            data = self._read_shard(shard)
            for ref, p, w in by_shard.get(si, []):
                chunk = memoryview(data)[p["offset"]:p["offset"] + p["bytes"]]
                if ref in as_tex:
                    self.textures[ref] = upload_texture(self.device, chunk, quant=w["quant"], rows=p["rows"],
                                                        k=w["shape"][-1], label=ref)
                if ref in as_buf or ref not in as_tex:
                    buf = self.device.create_buffer(size=max(16, len(chunk)), label=ref,
                                                    usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST)
                    self.device.queue.write_buffer(buf, 0, chunk)
                    out[ref] = buf
            done += shard["bytes"]
            if progress:
                progress(done, total)
            del data
        return out

    def _read_shard(self, shard: dict) -> bytes:
        path = self.dir / shard["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: shard missing; recompile the model") from None
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ArtifactError(f"{path}: shard is corrupt (size or sha256 does not match the manifest); "
                                f"recompile the model")
        return data

    def _params(self):
        """Every step's uniform values in one buffer, UNIFORM_ALIGN apart; shared by all sessions."""
        blobs, offsets = [], {}
        for prog, steps in self.manifest["programs"].items():
            for i, s in enumerate(steps):
                offsets[(prog, i)] = len(blobs) * UNIFORM_ALIGN
                b = pack_params(self.manifest["kernels"][s["kernel"]], s["params"])
                blobs.append(b + b"\0" * (UNIFORM_ALIGN - len(b)))
        buf = self.device.create_buffer_with_data(data=b"".join(blobs), usage=wgpu.BufferUsage.UNIFORM)
        return buf, offsets

    def session(self, ctx: int | None = None) -> "Session":
        return Session(self, ctx)


class Session:
    """One sequence on the GPU: its KV cache and activations. `pos` = tokens already in the cache.
    kv: {buffer name: (buffer, byte offset, bytes)} buffers the session binds instead of allocating its own — a slot
    of a KV pool (runtime_py/rows.py): the K/V caches at the slot's offset. programs: those bound at creation."""

    def __init__(self, model: Model, ctx: int | None = None, kv: dict | None = None, programs=GENERATE):
        self.model = model
        self.kv = kv or {}
        m, dev = model.manifest, model.device
        if ctx is not None and ctx < 1:
            raise ContextOverflowError(f"context length must be at least 1 token (got {ctx})")
        self.ctx = min(ctx or DEFAULT_CTX, model.config["context_length"])
        self.chunk = m["limits"]["prefill_chunk"]
        check_fits(dev, m, buffer_bytes(m, self.ctx))
        self.buffers, self.programs = {}, {}
        # SAMPLE_RING State records, UNIFORM_ALIGN apart: decode step i of one submit reads record i
        self.state = dev.create_buffer(size=SAMPLE_RING * UNIFORM_ALIGN,
                                       usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST)
        for prog in programs:   # bound now; `score` (and its logits_all) on the first score_chunks, `sample` on the
            self._program(prog)  # first begin_sampling
        self.pos = 0
        self.held: list[int] = []   # the token ids whose K/V the cache holds, in order (runtime_py/kvcache.py)

    def _program(self, prog: str):
        """Program `prog` bound to this session, allocating the buffers it needs on its first use."""
        if prog not in self.programs:
            m, dev = self.model.manifest, self.model.device
            if prog not in m["programs"]:
                raise ArtifactError(f"this artifact has no `{prog}` program (compiled by an older kiln); "
                                    "recompile the model")
            # UNIFORM too: matvec_cpu reads its x row through a uniform binding (runtime_py/device.py adapter_class)
            usage = (wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST
                     | wgpu.BufferUsage.COPY_SRC)
            variant = self.model.program_for[prog]   # e.g. decode@cpu on a CPU adapter
            binds = {split_ref(r)[0] for st in m["programs"][variant] for r in st["bind"]}
            for n, size in session_buffer_bytes(m, self.ctx, (prog,)).items():
                b = m["buffers"][n]
                if n in self.buffers or n in self.kv or (b["shape"][0] == "ctx" and n not in binds):
                    continue   # per-position buffers: only the variant's (the @cpu programs' K/V textures or not)
                self.buffers[n] = (create_kv_texture(dev, self.ctx, b["shape"], label=n) if "texture" in b
                                   else dev.create_buffer(size=size, usage=usage, label=n))
            self.programs[prog] = self._bind(variant, m["programs"][variant])
        return self.programs[prog]

    def _bind(self, prog: str, steps: list[dict]):
        model, out = self.model, []
        for i, s in enumerate(steps):
            pipeline, layout = model.pipelines[s["kernel"]]
            entries = [{"binding": 0, "resource": {"buffer": self.state, "offset": 0, "size": STATE_BYTES}},
                       {"binding": 1, "resource": {"buffer": model.params_buf, "offset": model.param_offsets[(prog, i)],
                                                   "size": UNIFORM_ALIGN}}]
            bindings = model.manifest["kernels"][s["kernel"]]["bindings"]
            for j, (ref, (_, access)) in enumerate(zip(s["bind"], bindings)):
                if access == "texture":   # a weight part (runtime_py/weight_texture.py)
                    entries.append({"binding": j + 2, "resource": model.textures[ref].create_view()})
                    continue
                if access in KV_ACCESSES:   # the @cpu programs' K/V (runtime_py/kv_texture.py)
                    entries.append({"binding": j + 2, "resource": self.buffers[ref].create_view()})
                    continue
                name, offset = split_ref(ref)   # "xn+9216": a uniform x window at that byte offset
                if name in self.kv:   # a KV-pool slot: the pool's buffer at the slot's offset
                    buf, base, size = self.kv[name]
                    entries.append({"binding": j + 2, "resource": {"buffer": buf, "offset": base + offset,
                                                                   "size": size - offset}})
                    continue
                buf = self.buffers.get(name) or model.weights[name]
                size = min(buf.size - offset, UNIFORM_BINDING_MAX) if access == "uniform" else buf.size
                entries.append({"binding": j + 2, "resource": {"buffer": buf, "offset": offset, "size": size}})
            out.append((pipeline, model.device.create_bind_group(layout=layout, entries=entries), s["dispatch"]))
        return out

    def kv_buffer(self, name: str):
        """(GPU buffer or K/V texture, byte offset) holding this session's buffer `name`: its own, or a KV-pool slot's
        view; None where the programs it runs do not bind it (the storage K/V beside the @cpu programs' textures)."""
        if name in self.kv:
            return self.kv[name][:2]
        return (self.buffers[name], 0) if name in self.buffers else None

    def reset(self, pos: int = 0):
        """Forget the sequence after `pos` tokens (the cache beyond is simply overwritten later)."""
        if not 0 <= pos <= len(self.held):
            raise ValueError(f"reset({pos}): the cache holds {len(self.held)} tokens")
        self.pos = pos
        del self.held[pos:]

    def forward(self, ids: list[int]):
        """Run the model on `ids` (appended at self.pos); afterwards logits / next_token describe the last one."""
        if self.pos + len(ids) > self.ctx:
            raise ContextOverflowError(f"sequence of {self.pos + len(ids)} tokens exceeds the context of {self.ctx}")
        for c0 in range(0, len(ids), self.chunk):
            chunk = ids[c0:c0 + self.chunk]
            self._run("decode" if len(chunk) == 1 else "prefill", chunk)

    def _run(self, prog: str, chunk: list[int], then_sample: bool = False):
        """One submit: write the chunk's ids and the State, replay program `prog` (and `sample` after it), advance pos."""
        dev, T = self.model.device, len(chunk)
        dev.queue.write_buffer(self.buffers["tokens"], 0, np.asarray(chunk, dtype=np.uint32).tobytes())
        dev.queue.write_buffer(self.state, 0, np.array([T, self.pos, 0, 0], dtype=np.uint32).tobytes())
        enc = dev.create_command_encoder()
        cp = enc.begin_compute_pass()
        self._encode(cp, prog, T, 0)
        if then_sample:
            self._encode(cp, "sample", T, 0)
        cp.end()
        if then_sample:
            self._copy_ring(enc, 1)
        dev.queue.submit([enc.finish()])
        self.pos += T
        self.held.extend(int(t) for t in chunk)

    def _encode(self, cp, prog: str, T: int, slot: int):
        """Record program `prog` (this adapter's variant of it) into the pass, reading State record `slot`."""
        offset = [slot * UNIFORM_ALIGN]
        for pipeline, bind_group, dispatch in self._program(prog):
            size = [dispatch_size(d, T) for d in dispatch]
            if 0 in size:   # a step for an x window past T ("T>n")
                continue
            cp.set_pipeline(pipeline)
            cp.set_bind_group(0, bind_group, offset)
            cp.dispatch_workgroups(*size)

    # -- sampling on the GPU, several decode steps per submit (runtime_py/gpu_sampling.py) -----------------------
    def gpu_sampling(self) -> bool:
        """Whether this artifact has the `sample` program (older ones sample on the CPU)."""
        return "sample" in self.model.manifest["programs"]

    def begin_sampling(self, params, history: list[int], n_logprobs: int = 0):
        """Write the request's settings, its PRNG seed and the sequence so far (the penalties' window) to the GPU."""
        from .gpu_sampling import pack_config, seed_of
        self._program("sample")   # first sampled request: allocates the sampler's buffers, binds the program
        q, self._n_logprobs = self.model.device.queue, n_logprobs
        q.write_buffer(self.buffers["sampler_cfg"], 0, pack_config(params, n_logprobs))
        q.write_buffer(self.buffers["sampler_state"], 0, np.array([seed_of(params), 0, 0, 0], np.uint32).tobytes())
        if history:
            q.write_buffer(self.buffers["history"], 0, np.asarray(history, np.uint32).tobytes())

    def prefill_sample(self, ids: list[int]):
        """forward(ids) with the first token sampled on the GPU in the last chunk's submit; [(id, logprob, tops)]."""
        if self.pos + len(ids) > self.ctx:
            raise ContextOverflowError(f"sequence of {self.pos + len(ids)} tokens exceeds the context of {self.ctx}")
        chunks = [ids[c0:c0 + self.chunk] for c0 in range(0, len(ids), self.chunk)]
        for i, chunk in enumerate(chunks):
            self._run("decode" if len(chunk) == 1 else "prefill", chunk, then_sample=i == len(chunks) - 1)
        out = self._read_ring(1)
        self._last_sampled = out[0][0]   # decode_sample feeds it first
        return out

    def decode_sample(self, n: int):
        """n decode steps in one submit, each fed the token the previous one sampled (tokens[0]); [(id, lp, tops)]
        for the n tokens. The steps' positions are self.pos .. self.pos + n - 1 (the last sampled token is fed first)."""
        dev = self.model.device
        if not 1 <= n <= SAMPLE_RING:
            raise ValueError(f"decode_sample: 1 <= n <= {SAMPLE_RING}")
        if self.pos + n > self.ctx:
            raise ContextOverflowError(f"sequence of {self.pos + n} tokens exceeds the context of {self.ctx}")
        states = np.zeros((n, UNIFORM_ALIGN // 4), np.uint32)
        states[:, 0], states[:, 1], states[:, 2] = 1, self.pos + np.arange(n), np.arange(n)
        dev.queue.write_buffer(self.state, 0, states.tobytes())
        enc = dev.create_command_encoder()
        cp = enc.begin_compute_pass()
        for step in range(n):
            self._encode(cp, "decode", 1, step)
            self._encode(cp, "sample", 1, step)
        cp.end()
        self._copy_ring(enc, n)
        dev.queue.submit([enc.finish()])
        self.pos += n
        out = self._read_ring(n)
        # the steps ran the previous batch's last token, then each token but the last of this one
        self.held.extend([self._last_sampled] + [t for t, _, _ in out[:-1]])
        self._last_sampled = out[-1][0]
        return out

    def _ring_words(self, n: int) -> int:
        """u32 words of the ring the host reads after n steps: the tokens, or everything up to the n-th slot's tops."""
        from .gpu_sampling import LP_MAX
        return 2 * SAMPLE_RING + n * LP_MAX * 2 if self._n_logprobs else n

    def _copy_ring(self, enc, n: int):
        """Copy the ring to the mappable staging buffer in the same submit as the steps (no second submit to read)."""
        if getattr(self, "_ring_read", None) is None:
            self._ring_read = self.model.device.create_buffer(
                size=self.buffers["ring"].size, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        enc.copy_buffer_to_buffer(self.buffers["ring"], 0, self._ring_read, 0, 4 * self._ring_words(n))

    def _read_ring(self, n: int):
        """One map of the staging buffer: the n tokens (4 bytes each), plus their logprobs and top logprobs when the
        request wants them."""
        from .gpu_sampling import LP_MAX
        R, k, nbytes = SAMPLE_RING, self._n_logprobs, 4 * self._ring_words(n)
        # "READ_NOSYNC": the copy was submitted just before (as in wgpu-py's own queue.read_buffer, which maps this way);
        # plain READ makes wgpu-py submit an empty command buffer first (a wgpu-native workaround for maps with no
        # submit in between), which would be a second submit per batch for nothing
        self._ring_read.map_async("READ_NOSYNC", 0, nbytes).sync_wait()
        try:
            raw = np.frombuffer(self._ring_read.read_mapped(0, nbytes), np.uint32).copy()
        finally:
            self._ring_read.unmap()
        if not k:
            return [(int(t), None, None) for t in raw[:n]]
        lps = raw[R:R + n].view(np.float32)
        pairs = raw[2 * R:].reshape(n, LP_MAX, 2)[:, :k]
        return [(int(raw[i]), float(lps[i]), [(int(a), float(b)) for a, b in zip(pairs[i, :, 0],
                                                                                  pairs[i, :, 1].view(np.float32))])
                for i in range(n)]

    def logits(self) -> np.ndarray:
        """(vocab,) float32 logits of the last token of the last forward."""
        buf = self.buffers["logits"]
        return np.frombuffer(self.model.device.queue.read_buffer(buf), dtype=np.float32).copy()

    def next_token(self) -> int:
        """Greedy next token, computed on the GPU (reads 4 bytes instead of the logits)."""
        return int(np.frombuffer(self.model.device.queue.read_buffer(self.buffers["tokens"], 0, 4), np.uint32)[0])

    def score_chunks(self, ids: list[int]):
        """Run the `score` program on `ids` (appended at self.pos), limits.score_chunk tokens at a time; yields each
        chunk's (T, vocab) float32 logits: row i predicts the token after ids[c0 + i]."""
        m, dev = self.model.manifest, self.model.device
        self._program("score")   # first score: allocates logits_all, binds the program
        if self.pos + len(ids) > self.ctx:
            raise ContextOverflowError(f"sequence of {self.pos + len(ids)} tokens exceeds the context of {self.ctx}")
        step, vocab = m["limits"]["score_chunk"], self.model.config["vocab"]
        for c0 in range(0, len(ids), step):
            chunk = ids[c0:c0 + step]
            T = len(chunk)
            self._run("score", chunk)
            raw = dev.queue.read_buffer(self.buffers["logits_all"], 0, T * vocab * 4)
            yield np.frombuffer(raw, dtype=np.float32).reshape(T, vocab).copy()

    def score(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits of every token of `ids` (see score_chunks; mind the size for big vocabs)."""
        return np.concatenate(list(self.score_chunks(ids)))
