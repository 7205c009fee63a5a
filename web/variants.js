// Which variant of each program this runtime replays (manifest programs `<program>@<class>[_i8]`,
// program_variants): runtime_py/model.py choose_programs in JS; engine.js Model binds what it returns.

/**
 * [{program: the variant to run}, activations they use, note]: programs["decode@cpu"] replaces "decode" on a CPU
 * adapter; with activations "int8", "decode@cpu_i8" replaces that where the artifact has it and the adapter has the
 * WGSL language features it needs (manifest program_variants), else f32 runs and the note says why. Mirrors
 * runtime_py/model.py choose_programs.
 */
export function choosePrograms(manifest, cls, activations = "f32", languageFeatures = new Set()) {
  if (!["f32", "int8"].includes(activations)) {
    throw new Error(`activations must be one of f32, int8 (got ${JSON.stringify(activations)})`);
  }
  const progs = manifest.programs, pv = manifest.program_variants || {};
  const out = Object.fromEntries(Object.keys(progs).filter((p) => !p.includes("@")).map(
    (p) => [p, `${p}@${cls}` in progs ? `${p}@${cls}` : p]));
  let note = null;
  if (activations === "int8") {
    const i8 = Object.fromEntries(Object.keys(out).filter((p) => `${p}@${cls}_i8` in progs)
      .map((p) => [p, `${p}@${cls}_i8`]));
    const missing = [...new Set(Object.values(i8).flatMap((v) => pv[v]?.wgsl_language_features || []))]
      .filter((f) => !languageFeatures.has(f)).sort();
    if (!Object.keys(i8).length) {
      note = `this artifact has no int8-activation programs for ${cls} adapters (only CPU adapters have them; an ` +
        "older artifact: recompile); running float32 activations";
    } else if (missing.length) {
      note = `the adapter lacks WGSL ${missing.join(", ")}; running float32 activations`;
    } else {
      Object.assign(out, i8);
    }
  }
  const used = Object.values(out).some((v) => v.endsWith("_i8")) ? "int8" : "f32";
  return [out, used, note];
}

/** The WGSL language features of this browser (navigator.gpu.wgslLanguageFeatures; none where it is missing). */
export function wgslLanguageFeatures() {
  return new Set(globalThis.navigator?.gpu?.wgslLanguageFeatures || []);
}
