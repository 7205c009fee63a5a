// What the runtime writes for sampling on the GPU (the `sample` program: sample_prep -> sample_topk -> sample_draw):
// the request's settings (packConfig) and the PRNG seed, and which requests the GPU sampler takes (gpuReason).
// Mirrors runtime_py/gpu_sampling.py; the sizes come from the manifest (buffers `cand`, `ring`, `sampler_cfg`).

const CFG_HEAD_WORDS = 12;   // struct SampleCfg up to `bias` (shaders/_sample_cfg.wgsl.j2)
export const LP_MAX = 20;    // SampleDraw lp_max

/** {kMax, ring, maxBias} of an artifact with the `sample` program. */
export function sampleLimits(manifest) {
  const b = manifest.buffers;
  return {kMax: b.cand.shape[2], ring: b.ring.shape[0] / (2 + 2 * LP_MAX), maxBias: (b.sampler_cfg.shape[0] - CFG_HEAD_WORDS) / 2};
}

/** null when the GPU sampler implements `params` exactly as the CPU sampler; else why not. */
export function gpuReason(params, limits) {
  if (params.greedy) return null;
  if (!(params.top_k > 0 && params.top_k <= limits.kMax)) {
    return `top_k=${params.top_k} (the GPU sampler ranks 1..${limits.kMax} candidates)`;
  }
  if (Object.keys(params.logit_bias || {}).length > limits.maxBias) return `more than ${limits.maxBias} logit_bias entries`;
  return null;
}

/** struct SampleCfg for this request (runtime_py/gpu_sampling.py pack_config). */
export function packConfig(params, nLogprobs, limits) {
  const bias = Object.entries(params.logit_bias || {}).map(([t, b]) => [Number(t), b]).sort((x, y) => x[0] - y[0]);
  const buf = new ArrayBuffer(4 * (CFG_HEAD_WORDS + 2 * Math.max(1, bias.length)));
  const u = new Uint32Array(buf), f = new Float32Array(buf);
  u[0] = params.greedy ? 1 : 0;
  u[1] = Math.max(0, Math.min(params.top_k, limits.kMax));
  [f[2], f[3], f[4], f[5]] = [params.top_p, params.min_p, params.temperature || 1.0, params.repeat_penalty];
  u[6] = params.repeat_last_n < 0 ? 0xFFFFFFFF : params.repeat_last_n;   // -1: the whole history
  [f[7], f[8]] = [params.presence_penalty, params.frequency_penalty];
  u[9] = Math.min(nLogprobs, LP_MAX);
  u[10] = bias.length;
  bias.forEach(([t, b], i) => { u[CFG_HEAD_WORDS + 2 * i] = t; f[CFG_HEAD_WORDS + 2 * i + 1] = b; });
  return u;
}

/** The request's seed, or a fresh one (as Sampler picks it). */
export function seedOf(params) {
  return params.seed !== null && params.seed !== undefined ? params.seed >>> 0
    : crypto.getRandomValues(new Uint32Array(1))[0];
}
