// Load a compiled artifact onto the GPU and replay its programs. Mirrors runtime_py/model.py step for step (the
// decode loop is generate.js, as runtime_py/generate.py).
//
//   Model    — what every sequence shares: device, pipelines, weight buffers, the per-step uniform buffer.
//   Session  — one sequence: activation buffers, its KV cache, bind groups; `forward(ids)` runs prefill or decode.
//
// Nothing here knows the architecture: the manifest's programs say which kernel runs on which buffers.

import {ArtifactError, bufferBytes, ContextOverflowError, DeviceLostError, getAdapter, getDevice, adapterClass, adapterName}
  from "./device.js";
import {LP_MAX, packConfig, sampleLimits, seedOf} from "./gpu_sampling.js";
import {fetchManifest, fetchVerified, loadShards} from "./loader.js";
import {GENERATE, SERVER_PROGRAMS, dispatchSize, splitRef} from "./schedule.js";
import {choosePrograms, wgslLanguageFeatures} from "./variants.js";
import {KV_ACCESSES, createKvTexture, kvLayoutEntry} from "./kv_texture.js";
import {layoutEntry, uploadTexture} from "./weight_texture.js";

// re-exported: importers reach the whole runtime through engine.js (worker.js: Model, selftest)
export {dispatchSize, GENERATE, SERVER_PROGRAMS, splitRef} from "./schedule.js";
export {choosePrograms} from "./variants.js";
export {selftest} from "./selftest.js";

export const UNIFORM_ALIGN = 256;   // minUniformBufferOffsetAlignment's default (and maximum)
export const STATE_BYTES = 16;      // struct State { n_tokens, pos0, step, pad }; one record per decode step of a
                                    // submit, UNIFORM_ALIGN apart, bound with a dynamic offset
export const UNIFORM_BINDING_MAX = 65536;   // maxUniformBufferBindingSize's default: an activation bound as "uniform"
export const DEFAULT_CTX = 2048;

/** One step's uniform values as u32 words (f32 params bit-cast), like runtime_py.model.pack_params. */
export function packParams(kernel, values) {
  const buf = new ArrayBuffer(4 * kernel.params.length);
  const u32 = new Uint32Array(buf), f32 = new Float32Array(buf);
  kernel.params.forEach(([, type], i) => { if (type === "f32") f32[i] = values[i]; else u32[i] = values[i]; });
  return u32;
}

export const sessionCtx = (manifest, ctx) => Math.min(ctx || DEFAULT_CTX, manifest.config.context_length);

/** The buffers a session allocates to run `programs`, with their sizes, like runtime_py.model.session_buffer_bytes. */
export function sessionBufferBytes(manifest, ctx, programs = GENERATE) {
  const sizes = bufferBytes(manifest, ctx);
  return Object.fromEntries(Object.entries(manifest.buffers)
    .filter(([, b]) => (b.programs || programs).some((p) => programs.includes(p)))
    .map(([name]) => [name, sizes[name]]));
}

export class Model {
  /**
   * Everything a user waits for, in order: manifest -> adapter and limit checks (before any download) -> device ->
   * shaders compiling while the shards download, verify and upload -> uniforms.
   * onProgress({phase, ...}); onLost(message) when the device goes away later.
   */
  static async load(baseUrl, {ctx = null, activations = "f32", onProgress = () => {}, onLost = () => {}, signal} = {}) {
    baseUrl = new URL(baseUrl, globalThis.location?.href).href;
    if (!baseUrl.endsWith("/")) baseUrl += "/";
    onProgress({phase: "manifest"});
    const manifest = await fetchManifest(baseUrl);
    const adapter = await getAdapter();
    const device = await getDevice(adapter, manifest, bufferBytes(manifest, sessionCtx(manifest, ctx)));
    const model = new Model(baseUrl, manifest, device, adapterName(adapter), adapterClass(adapter),
                            {activations, languageFeatures: wgslLanguageFeatures()});
    device.lost.then((info) => {
      if (model.disposed) return;
      model.lost = `the GPU device was lost (${info.reason || "unknown"}${info.message ? `: ${info.message}` : ""}). ` +
        "Reload the page to start again.";
      onLost(model.lost);
    });
    device.addEventListener?.("uncapturederror", (e) => console.error(`kiln: WebGPU error: ${e.error.message}`));
    try {
      const compiling = model._compile();
      compiling.catch(() => {});   // awaited below; don't report it as unhandled while the download runs
      await loadShards(baseUrl, manifest, {signal, onProgress, onShard: (i, bytes) => model._upload(i, bytes)});
      onProgress({phase: "compile"});
      model.pipelines = await compiling;
      [model.paramsBuf, model.paramOffsets] = model._params();
    } catch (e) {
      model.destroy();             // free what was uploaded; not a device loss
      throw e;
    }
    return model;
  }

