// Every error a user can meet in the browser, one class each, and the map that carries them across the worker
// boundary with their class intact. Mirrors compiler/errors.py: its ERROR_TABLE lists both columns (which Python
// class is which JS class, and which exist on one side only); tests/e2e/test_mirrors.py checks the two agree.
//
//   worker:  post({type: "error", error: errorToJson(e)})
//   page:    throw errorFromJson(msg.error)          // an ArtifactError again, `instanceof KilnError`

/** Base class: a problem with the user's input or machine, explained in the message. */
export class KilnError extends Error {
  get name() { return this.constructor.name; }
}
/** The manifest is missing, unreadable or of another format version (a compiled artifact is missing pieces). */
export class ArtifactError extends KilnError {}
/** The chat template failed to render these messages (runtime_py/chat.py's ChatTemplateError). */
export class ChatTemplateError extends KilnError {}
/** Prompt + generation would not fit the session's context. */
export class ContextOverflowError extends KilnError {}
/** The GPU device went away (driver reset, out of memory, tab in background on mobile). */
export class DeviceLostError extends KilnError {}
/** The artifact's shaders need an optional WebGPU feature (e.g. "shader-f16") this adapter lacks. */
export class FeatureMissingError extends KilnError {}
/** A request or sampling setting out of range or of the wrong type; `param` names the field as the user gave it. */
export class InvalidParameterError extends KilnError {
  constructor(message, param = null) {
    super(message);
    this.param = param;
  }
}
/** A buffer or binding the model needs exceeds what this adapter allows. */
export class ModelTooLargeError extends KilnError {}
/** The load-time self-test found this GPU/browser computing different logits than the compiler's machine. */
export class SelfTestError extends KilnError {}
/** A shard's sha256 differs from the manifest's, from the network too after one retry. */
export class ShardCorruptError extends KilnError {}
/** No navigator.gpu, an insecure context, or requestAdapter() returned null (runtime_py/device.py NoAdapterError). */
export class WebGPUUnavailableError extends KilnError {}

export const ERRORS = {KilnError, ArtifactError, ChatTemplateError, ContextOverflowError, DeviceLostError,
                       FeatureMissingError, InvalidParameterError, ModelTooLargeError, SelfTestError,
                       ShardCorruptError, WebGPUUnavailableError};

/** An error as a plain object postMessage can carry: {name, message, param?}. */
export function errorToJson(e) {
  const out = {name: e?.name || "Error", message: e?.message || String(e)};
  if (e?.param !== undefined && e?.param !== null) out.param = e.param;
  return out;
}

/** The error errorToJson described, as its class again; a name outside ERRORS arrives as a KilnError. */
export function errorFromJson({name, message, param}) {
  const cls = ERRORS[name] || KilnError;
  return cls === InvalidParameterError ? new InvalidParameterError(message, param ?? null) : new cls(message);
}
