"""User-facing errors.

Anything a user can cause (a bad layer range, an unknown hook name, a missing model, an
existing store, a full disk) raises :class:`DithooksError` with a one-line message. The CLI
prints that line and exits non-zero; it never shows a traceback for these.
"""


class DithooksError(Exception):
    """An error caused by the user's input or environment, with a one-line explanation."""


class HookNameError(DithooksError, KeyError):
    """An unknown hook point name (the message lists the closest valid names)."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class LayerSelectionError(DithooksError, ValueError):
    """A malformed or out-of-range layer selection."""


class ModelNotFoundError(DithooksError, FileNotFoundError):
    """A model id or directory that cannot be loaded."""


class StoreError(DithooksError):
    """A store that exists, is incomplete, is incompatible, or cannot be written."""