  constructor(baseUrl, manifest, device, adapter, adapterCls = "gpu", {activations = "f32", languageFeatures = new Set()} = {}) {
    Object.assign(this, {baseUrl, manifest, device, adapter, adapterClass: adapterCls, config: manifest.config});
    // program variant per phase for this adapter class: programs["decode@cpu"] replaces "decode" on a CPU adapter,
    // "decode@cpu_i8" replaces that with activations "int8" where the adapter can (choosePrograms); not
    // SERVER_PROGRAMS: the browser runs one sequence, so neither their kernels nor their buffers are needed
    [this.programFor, this.activations, this.activationsNote] =
      choosePrograms(manifest, adapterCls, activations, languageFeatures);
    for (const p of SERVER_PROGRAMS) delete this.programFor[p];
    if (this.activationsNote) console.warn(`kiln: ${this.activationsNote}`);
    this.weights = new Map();   // "tensor#part" -> GPUBuffer
    this.textures = new Map();  // "tensor#part" -> GPUTexture, where the programs run here bind it so (weight_texture.js)
    [this._asTexture, this._asBuffer] = this._weightUses();
    this.disposed = false;
    this.lost = null;
    this._byShard = new Map();
    for (const [name, w] of Object.entries(manifest.weights)) {
      w.parts.forEach((p, i) => {
        if (!this._byShard.has(p.shard)) this._byShard.set(p.shard, []);
        this._byShard.get(p.shard).push([`${name}#${i}`, p, w]);
      });
    }
  }

  // -- load ---------------------------------------------------------------------------------------------------
  /** [parts the programs this adapter runs bind as a texture, parts they bind as a buffer] (two Sets). */
  _weightUses() {
    const m = this.manifest, tex = new Set(), buf = new Set();
    for (const prog of Object.values(this.programFor)) {
      for (const s of m.programs[prog]) {
        s.bind.forEach((ref, j) => (m.kernels[s.kernel].bindings[j][1] === "texture" ? tex : buf).add(ref));
      }
    }
    return [tex, buf];
  }

  async _compile() {   // the kernels of the programs this runtime runs (programFor)
    const used = new Set(Object.values(this.programFor).flatMap((p) => this.manifest.programs[p].map((s) => s.kernel)));
    const entries = Object.entries(this.manifest.kernels).filter(([name]) => used.has(name));
    const pipelines = await Promise.all(entries.map(([name, k]) => this._pipeline(name, k)));
    return new Map(entries.map(([name], i) => [name, pipelines[i]]));
  }

  async _pipeline(name, k) {
    const code = new TextDecoder().decode(await fetchVerified(this.baseUrl, k.file, k.sha256, "shader"));
    const dev = this.device;
    const entries = [{binding: 0, visibility: GPUShaderStage.COMPUTE, buffer: {type: "uniform", hasDynamicOffset: true}},
                     {binding: 1, visibility: GPUShaderStage.COMPUTE, buffer: {type: "uniform"}}];
    k.bindings.forEach(([, access], i) => entries.push(KV_ACCESSES.includes(access) ? kvLayoutEntry(i + 2, access)
                                                                                   : layoutEntry(i + 2, access)));
    const layout = dev.createBindGroupLayout({entries, label: name});
    const module = dev.createShaderModule({code, label: name});
    try {
      const pipeline = await dev.createComputePipelineAsync({
        layout: dev.createPipelineLayout({bindGroupLayouts: [layout]}), compute: {module, entryPoint: "main"},
        label: name});
      return {pipeline, layout};
    } catch (e) {
      const info = await module.getCompilationInfo();
      const msgs = info.messages.map((m) => `${m.type} ${m.lineNum}:${m.linePos} ${m.message}`).join("; ");
      throw new Error(`shader ${name} failed to compile on ${this.adapter}: ${e.message} ${msgs}`);
    }
  }

