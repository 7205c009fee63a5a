// compiler/schedule.py in JS, the parts a runtime replays by: a dispatch entry's workgroup count, a binding ref's
// buffer and byte offset, the programs a generating session binds (engine.js Session).

/** What a generating session binds at load (compiler/schedule.py GENERATE); `sample` on the first GPU-sampled
 * request; `score` (and its logits_all) on the first speculative pass (speculate.js). */
export const GENERATE = ["prefill", "decode"];
// `kiln serve`'s batched forwards over a KV pool (compiler/schedule_rows.py, runtime_py/rows.py): not replayed here
export const SERVER_PROGRAMS = ["rows", "rows_head"];

/** Reference evaluation of a dispatch entry: compiler/schedule.py `dispatch_size`. */
export function dispatchSize(dim, nTokens) {
  if (typeof dim === "number") return dim;
  if (dim.startsWith("T>")) return nTokens > parseInt(dim.slice(2), 10) ? 1 : 0;
  if (dim.startsWith("T<=")) return nTokens <= parseInt(dim.slice(3), 10) ? 1 : 0;
  const div = dim.includes("/") ? parseInt(dim.slice(2), 10) : 1;
  return Math.ceil(nTokens / div);
}

/** "xn+9216" -> ["xn", 9216]; "xn" -> ["xn", 0]: a buffer ref and the byte offset it binds at (compiler/ir.py). */
export function splitRef(ref) {
  const i = ref.indexOf("+");
  return i < 0 ? [ref, 0] : [ref.slice(0, i), parseInt(ref.slice(i + 1), 10)];
}
