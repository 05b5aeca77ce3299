"""The one exception family of onnxopt.

Every message is a single line that says what was wrong, where, and what to do.
The CLI prints it as it is and exits non-zero; anything else escaping is a bug.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

# Who is asking: messages name arguments as that user writes them.
_COMMAND_LINE = contextvars.ContextVar("onnxopt_command_line", default=False)


@contextlib.contextmanager
def command_line_voice() -> Iterator[None]:
    """Inside, messages name command-line flags: the CLI runs its command in here (and
    a caller that runs `cli.main` in-process gets its Python voice back afterwards)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def arg(name: str) -> str:
    """An argument as the user writes it: `--shape` on the command line, `shape=` in Python."""
    return f"--{name.replace('_', '-')}" if _COMMAND_LINE.get() else f"{name}="


def on_command_line() -> bool:
    return _COMMAND_LINE.get()


class OnnxoptError(Exception):
    """Base of every error a user can act on."""

    exit_code = 2


class ModelError(OnnxoptError):
    """The model file cannot be read, written or checked."""


class ExternalDataError(ModelError):
    """External data is missing or points outside the model's folder."""


class OutputError(ModelError):
    """An output that cannot be written, or that would overwrite a file the run reads.

    Never a pass's fault: the pipeline stops on it instead of rolling the pass back.
    """


class RuntimeLoadError(ModelError):
    """ONNX Runtime refuses to build a session for the model."""


class PassError(OnnxoptError):
    """Unknown pass, bad pass option, or a pass that failed under --strict."""


class ProviderError(OnnxoptError):
    """An execution provider that is unknown or not available here."""


class FeedError(OnnxoptError):
    """Input feeds that do not match the model's inputs."""


class VerificationFailed(OnnxoptError):
    """Candidate outputs are outside the tolerances."""

    exit_code = 1