  /** Each weight part as a storage buffer, or as a texture where the programs this adapter runs bind it so (the
   *  CPU-adapter kernels: weight_texture.js); both if both. */
  _upload(shardIndex, bytes) {
    for (const [ref, p, w] of this._byShard.get(shardIndex) || []) {
      if (this._asTexture.has(ref)) {
        this.textures.set(ref, uploadTexture(this.device, bytes, p.offset, p.bytes,
                                             {quant: w.quant, rows: p.rows, k: w.shape[w.shape.length - 1]}, ref));
      }
      if (this._asTexture.has(ref) && !this._asBuffer.has(ref)) continue;
      const buf = this.device.createBuffer({size: Math.max(16, p.bytes), label: ref,
                                            usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST});
      this.device.queue.writeBuffer(buf, 0, bytes, p.offset, p.bytes);
      this.weights.set(ref, buf);
    }
  }

  /** Every step's uniform values in one buffer, UNIFORM_ALIGN apart; shared by all sessions. */
  _params() {
    const offsets = new Map();
    let n = 0;
    for (const steps of Object.values(this.manifest.programs)) n += steps.length;
    const all = new Uint32Array(n * UNIFORM_ALIGN / 4);
    let i = 0;
    for (const [prog, steps] of Object.entries(this.manifest.programs)) {
      steps.forEach((s, j) => {
        offsets.set(`${prog}/${j}`, i * UNIFORM_ALIGN);
        all.set(packParams(this.manifest.kernels[s.kernel], s.params), i * UNIFORM_ALIGN / 4);
        i++;
      });
    }
    const buf = this.device.createBuffer({size: all.byteLength, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
                                          label: "params"});
    this.device.queue.writeBuffer(buf, 0, all);
    return [buf, offsets];
  }

  session(ctx = null) { return new Session(this, ctx); }

  destroy() {
    this.disposed = true;
    this.device.destroy();
  }
}

