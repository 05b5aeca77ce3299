"""One quantizer run as a whole process, for benchmarks/quantize.py.

    python benchmarks/quantize_children.py TOOL METHOD SOURCE CALIB TARGET

TOOL is one of:
- onnxopt: `optimize SOURCE --passes quantize(calibrate=METHOD,percentile=99.99)`;
- onnxopt-defaults: `quantize` with every option at its default (METHOD ignored);
- ort-best: ORT's documented path: `quant_pre_process` (symbolic shape inference,
  ORT graph optimization that folds BatchNorm into Conv, shape inference; where the
  symbolic shape inference fails, again with its documented `skip_symbolic_shape=True`,
  recorded as `pre`) and then
  `quantize_static` with QDQ, per-channel int8 weights, uint8 activations, the same
  calibration method, the same percentile and the same feeds;
- ort-defaults: `quantize_static(SOURCE, TARGET, reader)` with every other argument
  at its default (no pre-processing).

Every tool does the whole job inside the process: imports, load the model, read the
.npz, quantize, write TARGET. The parent times the process from its start to its
exit and reads its peak RSS; the child prints JSON with what it alone knows (its
own quantize call's seconds, and the error line when a step fails).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

PERCENTILE = 99.99
ORT_METHOD = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def run_onnxopt(method: str, source: str, calib: str, target: str, defaults: bool) -> dict:
    import onnx

    from onnxopt import PassContext, load_feeds, optimize
    from onnxopt.api import quiet_libraries

    quiet_libraries()
    start = time.perf_counter()
    model = onnx.load(source)
    feeds = load_feeds(model, calib)
    spec = "quantize" if defaults else f"quantize(calibrate={method},percentile={PERCENTILE})"
    result = optimize(model, spec, PassContext(feeds=feeds), strict=True)
    onnx.save(result.model, target)
    return {"call_s": time.perf_counter() - start, "notes": result.records[-1].notes}


def run_ort(method: str, source: str, calib: str, target: str, best: bool) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    ort.set_default_logger_severity(3)

    class Reader(CalibrationDataReader):
        """One sample a call from the .npz, as onnxopt's feeds read it."""

        def __init__(self) -> None:
            data = np.load(calib)
            self.name = data.files[0]
            self.arrays = data[self.name]
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(self.arrays):
                return None
            self.index += 1
            return {self.name: self.arrays[self.index - 1 : self.index]}

    start = time.perf_counter()
    if not best:
        quantize_static(source, target, Reader())
        return {"call_s": time.perf_counter() - start}
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = str(Path(target).with_suffix(".pre.onnx"))
    pre = "quant_pre_process"
    try:
        quant_pre_process(source, prepared)
    except Exception:  # noqa: BLE001 - ORT documents this switch for such models
        pre = "quant_pre_process(skip_symbolic_shape=True): the default failed"
        try:
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - reported in the table, as the issue asks
            line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            return {"error": f"quant_pre_process failed: {line[:200]}"}
    quantize_static(
        prepared,
        target,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHOD[method]),
        calibration_providers=["CPUExecutionProvider"],
        extra_options={"CalibPercentile": PERCENTILE},
    )
    return {"call_s": time.perf_counter() - start, "pre": pre}


def main() -> int:
    tool, method, source, calib, target = sys.argv[1:6]
    if tool.startswith("onnxopt"):
        record = run_onnxopt(method, source, calib, target, tool == "onnxopt-defaults")
    else:
        record = run_ort(method, source, calib, target, tool == "ort-best")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
