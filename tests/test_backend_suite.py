"""The ONNX backend suite as a standing test: a fixed sample through simplify, and quantize.

The cases come from the installed onnx package only (onnxopt.test_models.backend_cases);
benchmarks/backend_suite.py runs all of them, against onnxsim and onnxslim too.
"""

from __future__ import annotations

import time
import warnings

import pytest

from onnxopt import PassContext, optimize
from onnxopt.test_models import backend_cases as bc

# Rolled-back passes allowed over the sample: the pipeline's safety net may catch a
# pass bug without a wrong output, but each one is a bug to fix, so the count is held.
MAX_ROLLBACKS = 0


@pytest.fixture(scope="module")
def sample() -> list[bc.BackendCase]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the onnx case definitions divide by zero on purpose
        return bc.ci_sample(150, seed=0)


def test_simplify_gets_every_sampled_case_right(sample: list[bc.BackendCase]) -> None:
    start = time.perf_counter()
    wrong, errors, rolled, usable = [], [], [], 0
    for case in sample:
        status, reference = bc.baseline(case)
        if status != "ok":
            continue  # ORT cannot run the original: nothing to judge
        usable += 1
        try:
            result = optimize(bc.bind_input_shapes(case), "simplify", PassContext(threads=1))
        except Exception as exc:  # a traceback out of optimize is a bug, whatever it is
            errors.append(f"{case.id}: {type(exc).__name__}: {exc}")
            continue
        rolled += [f"{case.id}: {r.name}: {r.error}" for r in result.rolled_back]
        status, detail = bc.judge(result.model, case, reference)
        if status != "ok":
            wrong.append(f"{case.id}: {status}: {detail}")
    assert len(sample) == 150 and usable >= 100, (len(sample), usable)
    assert errors == [] and wrong == []
    assert len(rolled) <= MAX_ROLLBACKS, rolled
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("conv", "test_conv_with_strides_and_asymmetric_padding"),
        ("conv", "test_basic_conv_with_padding"),
        ("matmul", "test_matmul_3d"),
        ("matmul", "test_matmul_4d"),  # cosine 0.87 where u8s8 kernels saturated (no VNNI)
        ("gemm", "test_gemm_default_no_bias"),
    ],
)
def test_quantize_keeps_weighted_cases_close(module: str, name: str) -> None:
    """Weights as initializers, quantize(min_weights=0): loads in ORT, cosine >= 0.999."""
    case = next(
        c for c in bc.node_cases([f"onnx.backend.test.case.node.{module}"]) if c.name == name
    )
    assert bc.quantizable(case)
    found = bc.quantize_case(case)
    assert found["status"] == "ok" and found["quantized"] and found["rollbacks"] == 0, found
    assert found["cosine"] >= bc.MIN_COSINE
