// The load-time self-test: the browser's check of what runtime_py/artifacts.py add_selftest recorded natively.

/**
 * Recompute manifest.selftest's top-5 logits on this GPU/browser (runtime_py/artifacts.py `add_selftest` recorded
 * them natively). {ok, max_diff, tolerance, rows: [[id, expected, got]], argmax, expected_argmax} or {skipped}.
 */
export async function selftest(model) {
  const st = model.manifest.selftest;
  if (!st) return {ok: true, skipped: "the manifest has no selftest (compiled with --no-selftest)"};
  // the int8-activation programs have their own reference (runtime_py/artifacts.py add_selftest)
  const top5 = model.activations === "int8" ? st.int8_top5 : st.top5;
  if (!top5) return {ok: true, skipped: "the manifest has no int8-activation self-test reference (recompile)"};
  const s = model.session(Math.max(64, st.prompt_ids.length + 1));
  try {
    s.forward(st.prompt_ids);
    const logits = await s.logits();
    const argmax = await s.nextToken();
    const rows = top5.map(([id, want]) => [id, want, logits[id]]);
    const maxDiff = Math.max(...rows.map(([, want, got]) => Math.abs(got - want)));
    // the argmax may differ from the reference only between two logits the tolerance can't tell apart
    const want = top5[0][0];
    const argmaxOk = argmax === want || Math.abs(logits[argmax] - logits[want]) <= st.tolerance;
    const ok = maxDiff <= st.tolerance && argmaxOk;   // false for NaN too
    return {ok, max_diff: maxDiff, tolerance: st.tolerance, rows, argmax, expected_argmax: top5[0][0],
            reference_device: st.device || "", text: st.text, activations: model.activations};
  } finally {
    s.destroy();
  }
}
