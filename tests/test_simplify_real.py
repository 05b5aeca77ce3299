"""simplify on real models: PP-OCR detection and direction models, and the onnx light zoo.

Each model is simplified with the default pipeline and checked with `verify` on
random feeds against the original. Besides the graph outputs, a few ReLU
activations spread over the network are compared too: the light models carry
constant weights, so their final softmax is nearly uniform and would hide an
error that the activations still show.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxopt import optimize, verify
from onnxopt.graph import op_histogram
from onnxopt.model import tensor_bytes
from onnxopt.test_models import fetch

RTOL, ATOL = 1e-5, 1e-5
# Node counts onnxslim 0.1.98 reaches on the same models (measured in benchmarks/simplify.py).
ONNXSLIM_NODES = {"ppocr_det": 326, "ppocr_cls": 179}


def _probes(original: onnx.ModelProto, simplified: onnx.ModelProto, count: int = 3) -> list[str]:
    """Up to `count` ReLU outputs present in both models, spread from first to last."""
    kept = {o for n in simplified.graph.node for o in n.output}
    names = [
        n.output[0] for n in original.graph.node if n.op_type == "Relu" and n.output[0] in kept
    ]
    if len(names) <= count:
        return names
    step = (len(names) - 1) / (count - 1)
    return [names[round(i * step)] for i in range(count)]


def _check(original: onnx.ModelProto, simplified: onnx.ModelProto, shapes, samples: int) -> None:
    assert [o.name for o in simplified.graph.output] == [o.name for o in original.graph.output]
    assert [
        i.SerializeToString() for i in simplified.graph.input if i.name not in _inits(simplified)
    ] == [i.SerializeToString() for i in original.graph.input if i.name not in _inits(original)]
    probes = _probes(original, simplified)
    report = verify(
        _with_probes(original, probes),
        _with_probes(simplified, probes),
        shape=shapes,
        samples=samples,
        rtol=RTOL,
        atol=ATOL,
    )
    failing = [o.to_dict() for o in report.outputs if not o.passed()]
    assert report.passed, failing
    assert len(report.outputs) == len(original.graph.output) + len(probes)


def _with_probes(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The model with the named tensors as extra, typed graph outputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {vi.name: vi for vi in inferred.graph.value_info}
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    probed.graph.output.extend(infos[name] for name in names)
    return probed


def _inits(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


@pytest.mark.parametrize(
    ("key", "shape"), [("ppocr_det", (1, 3, 320, 320)), ("ppocr_cls", (1, 3, 48, 192))]
)
def test_ppocr_models(key: str, shape: tuple[int, ...], request) -> None:
    path: Path = request.getfixturevalue(key)
    original = onnx.load(path)
    result = optimize(original, "simplify", strict=True)
    simplified = result.model
    ops = op_histogram(simplified)
    assert len(simplified.graph.node) <= ONNXSLIM_NODES[key]
    assert ops["BatchNormalization"] == ops["Constant"] == ops["Identity"] == 0
    assert tensor_bytes(simplified) <= tensor_bytes(original)
    assert not result.rolled_back
    _check(original, simplified, {"x": shape}, samples=2)


@pytest.mark.parametrize("path", fetch.light_models(), ids=lambda p: p.stem)
def test_light_models(path: Path) -> None:
    original = onnx.load(path)
    result = optimize(original, "simplify", strict=True)
    simplified = result.model
    assert not result.rolled_back
    assert len(simplified.graph.node) < len(original.graph.node)
    ops = op_histogram(simplified)
    assert ops["Dropout"] == 0
    # No bloat: these models build their weights with ConstantOfShape; folding those
    # would multiply the file size (onnxsim writes 243 MB for alexnet's 4 KB).
    assert simplified.ByteSize() <= 1.1 * original.ByteSize()
    _check(original, simplified, None, samples=1)
