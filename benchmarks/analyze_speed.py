"""`analyze` time against `quantize`'s calibration time on the same feeds (PP-OCRv4 det).

Writes 16 synthetic text pages at 640x640 (benchmarks/quantize.py's `text_page`) to
calib.npz, quantizes PP-OCRv4 det on them (`simplify,quantize`), then runs `analyze`
on the same file; prints the calibration seconds (the pass's `calibration_seconds`
stat), the analyze seconds, their ratio and the three nodes analyze ranks first.

    python benchmarks/analyze_speed.py [--samples 16] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnxopt import api  # noqa: E402
from onnxopt.analyze import analyze  # noqa: E402
from onnxopt.test_models import fetch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    from onnxopt.test_models.textpages import text_page

    api.quiet_libraries()
    source = fetch.fetch("ppocr_det")
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, x=np.concatenate([text_page(1000 + i) for i in range(args.samples)]))
        int8 = Path(tmp) / "det.int8.onnx"
        result = api.optimize_file(
            source, int8, passes="simplify,quantize", data=str(calib), threads=args.threads
        )
        stats = result.records[-1].stats
        calibration = float(stats["calibration_seconds"])
        simplified = Path(tmp) / "det.simplified.onnx"
        api.optimize_file(source, simplified, passes="simplify")
        start = time.perf_counter()
        found = analyze(simplified, int8, str(calib), threads=args.threads)
        seconds = time.perf_counter() - start
    print(f"samples: {found.samples} at 640x640")
    print(f"quantize calibration: {calibration:.1f} s")
    print(f"analyze: {seconds:.1f} s ({seconds / calibration:.2f}x calibration)")
    print(f"merged_scalar_muls in quantize: {stats.get('merged_scalar_muls', 0)}")
    for e in found.layers[:3]:
        sqnr, cosine = e.isolated_sqnr_db, e.isolated_cosine
        print(f"  {e.node} ({e.op}): isolated {sqnr:.2f} dB, cosine {cosine:.6f}")
    odd = [
        e.node
        for e in found.layers
        if (e.isolated_cosine > 0.999 and e.isolated_sqnr_db < 20)
        or (e.accumulated_cosine > 0.999 and e.accumulated_sqnr_db < 20)
    ]
    print(f"rows with cosine > 0.999 and SQNR < 20 dB: {len(odd)} of {len(found.layers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
