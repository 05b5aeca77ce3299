"""onnxopt: post-export optimizer for ONNX models.

Simplify, prune and quantize on the ONNX graph, with ONNX Runtime proving
that the outputs still agree and measuring how much faster the model runs.
"""

import importlib
import sys
import types
from typing import Any

# Imported on first use (PEP 562): `import onnxopt` stays light, so that the command
# starts (and answers Ctrl-C during start-up) before onnx and ORT are loaded.
_EXPORTS = {
    ".api": (
        "DEFAULT_PIPELINE",
        "bench",
        "inspect",
        "list_passes",
        "load_feeds",
        "load_model",
        "optimize",
        "optimize_file",
        "save_model",
        "verify",
    ),
    ".errors": (
        "ExternalDataError",
        "FeedError",
        "ModelError",
        "OnnxoptError",
        "OutputError",
        "PassError",
        "ProviderError",
        "VerificationFailed",
    ),
    ".pass_api": (
        "Group",
        "Pass",
        "PassContext",
        "PassResult",
        "available_passes",
        "get_pass",
        "parse_spec",
        "register_group",
        "register_pass",
    ),
    ".pipeline": ("Pipeline", "PipelineResult"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'onnxopt' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


class _Package(types.ModuleType):
    """Keeps `onnxopt.verify` and `onnxopt.bench` the functions, as an eager import did:
    importing the submodule of the same name does not rebind them to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = sorted(_HOME)
