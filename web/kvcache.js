// Prefix reuse: a Session's KV cache remembers the token ids it holds (`session.held`), and a new prompt that starts
// with some of them prefills only the rest. Mirrors runtime_py/kvcache.py (same names, same steps; the server's slot
// choice, pick_slot, stays native: the browser has one session per engine).
//
//   const cached = reusePrefix(session, promptIds);   // keeps held[:cached], forgets the rest
//   session.forward(promptIds.slice(cached));         // prefill only what is new
//
// A chat turn re-sends the whole conversation; the worker keeps its session between requests, so turn N prefills
// only turn N's message. Why the last prompt token is always run, and why a rest never ends in a one-token chunk
// when it can be helped: see runtime_py/kvcache.py.

/** Length of the longest common prefix of two id sequences. */
export function commonPrefix(a, b) {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** How many leading tokens of `promptIds` can stay in a cache holding `held` (runtime_py/kvcache.py `reusable`). */
export function reusable(held, promptIds, chunk) {
  let n = Math.min(commonPrefix(held, promptIds), promptIds.length - 1);
  if (n > 0 && (promptIds.length - n) % chunk === 1 && promptIds.length % chunk !== 1) n -= 1;
  return Math.max(n, 0);
}

/** Keep the reusable prefix of `session`'s cache for `promptIds`, forget the rest; returns its length. */
export function reusePrefix(session, promptIds) {
  const n = reusable(session.held, promptIds, session.chunk);
  session.reset(n);
  return n;
}