export class Session {
  /** One sequence on the GPU: its KV cache and activations. `pos` = tokens already in the cache. */
  constructor(model, ctx = null) {
    this.model = model;
    const m = model.manifest, dev = model.device;
    if (ctx !== null && ctx < 1) throw new ContextOverflowError(`context length must be at least 1 token (got ${ctx})`);
    this.ctx = sessionCtx(m, ctx);
    this.chunk = m.limits.prefill_chunk;
    this.buffers = new Map();
    this.programs = {};
    this.sampleLimits = "sample" in m.programs ? sampleLimits(m) : null;
    // one State record per decode step of a submit, UNIFORM_ALIGN apart: decode step i reads record i
    this.state = dev.createBuffer({size: (this.sampleLimits?.ring || 1) * UNIFORM_ALIGN,
                                   usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST});
    this.ringRead = null;   // the ring's staging buffer, with the `sample` program on the first beginSampling
    for (const prog of GENERATE) this._program(prog);
    // readback staging: the logits (vocab f32) and the argmax token (tokens[0])
    this.logitsRead = dev.createBuffer({size: this.buffers.get("logits").size,
                                        usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
    this.tokenRead = dev.createBuffer({size: 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
    this.pos = 0;
    this.held = [];   // the token ids whose K/V the cache holds, in order (kvcache.js)
  }

  /** Program `prog` bound to this session, allocating the buffers it needs on its first use. */
  _program(prog) {
    if (!this.programs[prog]) {
      const m = this.model.manifest, dev = this.model.device;
      if (!(prog in m.programs)) {
        throw new ArtifactError(`this artifact has no \`${prog}\` program (compiled by an older kiln); recompile the model`);
      }
      // UNIFORM too: matvec_cpu reads its x row through a uniform binding (device.js adapterClass)
      const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
      const variant = this.model.programFor[prog];   // e.g. decode@cpu on a CPU adapter
      const binds = new Set(m.programs[variant].flatMap((st) => st.bind.map((r) => splitRef(r)[0])));
      for (const [name, size] of Object.entries(sessionBufferBytes(m, this.ctx, [prog]))) {
        const b = m.buffers[name];
        // per-position buffers: only the variant's (the @cpu programs' K/V textures or not)
        if (this.buffers.has(name) || (b.shape[0] === "ctx" && !binds.has(name))) continue;
        this.buffers.set(name, "texture" in b ? createKvTexture(dev, this.ctx, b.shape, name)
                                              : dev.createBuffer({size, usage, label: name}));
      }
      this.programs[prog] = this._bind(variant, m.programs[variant]);
    }
    return this.programs[prog];
  }

  _bind(prog, steps) {
    const model = this.model;
    return steps.map((s, i) => {
      const {pipeline, layout} = model.pipelines.get(s.kernel);
      const entries = [
        {binding: 0, resource: {buffer: this.state, offset: 0, size: STATE_BYTES}},
        {binding: 1, resource: {buffer: model.paramsBuf, offset: model.paramOffsets.get(`${prog}/${i}`),
                                size: UNIFORM_ALIGN}}];
      const bindings = model.manifest.kernels[s.kernel].bindings;
      s.bind.forEach((ref, j) => {
        if (bindings[j][1] === "texture") {   // a weight part (weight_texture.js)
          entries.push({binding: j + 2, resource: model.textures.get(ref).createView()});
          return;
        }
        if (KV_ACCESSES.includes(bindings[j][1])) {   // the @cpu programs' K/V (kv_texture.js)
          entries.push({binding: j + 2, resource: this.buffers.get(ref).createView()});
          return;
        }
        const [name, offset] = splitRef(ref);   // "xn+9216": a uniform x window at that byte offset
        const buffer = this.buffers.get(name) || model.weights.get(name);
        if (!buffer) throw new Error(`step ${prog}[${i}] binds unknown buffer ${ref}`);
        const size = bindings[j][1] === "uniform" ? Math.min(buffer.size - offset, UNIFORM_BINDING_MAX) : buffer.size;
        entries.push({binding: j + 2, resource: {buffer, offset, size}});
      });
      return [pipeline, model.device.createBindGroup({layout, entries, label: `${prog}[${i}]`}), s.dispatch];
    });
  }

  /** Forget the sequence after `pos` tokens (the cache beyond is simply overwritten later). */
  reset(pos = 0) {
    if (!(pos >= 0 && pos <= this.held.length)) {
      throw new RangeError(`reset(${pos}): the cache holds ${this.held.length} tokens`);
    }
    this.pos = pos;
    this.held.length = pos;
  }

  /** Run the model on `ids` (appended at this.pos); afterwards logits() / nextToken() describe the last one. */
  forward(ids) {
    if (this.model.lost) throw new DeviceLostError(this.model.lost);
    if (this.pos + ids.length > this.ctx) {
      throw new ContextOverflowError(`sequence of ${this.pos + ids.length} tokens exceeds the context of ${this.ctx}`);
    }
    for (let c0 = 0; c0 < ids.length; c0 += this.chunk) {
      const chunk = ids.slice(c0, c0 + this.chunk);
      this._run(chunk.length === 1 ? "decode" : "prefill", chunk);
    }
  }

  /** One submit: write the chunk's ids and the State, replay program `prog` (and `sample` after it), advance pos. */
  _run(prog, chunk, thenSample = false) {
    const dev = this.model.device, T = chunk.length;
    dev.queue.writeBuffer(this.buffers.get("tokens"), 0, new Uint32Array(chunk));
    dev.queue.writeBuffer(this.state, 0, new Uint32Array([T, this.pos, 0, 0]));
    const enc = dev.createCommandEncoder();
    const cp = enc.beginComputePass();
    this._encode(cp, prog, T, 0);
    if (thenSample) this._encode(cp, "sample", T, 0);
    cp.end();
    if (thenSample) this._copyRing(enc, 1);
    dev.queue.submit([enc.finish()]);
    this.pos += T;
    this.held.push(...chunk);
  }

  /** Record program `prog` (this adapter's variant of it) into the pass, reading State record `slot`. */
  _encode(cp, prog, T, slot) {
    const offset = [slot * UNIFORM_ALIGN];
    for (const [pipeline, bindGroup, dispatch] of this._program(prog)) {
      const size = dispatch.map((d) => dispatchSize(d, T));
      if (size.includes(0)) continue;   // a step for an x window past T ("T>n")
      cp.setPipeline(pipeline);
      cp.setBindGroup(0, bindGroup, offset);
      cp.dispatchWorkgroups(...size);
    }
  }

  // -- sampling on the GPU, several decode steps per submit (web/gpu_sampling.js) ---------------------------------
  /** Whether this artifact has the `sample` program (older ones sample on the CPU). */
  gpuSampling() { return this.sampleLimits !== null; }

  /** Write the request's settings, its PRNG seed and the sequence so far (the penalties' window) to the GPU. */
  beginSampling(params, history, nLogprobs = 0) {
    const dev = this.model.device, q = dev.queue;
    this._program("sample");   // first sampled request: allocates the sampler's buffers, binds the program
    this.ringRead ||= dev.createBuffer({size: this.buffers.get("ring").size,
                                        usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
    this.nLogprobs = nLogprobs;
    q.writeBuffer(this.buffers.get("sampler_cfg"), 0, packConfig(params, nLogprobs, this.sampleLimits));
    q.writeBuffer(this.buffers.get("sampler_state"), 0, new Uint32Array([seedOf(params), 0, 0, 0]));
    if (history.length) q.writeBuffer(this.buffers.get("history"), 0, new Uint32Array(history));
  }

  /** forward(ids) with the first token sampled on the GPU in the last chunk's submit; [[id, logprob, tops]]. */
  async prefillSample(ids) {
    if (this.model.lost) throw new DeviceLostError(this.model.lost);
    if (this.pos + ids.length > this.ctx) {
      throw new ContextOverflowError(`sequence of ${this.pos + ids.length} tokens exceeds the context of ${this.ctx}`);
    }
    for (let c0 = 0; c0 < ids.length; c0 += this.chunk) {
      const chunk = ids.slice(c0, c0 + this.chunk);
      this._run(chunk.length === 1 ? "decode" : "prefill", chunk, c0 + this.chunk >= ids.length);
    }
    const out = await this._readRing(1);
    this.lastSampled = out[0][0];   // decodeSample feeds it first
    return out;
  }

  /** n decode steps in one submit, each fed the token the previous one sampled (tokens[0]); [[id, lp, tops]]. */
  async decodeSample(n) {
    if (this.model.lost) throw new DeviceLostError(this.model.lost);
    const ring = this.sampleLimits.ring;
    if (!(n >= 1 && n <= ring)) throw new RangeError(`decodeSample: 1 <= n <= ${ring}`);
    if (this.pos + n > this.ctx) {
      throw new ContextOverflowError(`sequence of ${this.pos + n} tokens exceeds the context of ${this.ctx}`);
    }
    const dev = this.model.device, words = UNIFORM_ALIGN / 4;
    const states = new Uint32Array(n * words);
    for (let i = 0; i < n; i++) states.set([1, this.pos + i, i, 0], i * words);
    dev.queue.writeBuffer(this.state, 0, states);
    const enc = dev.createCommandEncoder();
    const cp = enc.beginComputePass();
    for (let step = 0; step < n; step++) {
      this._encode(cp, "decode", 1, step);
      this._encode(cp, "sample", 1, step);
    }
    cp.end();
    this._copyRing(enc, n);
    dev.queue.submit([enc.finish()]);
    this.pos += n;
    const out = await this._readRing(n);
    // the steps ran the previous batch's last token, then each token but the last of this one
    this.held.push(this.lastSampled, ...out.slice(0, -1).map(([t]) => t));
    this.lastSampled = out[out.length - 1][0];
    return out;
  }

  /** u32 words of the ring the host reads after n steps: the tokens, or everything up to the n-th slot's tops. */
  _ringWords(n) { return this.nLogprobs ? 2 * this.sampleLimits.ring + n * LP_MAX * 2 : n; }

  /** Copy the ring to the mappable staging buffer in the same submit as the steps (no second submit to read). */
  _copyRing(enc, n) { enc.copyBufferToBuffer(this.buffers.get("ring"), 0, this.ringRead, 0, 4 * this._ringWords(n)); }

  /** One map of the staging buffer: the n tokens (4 bytes each), plus logprobs and top logprobs when asked. */
  async _readRing(n) {
    const R = this.sampleLimits.ring, k = this.nLogprobs, size = 4 * this._ringWords(n);
    try {
      await this.ringRead.mapAsync(GPUMapMode.READ, 0, size);
    } catch (e) {
      throw new DeviceLostError(this.model.lost || `reading from the GPU failed: ${e.message}`);
    }
    const raw = this.ringRead.getMappedRange(0, size).slice(0);
    this.ringRead.unmap();
    const u = new Uint32Array(raw), f = new Float32Array(raw);
    const out = [];
    for (let i = 0; i < n; i++) {
      if (!k) { out.push([u[i], null, null]); continue; }
      const tops = [];
      for (let j = 0; j < k; j++) {
        const b = 2 * R + (i * LP_MAX + j) * 2;
        tops.push([u[b], f[b + 1]]);
      }
      out.push([u[i], f[R + i], tops]);
    }
    return out;
  }

  async _read(src, staging, size) {
    const enc = this.model.device.createCommandEncoder();
    enc.copyBufferToBuffer(src, 0, staging, 0, size);
    this.model.device.queue.submit([enc.finish()]);
    try {
      await staging.mapAsync(GPUMapMode.READ, 0, size);
    } catch (e) {
      throw new DeviceLostError(this.model.lost || `reading from the GPU failed: ${e.message}`);
    }
    const out = staging.getMappedRange(0, size).slice(0);
    staging.unmap();
    return out;
  }

  /** (vocab,) float32 logits of the last token of the last forward. */
  async logits() {
    return new Float32Array(await this._read(this.buffers.get("logits"), this.logitsRead, this.logitsRead.size));
  }

  /** Greedy next token, computed on the GPU (reads 4 bytes instead of the logits). */
  async nextToken() {
    return new Uint32Array(await this._read(this.buffers.get("tokens"), this.tokenRead, 4))[0];
  }

  /** Run the `score` program on `ids` (appended at this.pos), limits.score_chunk tokens at a time; yields each
   *  chunk's logits as T Float32Array rows (vocab,): row i predicts the token after ids[c0 + i] (speculate.js). The
   *  first call allocates logits_all (score_chunk x vocab f32) and its staging buffer: only speculation pays them. */
  async* scoreChunks(ids) {
    if (this.model.lost) throw new DeviceLostError(this.model.lost);
    this._program("score");
    if (this.pos + ids.length > this.ctx) {
      throw new ContextOverflowError(`sequence of ${this.pos + ids.length} tokens exceeds the context of ${this.ctx}`);
    }
    const step = this.model.manifest.limits.score_chunk, vocab = this.model.config.vocab;
    const src = this.buffers.get("logits_all");
    this.scoreRead ||= this.model.device.createBuffer({size: src.size,
                                                       usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
    for (let c0 = 0; c0 < ids.length; c0 += step) {
      const chunk = ids.slice(c0, c0 + step), T = chunk.length;
      this._run("score", chunk);
      const all = new Float32Array(await this._read(src, this.scoreRead, T * vocab * 4));
      yield Array.from({length: T}, (_, i) => all.subarray(i * vocab, (i + 1) * vocab));
    }
  }

  destroy() {
    for (const b of this.buffers.values()) b.destroy();
    for (const b of [this.state, this.logitsRead, this.tokenRead, this.ringRead, this.scoreRead]) b?.destroy();
  }
}
