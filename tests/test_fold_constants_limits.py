"""fold-constants on what the ONNX backend suite and hostile models showed (issue #16).

Split from test_fold_constants.py, which holds the pass's rules one by one: these
are the backend cases that broke the pass, and the bound on what a fold allocates.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import optimize
from onnxopt.graph import op_histogram
from onnxopt.test_models import backend_cases as bc

NODE = "onnx.backend.test.case.node."


def _case(module: str, name: str) -> bc.BackendCase:
    if module == "pytorch-converted":
        cases = bc.data_cases([module])
    else:
        cases = bc.node_cases([NODE + module])
    return next(c for c in cases if c.name == name)


@pytest.mark.parametrize(
    ("module", "name", "stat"),
    [
        ("if_", "test_if_opt", "unwritable"),
        ("affinegrid", "test_affine_grid_2d_expanded", "range_bounds_scalar"),
        ("affinegrid", "test_affine_grid_2d_align_corners_expanded", "range_bounds_scalar"),
        ("pytorch-converted", "test_Linear_no_bias", "tensors_folded"),
    ],
)
def test_backend_cases_that_broke_the_pass_now_fold(module: str, name: str, stat: str) -> None:
    """Each was rolled back by the pipeline: UnboundLocalError on an optional output,
    a [1]-shaped Range bound after an If was inlined, an IR-3 initializer not an input."""
    case = _case(module, name)
    status, reference = bc.baseline(case)
    assert status == "ok"
    result = optimize(bc.bind_input_shapes(case), "fold-constants", strict=True)
    record = result.records[0]
    assert record.stats[stat] >= 1
    assert bc.judge(result.model, case, reference) == ("ok", "")
    if result.model.ir_version < 4:
        declared = {vi.name for vi in result.model.graph.input}
        assert {t.name for t in result.model.graph.initializer} <= declared


def _expand_then_reduce(elements: int) -> onnx.ModelProto:
    nodes = [
        h.make_node("Expand", ["one", "shape"], ["big"]),
        h.make_node("ReduceMax", ["big"], ["peak"], keepdims=0),
        h.make_node("Add", ["x", "peak"], ["y"]),
    ]
    inits = [
        nh.from_array(np.ones([1], np.float32), "one"),
        nh.from_array(np.array([elements], np.int64), "shape"),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1])],
        [h.make_tensor_value_info("y", T.FLOAT, [1])],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_a_fold_over_the_memory_budget_is_skipped_with_a_note() -> None:
    model = _expand_then_reduce(1024)
    folded = optimize(model, "fold-constants").model
    assert "Expand" not in op_histogram(folded)
    result = optimize(model, "fold-constants(max_bytes=1000)")
    record = result.records[0]
    assert record.stats["kept_memory"] == 1 and record.stats["tensors_folded"] == 0
    assert any("max_bytes=1000" in note for note in record.notes)
    assert op_histogram(result.model)["Expand"] == 1


def test_peak_memory_stays_bounded_on_a_huge_intermediate() -> None:
    """Expand to 2^28 floats (1 GiB) then ReduceMax: estimated, refused, never computed."""
    script = textwrap.dedent(
        """
        import json, resource, sys
        import onnx
        from onnxopt import optimize
        model = onnx.load_from_string(sys.stdin.buffer.read())
        record = optimize(model, "fold-constants").records[0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(json.dumps({"peak_mb": peak, "stats": record.stats, "notes": record.notes}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=_expand_then_reduce(2**28).SerializeToString(),
        capture_output=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report["peak_mb"] < 400, report
    assert report["stats"]["kept_memory"] == 1
    assert any("max_bytes=268435456" in note for note in report["notes"])
