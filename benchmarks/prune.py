"""prune-channels: coverage, speed and accuracy, measured side by side.

    python benchmarks/prune.py [--runs 20] [--skip-speed] [--models resnet50,cnn]

Coverage: `fold-constants,prune-channels(ratio=0.3)` on every model of the onnx
package's `backend/test/data/light` folder (their weights are constant fills, so
they are replaced by seeded He-normal values first, BatchNorm parameters by sane
ones), on PP-OCRv4 detection and the text-direction classifier, on the builder
models and on the digits CNN. Every result goes through the pipeline's checks
(full onnx checker, ORT session) and is run once more beside the original to
compare output shapes. The table lists the share of channels in prunable groups and
the share removed.

Speed: one interleaved `onnxopt.bench` run per model on the CPU provider: the fp32
original against the pruned model, plain and with round_to=16 (ResNet-50 also with
round_to=8, and with `sparsify`, which gives no speed-up in ORT).

Accuracy: the digits CNN pruned to at least 1.5x fewer MACs (smallest uniform ratio
that gets there), top-1 on the held-out split without recovery, with bias
compensation, with reconstruction, and with data-aware importance + reconstruction.

Results go to benchmarks/results/prune.json and prune.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxopt import PassContext, bench, inspect, optimize
from onnxopt.data import ListFeeds, RandomFeeds, model_inputs
from onnxopt.report import Table, render_markdown, write_json, write_text
from onnxopt.runtime import create_session
from onnxopt.test_models import builders, digits, fetch
from onnxopt.test_models.weights import seeded_weights

RESULTS = Path(__file__).with_name("results")
SPEC = "prune-channels(ratio=0.3)"


def models() -> list[tuple[str, onnx.ModelProto, dict]]:
    """(label, model, input shapes) for every model the benchmark covers."""
    out = []
    for path in fetch.light_models():
        label = path.stem.removeprefix("light_")
        out.append((label, seeded_weights(onnx.load(path)), {}))
    for name in ("ppocr_det", "ppocr_cls"):
        out.append((name, onnx.load(fetch.fetch(name)), dict(fetch.MODELS[name].input_shapes)))
    for name, build in builders.ALL.items():
        out.append((f"builder {name}", build(), {}))
    out.append(("digits CNN", onnx.load(digits.DIGITS_CNN), {}))
    return out


def same_output_shapes(a: onnx.ModelProto, b: onnx.ModelProto, shapes: dict) -> bool:
    feed = next(iter(RandomFeeds(model_inputs(a), 1, shapes=shapes)))
    left = create_session(a).run(None, feed)
    right = create_session(b).run(None, feed)
    return [x.shape for x in left] == [x.shape for x in right]


def coverage(selected: list, runs: int, skip_speed: bool) -> tuple[Table, Table, list]:
    cov = Table(
        f"Coverage of {SPEC} (after fold-constants)",
        [
            "model",
            "groups",
            "prunable groups",
            "channels",
            "prunable %",
            "removed %",
            "params M before->after",
            "MACs G before->after",
            "checker+ORT",
            "same output shapes",
            "pass s",
        ],
    )
    speed = Table(
        "Speed, fp32 original vs pruned, CPU provider (interleaved)",
        ["model", "variant", "original p50 ms", "pruned p50 ms", "speed-up", "MACs ratio"],
    )
    records = []
    for label, model, shapes in selected:
        ctx = PassContext(shapes=shapes)
        base = optimize(model, "fold-constants", ctx).model
        start = time.perf_counter()
        result = optimize(base, SPEC, ctx)
        seconds = time.perf_counter() - start
        record = result.records[-1]
        st = record.stats
        before, after = inspect(base, shapes), inspect(result.model, shapes)
        ok = record.status != "rolled back"
        same = same_output_shapes(base, result.model, shapes) if ok else False
        channels = st.get("channels", 0) or 1
        cov.rows.append(
            [
                label,
                st.get("groups", 0),
                st.get("groups_prunable", 0),
                st.get("channels", 0),
                f"{100 * st.get('channels_prunable', 0) / channels:.1f}",
                f"{100 * st.get('channels_removed', 0) / channels:.1f}",
                f"{before.parameters / 1e6:.3g} -> {after.parameters / 1e6:.3g}",
                f"{before.macs / 1e9:.3g} -> {after.macs / 1e9:.3g}",
                "ok" if ok else f"rolled back: {record.error}",
                "yes" if same else "NO",
                round(seconds, 2),
            ]
        )
        entry = {
            "model": label,
            "status": record.status,
            "stats": st,
            "notes": record.notes,
            "params": [before.parameters, after.parameters],
            "macs": [before.macs, after.macs],
            "same_output_shapes": same,
            "seconds": seconds,
            "speed": [],
        }
        if not skip_speed and ok:
            variants = [("ratio=0.3", result.model)]
            extras = ["round_to=16"] + (["round_to=8"] if label == "resnet50" else [])
            for extra in extras:
                spec = f"prune-channels(ratio=0.3,{extra})"
                variants.append((f"ratio=0.3,{extra}", optimize(base, spec, ctx).model))
            if label == "resnet50":
                sparse = optimize(base, "sparsify(sparsity=0.5)", ctx).model
                variants.append(("sparsify(sparsity=0.5)", sparse))
            timing = bench(
                [base] + [m for _, m in variants],
                labels=["original"] + [v for v, _ in variants],
                shapes=shapes,
                warmup=3,
                runs=runs,
            )
            orig = timing.timings[0]
            for (variant, candidate), new in zip(variants, timing.timings[1:], strict=True):
                macs = inspect(candidate, shapes).macs
                speed.rows.append(
                    [
                        label,
                        variant,
                        orig.p50,
                        new.p50,
                        f"{new.speedup:.2f}x",
                        f"{before.macs / max(macs, 1):.2f}x",
                    ]
                )
                entry["speed"].append(
                    {"variant": variant, "original": orig.to_dict(), "pruned": new.to_dict()}
                )
        records.append(entry)
        print(f"  {label}: {record.status} in {seconds:.1f} s", file=sys.stderr)
    return cov, speed, records


def accuracy() -> tuple[Table, dict]:
    x_train, _, x_test, y_test = digits.load_digits_split()
    model = onnx.load(digits.DIGITS_CNN)
    feeds = ListFeeds(
        [{"image": x_train[i : i + 32]} for i in range(0, 512, 32)], model_inputs(model)
    )
    ctx = PassContext(feeds=feeds)
    base_top1 = digits.top1(model, x_test, y_test)
    base_macs = inspect(model).macs
    ratio = 0.0
    for step in range(1, 60):
        ratio = step / 100
        pruned = optimize(model, f"prune-channels(ratio={ratio})").model
        if base_macs / inspect(pruned).macs >= 1.5:
            break
    table = Table(
        f"Digits CNN pruned to >= 1.5x fewer MACs (uniform ratio {ratio}), top-1 on "
        f"{len(y_test)} held-out images; calibration: 512 training images",
        ["recovery", "MACs ratio", "top-1 %", "drop (points)"],
    )
    table.rows.append(["original", "1.00x", base_top1, 0.0])
    data = {"ratio": ratio, "base_top1": base_top1, "rows": []}
    for label, options in (
        ("none", ""),
        ("bias compensation", ",bias_compensation=true"),
        ("reconstruction", ",reconstruct=true"),
        ("data-aware importance + reconstruction", ",data_aware=true,reconstruct=true"),
    ):
        result = optimize(model, f"prune-channels(ratio={ratio}{options})", ctx)
        top1 = digits.top1(result.model, x_test, y_test)
        macs = base_macs / inspect(result.model).macs
        table.rows.append([label, f"{macs:.2f}x", top1, round(base_top1 - top1, 2)])
        data["rows"].append({"recovery": label, "macs_ratio": macs, "top1": top1})
    return table, data


def _ratios(result, labels: list[str]) -> list[tuple[float, float, float, float]]:
    """(p25 ms, p50 ms, p25 ratio, median ratio) of each label against the first."""
    first = result.timing(labels[0])
    out = []
    for label in labels:
        t = result.timing(label)
        p25, p50 = t.percentile(25), t.p50
        out.append((p25, p50, first.percentile(25) / p25, first.p50 / p50))
    return out


def round_to_speed(runs: int, threads: int) -> tuple[Table, list]:
    """ratio=0.3 with round_to 1, 4, 8, 16 on ResNet-50 (seeded) and PP-OCRv4 det."""
    table = Table(
        f"prune-channels(ratio=0.3) by round_to, CPU provider, {threads} thread(s), "
        f"{runs} interleaved runs",
        ["model", "round_to", "MACs G", "p25 ms", "p50 ms", "p25 speed-up", "median speed-up"],
    )
    resnet = next(p for p in fetch.light_models() if p.stem == "light_resnet50")
    cases = [
        ("resnet50", seeded_weights(onnx.load(resnet)), {}),
        ("ppocr_det", onnx.load(fetch.fetch("ppocr_det")), {"x": (1, 3, 640, 640)}),
    ]
    data = []
    for label, model, shapes in cases:
        model = optimize(model, "fold-constants").model
        ctx = PassContext(shapes=shapes)
        variants = {"original": model}
        for round_to in ROUND_TO:
            spec = f"prune-channels(ratio=0.3,round_to={round_to},latency_check=false)"
            variants[f"round_to={round_to}"] = optimize(model, spec, ctx).model
        feeds = RandomFeeds(model_inputs(model), 1, shapes=shapes)
        names = list(variants)
        result = bench(
            list(variants.values()), labels=names, feeds=feeds, threads=threads, runs=runs
        )
        for name, (p25, p50, r25, r50) in zip(names, _ratios(result, names), strict=True):
            macs = inspect(variants[name], shapes=shapes).macs / 1e9
            table.rows.append([label, name, round(macs, 3), p25, p50, f"{r25:.2f}x", f"{r50:.2f}x"])
            data.append({"model": label, "variant": name, "macs": macs, "p25_ms": p25,
                         "p50_ms": p50, "p25_speedup": r25, "median_speedup": r50})  # fmt: skip
        print(render_markdown([table]), file=sys.stderr)
    return table, data


ROUND_TO = (1, 4, 8, 16)


def target_table(runs: int, threads: int) -> tuple[Table, list]:
    """The README and issue-18 cases: target or ratio, held-out metric on unseen data, speed."""
    from onnxopt.test_models import textlines

    table = Table(
        f"prune-channels to a target, CPU provider, {threads} thread(s), {runs} interleaved "
        "runs; metric on data the pass never saw",
        ["model", "spec", "channels removed %", "MACs M before->after",
         "params k before->after", "unseen metric", "p25 speed-up", "median speed-up"],
    )  # fmt: skip
    cls = optimize(onnx.load(fetch.fetch("ppocr_cls")), "simplify").model
    lines = textlines.labelled_feeds(400, 1)[0]
    unseen = textlines.labelled_feeds(400, 2)[0]
    model = optimize(onnx.load(digits.DIGITS_CNN), "simplify").model
    x_train, _, x_test, y_test = digits.load_digits_split()
    half = len(y_test) // 2
    x = np.concatenate([x_train[:512], x_test[:half]])
    resnet = next(p for p in fetch.light_models() if p.stem == "light_resnet50")
    resnet = optimize(seeded_weights(onnx.load(resnet)), "fold-constants").model
    cases = [
        ("ppocr_cls", cls, "prune-channels(target=top1:0.995,holdout=0.5)", lines,
         lambda m: f"agreement {agreement(cls, m, unseen):.4f} on 400 lines"),
        ("digits CNN", model,
         f"prune-channels(target=top1:0.995,holdout={half / len(x):.6f},round_to=1)",
         x, lambda m: f"top-1 {digits.top1(m, x_test[half:], y_test[half:]):.2f}% "
         f"(original {digits.top1(model, x_test[half:], y_test[half:]):.2f}) on {half + 1}"),
        ("resnet50", resnet, "prune-channels(ratio=0.3)", None,
         lambda m: "not checked (seeded weights)"),
    ]  # fmt: skip
    data = []
    for label, original, spec, x_feed, metric in cases:
        feeds = None
        if x_feed is not None:
            specs = model_inputs(original)
            feeds = ListFeeds(
                [{specs[0].name: x_feed[i : i + 1]} for i in range(len(x_feed))], specs
            )
        ctx = PassContext(feeds=feeds, threads=threads)
        result = optimize(original, spec, ctx)
        record, pruned = result.records[-1], result.model
        stats = record.stats
        one = next(iter(feeds)) if feeds is not None else None
        timing = bench([original, pruned], labels=["original", "pruned"], feeds=[one] if one
                       else None, threads=threads, runs=runs)  # fmt: skip
        (_, _, _, _), (_, _, r25, r50) = _ratios(timing, ["original", "pruned"])
        row = [
            label, spec, round(100 * stats["channels_removed"] / stats["channels_prunable"], 1),
            f"{stats.get('macs_before', inspect(original).macs) / 1e6:.3g} -> "
            f"{stats.get('macs_after', inspect(pruned).macs) / 1e6:.3g}",
            f"{stats['parameters_before'] / 1e3:.4g} -> {stats['parameters_after'] / 1e3:.4g}",
            metric(pruned), f"{r25:.2f}x", f"{r50:.2f}x",
        ]  # fmt: skip
        table.rows.append(row)
        data.append(dict(zip(table.columns, row, strict=True)))
        print(render_markdown([table]), file=sys.stderr)
    return table, data


def agreement(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    from onnxopt.test_models import textlines

    return float((textlines.predict(a, x) == textlines.predict(b, x)).mean())


def recovery_finding() -> tuple[Table, list]:
    """Why reconstruction made the text-direction classifier worse (issue 18).

    64 rendered lines (seed 1), the last 16 held out by the pass; per ratio, the
    held-out error without recovery, with reconstruction (before the pass's guard
    drops it) and the median of each consumer's own held-out output error.
    """
    from onnxopt.test_models import textlines

    model = optimize(onnx.load(fetch.fetch("ppocr_cls")), "simplify").model
    x = textlines.labelled_feeds(64, 1)[0]
    feeds = ListFeeds([{"x": x[i : i + 1]} for i in range(len(x))], model_inputs(model))
    table = Table(
        "Text-direction classifier, prune-channels(ratio=R,reconstruct=true), 48 lines "
        "fitted, 16 held out: model output vs each layer's own output",
        ["ratio", "cosine removed", "cosine reconstructed", "rel_error removed",
         "rel_error reconstructed", "layer error removed (median)",
         "layer error reconstructed (median)", "layers reconstructed", "returned"],
    )  # fmt: skip
    data = []
    for ratio in (0.05, 0.1, 0.2, 0.3):
        spec = f"prune-channels(ratio={ratio},reconstruct=true,latency_check=false)"
        stats = optimize(model, spec, PassContext(feeds=feeds)).records[-1].stats
        returned = "removed only" if stats.get("recovery_dropped") else "reconstructed"
        row = [
            ratio, stats["cosine_before_recovery"], stats["cosine_with_recovery"],
            stats["rel_error_before_recovery"], stats["rel_error_with_recovery"],
            stats["layer_error_removed_median"], stats["layer_error_reconstructed_median"],
            stats.get("reconstructed", 0), returned,
        ]  # fmt: skip
        table.rows.append(row)
        data.append(dict(zip(table.columns, row, strict=True)))
    return table, data


def publish(name: str, table: Table, rows: list, runs: int) -> None:
    """Print a table and keep it, with its rows as JSON, under benchmarks/results/NAME."""
    markdown = render_markdown([table])
    print(markdown)
    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / f"{name}.md", markdown)
    write_json(RESULTS / f"{name}.json", {"runs": runs, "rows": rows})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (default 30)")
    parser.add_argument("--skip-speed", action="store_true", help="coverage and accuracy only")
    parser.add_argument("--models", help="comma-separated labels to keep (default: all)")
    parser.add_argument("--round-to", action="store_true", help="only the round_to speed table")
    parser.add_argument("--threads", type=int, default=1, help="threads of --round-to (1)")
    parser.add_argument("--recovery", action="store_true", help="only the recovery finding")
    parser.add_argument("--targets", action="store_true", help="only the target table")
    args = parser.parse_args(argv)
    if args.targets:
        publish("prune_targets", *target_table(args.runs, args.threads), args.runs)
        return 0
    if args.recovery:
        table, data = recovery_finding()
        print(render_markdown([table]))
        return 0
    if args.round_to:
        publish("prune_round_to", *round_to_speed(args.runs, args.threads), args.runs)
        return 0
    selected = models()
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        selected = [m for m in selected if m[0] in wanted]
    cov, speed, records = coverage(selected, args.runs, args.skip_speed)
    acc, acc_data = accuracy()
    tables = [cov] + ([speed] if speed.rows else []) + [acc]
    stamp = datetime.date.today().isoformat()
    header = (
        f"Measured {stamp} with `python benchmarks/prune.py --runs {args.runs}` on "
        f"{platform.processor() or platform.machine()}, {platform.python_version()}.\n\n"
    )
    markdown = header + render_markdown(tables)
    print(markdown)
    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / "prune.md", markdown)
    write_json(
        RESULTS / "prune.json",
        {"date": stamp, "runs": args.runs, "models": records, "accuracy": acc_data},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
