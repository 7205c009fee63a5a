"""Errors a user can cause. The CLI, the server and the browser print their message on one line, never a traceback."""
from __future__ import annotations


class KilnError(Exception):
    """Base class: a problem with the user's input or machine, explained in the message."""


class GGUFError(KilnError):
    """The file is missing, not GGUF, truncated or corrupt."""


class UnsupportedModelError(KilnError):
    """Architecture, tensor type or tokenizer that kiln does not implement."""


class ModelTooLargeError(KilnError):
    """The model does not fit the adapter's limits."""


class ContextOverflowError(KilnError):
    """Prompt (plus requested tokens) longer than the context."""


class ArtifactError(KilnError):
    """A compiled artifact is missing pieces or a shard fails its hash check."""


class InvalidParameterError(KilnError):
    """A request or sampling setting out of range or of the wrong type; `param` names the field as the user gave it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# The error table: every error class a user can meet, by name, in each runtime. web/errors.js defines the JS column
# (its ERRORS map carries them across the worker boundary with their class intact); tests/e2e/test_mirrors.py checks
# that both columns exist as written, and nothing else.
#   (Python class, where it is defined, JS class in web/errors.js)   None: that runtime cannot meet this error, because
ERROR_TABLE = [
    ("KilnError", "compiler.errors", "KilnError"),
    ("GGUFError", "compiler.errors", None),                      # the browser reads artifacts, never GGUF
    ("UnsupportedModelError", "compiler.errors", None),          # refused at compile time
    ("ModelTooLargeError", "compiler.errors", "ModelTooLargeError"),
    ("ContextOverflowError", "compiler.errors", "ContextOverflowError"),
    ("ArtifactError", "compiler.errors", "ArtifactError"),
    ("InvalidParameterError", "compiler.errors", "InvalidParameterError"),
    ("ChatTemplateError", "runtime_py.chat", "ChatTemplateError"),
    ("NoAdapterError", "runtime_py.device", "WebGPUUnavailableError"),
    ("KVPoolTooSmallError", "runtime_py.pages", None),         # only `kiln serve` shares a paged KV pool
    (None, None, "FeatureMissingError"),       # runtime_py/device.py requests no manifest `features` (yet)
    (None, None, "ShardCorruptError"),         # natively a bad shard hash is an ArtifactError (runtime_py/model.py)
    (None, None, "DeviceLostError"),           # wgpu-py raises in the failing call; the page hears it by message
    (None, None, "SelfTestError"),             # only the page checks the self-test at load ("strict")
    (None, None, "ServerConfigError"),         # a static host's MIME / CORS / base path: only a page loads over HTTP
]
