// JSDoc types of the page-side API (api.js), shaped like OpenAI's chat completions. No code: editors and `tsc
// --checkJs` read these through `@type {import("./types.js").X}` in api.js. A page using kiln as a library:
//
//   import {createEngine} from "https://example.com/kiln/web/api.js";   // or "./web/api.js" on the same site
//   /** @type {import("https://example.com/kiln/web/types.js").Engine} */
//   const engine = await createEngine("https://example.com/kiln/models/smollm2/");
//
// Everything the runtime adds beyond OpenAI's shapes is under a `kiln` key.

/**
 * @typedef {Object} ChatMessage
 * @property {"system" | "user" | "assistant"} role
 * @property {string} content
 */

/**
 * Sampling fields shared by both request kinds. Unset fields keep the runtime's defaults (runtime_py/sampling.py).
 * @typedef {Object} SamplingRequest
 * @property {string} [model]              echoed back in responses (default: the loaded model's name)
 * @property {boolean} [stream]            true: resolve to an AsyncIterable of chunks
 * @property {number} [max_tokens]         default 256
 * @property {number} [temperature]        0 = greedy
 * @property {number} [top_p]
 * @property {number} [top_k]              0 = off
 * @property {number} [min_p]
 * @property {number} [repetition_penalty] 1 = off (also `repeat_penalty`, llama.cpp's name)
 * @property {number} [repeat_last_n]
 * @property {number} [presence_penalty]
 * @property {number} [frequency_penalty]
 * @property {number} [seed]               same seed + same request = same tokens
 * @property {string | string[]} [stop]    stop strings (not part of the output)
 */

/**
 * @typedef {SamplingRequest & {messages: ChatMessage[], logprobs?: boolean, top_logprobs?: number}}
 *   ChatCompletionRequest
 */

/**
 * `prompt` is raw text (no chat template) or token ids.
 * @typedef {SamplingRequest & {prompt: string | number[], logprobs?: number}} CompletionRequest
 */

/**
 * @typedef {Object} TokenLogprob
 * @property {string} token
 * @property {number | null} logprob
 * @property {{token: string, logprob: number}[]} [top_logprobs]
 */

/**
 * @typedef {Object} Usage
 * @property {number} prompt_tokens
 * @property {number} completion_tokens
 * @property {number} total_tokens
 * @property {{cached_tokens: number}} prompt_tokens_details   prompt tokens the KV cache already held (not prefilled)
 */

/**
 * kiln's extras, on the last chunk of a stream and on every non-streaming response.
 * @typedef {Object} KilnExtras
 * @property {number[]} prompt_ids   the prompt as tokens (after the chat template)
 * @property {number[]} ids          the generated tokens
 * @property {{cached_tokens: number, ttft_s: number, prefill_tok_s: number, decode_tok_s: number | null, total_s: number}} timings
 */

/**
 * @typedef {Object} ChatCompletionChunk
 * @property {string} id
 * @property {"chat.completion.chunk"} object
 * @property {number} created
 * @property {string} model
 * @property {{index: number, delta: {role?: "assistant", content?: string},
 *             logprobs: {content: TokenLogprob[]} | null, finish_reason: "stop" | "length" | null}[]} choices
 *           one per token; the last chunk has `choices: []` and carries `usage` and `kiln`
 * @property {Usage} [usage]
 * @property {KilnExtras} [kiln]
 */

/**
 * @typedef {Object} ChatCompletion
 * @property {string} id
 * @property {"chat.completion"} object
 * @property {number} created
 * @property {string} model
 * @property {{index: number, message: {role: "assistant", content: string},
 *             logprobs: {content: TokenLogprob[]} | null, finish_reason: "stop" | "length"}[]} choices
 * @property {Usage} usage
 * @property {KilnExtras} kiln
 */

/**
 * @typedef {Object} CompletionChunk
 * @property {string} id
 * @property {"text_completion"} object
 * @property {number} created
 * @property {string} model
 * @property {{index: number, text: string, logprobs: {content: TokenLogprob[]} | null,
 *             finish_reason: "stop" | "length" | null}[]} choices
 * @property {Usage} [usage]
 * @property {KilnExtras} [kiln]
 */

/** @typedef {CompletionChunk & {usage: Usage, kiln: KilnExtras}} Completion */

/**
 * Load progress. `download`: bytes from the network or the Cache API (`fromCache` of them), `note` a line about
 * storage quota or a host without Range support.
 * @typedef {Object} Progress
 * @property {"manifest" | "download" | "compile" | "selftest"} phase
 * @property {number} [loaded]
 * @property {number} [total]
 * @property {number} [fromCache]
 * @property {number} [shard]
 * @property {number} [shards]
 * @property {string} [note]
 * @property {boolean} [done]
 */

/**
 * The load-time self-test: this browser's logits for the manifest's prompt against the compiler machine's.
 * @typedef {Object} SelfTest
 * @property {boolean} ok
 * @property {string} [skipped]      why it did not run (`selftest: "off"`, an artifact without reference logits)
 * @property {number} [max_diff]
 * @property {number} [tolerance]
 * @property {number} [argmax]
 * @property {number} [expected_argmax]
 */

/**
 * @typedef {Object} EngineOptions
 * @property {(p: Progress) => void} [onProgress]
 * @property {(message: string) => void} [onDeviceLost]   the GPU went away: load again to continue
 * @property {number} [ctx]                               context tokens (default 2048, at most the model's)
 * @property {"report" | "strict" | "off"} [selftest]     strict: reject with SelfTestError on a mismatch
 * @property {string} [model]                             the name responses carry in `model`
 * @property {"f32" | "int8"} [activations]               int8: CPU adapters' 8-bit mat-vec inputs (approximate)
 * @property {"ngram" | null} [speculate]                 speculative decoding by prompt lookup (exact; speculate.js)
 */

/**
 * What createEngine resolves to.
 * @typedef {Object} Engine
 * @property {{name: string, arch: string, url: string, adapter: string, ctx: number, weights_bytes: number,
 *             kernels: number, dispatches_per_token: number, selftest: SelfTest, load_s: number,
 *             activations: "f32" | "int8", activations_note: string | null}} info
 * @property {SelfTest} selftest
 * @property {string | null} lost     the device-lost message once the GPU went away
 * @property {{completions: {create: (req: ChatCompletionRequest) =>
 *             Promise<ChatCompletion | AsyncIterable<ChatCompletionChunk>>}}} chat
 * @property {{create: (req: CompletionRequest) => Promise<Completion | AsyncIterable<CompletionChunk>>}} completions
 * @property {(id?: string) => void} interrupt   end running generations after their current token
 * @property {() => void} resetChat               forget the conversation the KV cache holds (as WebLLM's)
 * @property {() => void} unload                  free the GPU device and the worker
 */

export {};
