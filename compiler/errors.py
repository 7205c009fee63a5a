"""Errors a user can cause. The CLI, the server and the browser print their message on one line, never a traceback."""


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
