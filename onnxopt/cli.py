"""The `onnxopt` command: parse arguments, call the API, render the report.

Errors a user can act on arrive as OnnxoptError and are printed as one line
with a non-zero exit; nothing is written when a command fails.
"""

from __future__ import annotations

import argparse
import base64
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import api, args_checks
from .data import Feed, FeedSource, feed_shapes, parse_shapes
from .errors import FeedError, OnnxoptError, VerificationFailed, command_line_voice
from .files import output_file, write_error
from .report import (
    Table,
    bench_tables,
    pipeline_tables,
    render_html,
    render_markdown,
    render_terminal,
    verify_tables,
    write_json,
    write_text,
)
from .summary import summary_tables

# Piped output is read in files and CI logs: do not wrap tables at 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 160)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"onnxopt: error: {message} (see '{self.prog} --help')\n")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )


class _Ticking(FeedSource):
    """Feeds that advance a progress bar as they are consumed."""

    def __init__(self, inner: FeedSource, progress: Progress, label: str):
        self.inner, self.specs = inner, inner.specs
        self.task = progress.add_task(label, total=len(inner))
        self.progress = progress

    def __iter__(self) -> Iterator[Feed]:
        for feed in self.inner:
            yield feed
            self.progress.advance(self.task)

    def __len__(self) -> int:
        return len(self.inner)


class _Subcommands:
    """Adds every subcommand with the shared -q/--quiet flag."""

    def __init__(self, action: Any, parent: argparse.ArgumentParser):
        self.action, self.parent = action, parent

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.parent], **kwargs)


def _common(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    if data:
        parser.add_argument("--data", help=".npz file, folder of .npz files, or image folder")
        parser.add_argument(
            "--image-mean",
            type=args_checks.channels,
            default="0,0,0",
            help="image folders: per-channel mean after scaling (default 0,0,0)",
        )
        parser.add_argument(
            "--image-std",
            type=args_checks.channels,
            default="1,1,1",
            help="image folders: per-channel std after scaling (default 1,1,1)",
        )
        parser.add_argument(
            "--image-scale",
            type=float,
            default=1 / 255,
            help="image folders: pixel scale before mean/std (default 1/255)",
        )
        parser.add_argument("--image-layout", choices=["NCHW", "NHWC"], default="NCHW")
        parser.add_argument(
            "--samples",
            type=args_checks.count(1),
            default=8,
            help="random feeds to generate when --data is not given (default 8)",
        )
    parser.add_argument(
        "--shape",
        action="append",
        type=args_checks.shape,
        metavar="NAME=DIMS",
        help="bind an input's dynamic dims, e.g. x=1x3x640x640 (repeatable)",
    )
    parser.add_argument(
        "--providers",
        default="cpu",
        help="execution providers in priority order: cpu,cuda,tensorrt,...",
    )
    parser.add_argument(
        "--threads", type=args_checks.count(1), help="intra-op threads (default: ORT's choice)"
    )
    parser.add_argument("--seed", type=int, default=0)


class _Version(argparse.Action):
    """Print onnxopt's version with the onnx and ORT it runs on (what a bug report needs),
    importing them only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib import metadata

        import onnx
        import onnxruntime

        version = f"onnxopt {metadata.version('onnxopt')} (onnx {onnx.__version__}, "
        print(version + f"onnxruntime {onnxruntime.__version__})")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxopt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version, nargs=0, help="show the versions and exit")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    sub = _Subcommands(
        parser.add_subparsers(dest="command", required=True, parser_class=_Parser), quiet
    )

    p = sub.add_parser("optimize", help="run passes on a model and write the result")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--passes",
        default=api.DEFAULT_PIPELINE,
        help="pass spec, e.g. 'fold-constants,prune-channels(ratio=0.3)'",
    )
    p.add_argument("--strict", action="store_true", help="fail instead of rolling a pass back")
    p.add_argument("--json", help="write the pass report as JSON")
    p.add_argument("--report", help="also write the HTML report of the result (see 'report')")
    _common(p)

    p = sub.add_parser("verify", help="compare a candidate model's outputs with a reference")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--min-cosine", type=float, help="also require this cosine per output")
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="also compare intermediate tensors that share a name",
    )
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--markdown", help="write the tables as Markdown")
    p.add_argument("--budget", help="lossy verdict: e.g. cosine:0.99,top1:0.99 (implies --lossy)")
    p.add_argument("--lossy", action=argparse.BooleanOptionalAction, help="override metadata")
    p.add_argument("--map-threshold", type=float, default=0.3, help="probability maps (0.3)")
    _common(p)

    p = sub.add_parser("analyze", help="per-layer error of a quantized model, ranked")
    p.add_argument("reference", help="the float model the quantized one was made from")
    p.add_argument("quantized")
    p.add_argument("--json", help="write the ranking as JSON")
    p.add_argument("--html", help="write the tables and a plot as HTML")
    p.add_argument("--top", type=int, default=20, help="rows on the terminal (JSON/HTML: all)")
    _common(p)

    p = sub.add_parser("bench", help="latency of models on execution providers, interleaved")
    p.add_argument("models", nargs="+")
    p.add_argument("--runs", type=args_checks.count(1), default=100)
    p.add_argument("--warmup", type=args_checks.count(0), default=10)
    p.add_argument("--json", help="write the timings as JSON")
    p.add_argument("--markdown", help="write the table as Markdown")
    _common(p)

    p = sub.add_parser("inspect", help="ops, parameters, MACs, size, opset, inputs and outputs")
    p.add_argument("model")
    p.add_argument("--shape", action="append", type=args_checks.shape, metavar="NAME=DIMS")
    p.add_argument(
        "--prune-groups",
        action="store_true",
        help="also list the channel groups prune-channels sees, and why any is frozen",
    )
    p.add_argument("--json", help="write the summary as JSON")

    p = sub.add_parser(
        "report", help="one HTML page: passes, model diff, verify, per layer, latency"
    )
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("-o", "--output", required=True, help="the .html file to write")
    p.add_argument("--runs", type=int, default=30, help="timed runs for the latency table")
    _common(p)

    p = sub.add_parser("passes", help="list the available passes, or show one in full")
    p.add_argument("name", nargs="?", help="a pass: its rules and every option")
    p.add_argument("--json", help="write the list as JSON")

    p = sub.add_parser("demo", help="simplify, quantize and prune the digits models; the proof")
    p.add_argument("--out-dir", help="keep the demo models here (default: a temporary folder)")
    p.add_argument("--runs", type=args_checks.count(1), default=50)
    p.add_argument("--report", default="demo-report.html", help="HTML report file name")
    return parser


def _feeds(args: argparse.Namespace, model: Any) -> FeedSource | None:
    """The feeds the options describe, or None when neither --data nor --samples applies."""
    if args.data is None:
        return None
    try:
        mean = tuple(float(v) for v in args.image_mean.split(","))
        std = tuple(float(v) for v in args.image_std.split(","))
    except ValueError:
        raise FeedError("--image-mean and --image-std take numbers such as 0.5,0.5,0.5") from None
    options = {"mean": mean, "std": std, "scale": args.image_scale, "layout": args.image_layout}
    return api.load_feeds(
        api.load_model(model), args.data, shapes=parse_shapes(args.shape), image_options=options
    )


def _show(tables: Sequence[Table], quiet: bool) -> None:
    if not quiet:
        render_terminal(tables, console)


def _optimize(args: argparse.Namespace) -> int:
    shapes = parse_shapes(args.shape)
    output = output_file(args.output, default_name=Path(args.model).name)
    with _progress() as progress:
        tasks: dict[str, Any] = {}

        def report(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=total)
            progress.update(tasks[label], completed=done, total=total)

        feeds = _feeds(args, args.model)
        result = api.optimize_file(
            args.model,
            args.output,
            progress=report,
            passes=args.passes,
            data=feeds,
            shape=shapes,
            providers=args.providers,
            threads=args.threads,
            seed=args.seed,
            strict=args.strict,
            samples=args.samples,
            reports={"--json": args.json, "--report": args.report},
        )
    tables = pipeline_tables(result)
    if feeds is not None and len(feeds):
        # MACs at the size of the data given, unless --shape says otherwise.
        shapes = feed_shapes(next(iter(feeds)), feeds.specs) | shapes
    before, after = api.inspect(args.model, shapes), api.inspect(output, shapes)
    compare = Table("Model", ["", "before", "after"])
    compare.rows += [
        ["nodes", before.nodes, after.nodes],
        ["model bytes", f"{before.model_bytes:,}", f"{after.model_bytes:,}"],
        ["parameters", f"{before.parameters:,}", f"{after.parameters:,}"],
        ["MACs", before.macs_text, after.macs_text],
    ]
    compare.notes.append(f"written to {output}")
    _show([*tables, compare], args.quiet)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.report:
        _write_report(args, args.model, str(output), pipeline=result)
    return 0


def _write_report(args: argparse.Namespace, reference: str, candidate: str, **kw: Any) -> None:
    from .proof import build_report

    feeds = _feeds(args, reference)
    if feeds is None:
        model = api.load_model(reference)
        feeds = api.load_feeds(model, None, shapes=parse_shapes(args.shape), count=args.samples)
    with _progress() as progress:
        progress.add_task("measuring the report", total=None)
        page = build_report(
            reference,
            candidate,
            feeds,
            runs=getattr(args, "runs", 30),
            threads=args.threads,
            providers=[p for p in args.providers.split(",") if p],
            shapes=parse_shapes(args.shape),
            **kw,
        )
    write_text(getattr(args, "report", None) or args.output, page)


def _report(args: argparse.Namespace) -> int:
    from .files import check_outputs

    check_outputs(
        {"-o": args.output}, args_checks.reads([args.reference, args.candidate], args.data)
    )
    _write_report(args, args.reference, args.candidate)
    if not args.quiet:
        console.print(f"report written to {args.output}", markup=False, highlight=False)
    return 0


def _verify(args: argparse.Namespace) -> int:
    args_checks.check_reports(args, [args.reference, args.candidate])
    shapes = parse_shapes(args.shape)
    reference = api.load_model(args.reference)
    api.load_model(args.candidate)
    feeds = _feeds(args, args.reference)
    if feeds is None:  # not `or`: an empty --data is an error, not a cue for random feeds
        feeds = api.load_feeds(reference, None, shapes=shapes, count=args.samples, seed=args.seed)
    with _progress() as progress:
        result = api.verify(
            reference,
            args.candidate,
            _Ticking(feeds, progress, "verifying"),
            rtol=args.rtol,
            atol=args.atol,
            min_cosine=args.min_cosine,
            per_layer=args.per_layer,
            providers=args.providers.split(","),
            threads=args.threads,
            lossy=args.lossy,
            budget=args.budget,
            map_threshold=args.map_threshold,
        )
    tables = verify_tables(result)
    _show(tables, args.quiet)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.markdown:
        write_text(args.markdown, render_markdown(tables))
    if not result.passed:
        failed = [o.name for o in result.outputs if not result.judge(o)[0]]
        if not result.lossy:
            raise VerificationFailed(
                f"outputs {failed} differ beyond rtol={args.rtol:g}, atol={args.atol:g}"
            )
        misses = "; ".join(m for o in result.outputs for m in result.judge(o)[1])
        raise VerificationFailed(f"outputs {failed} miss the accuracy budget: {misses}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze

    args_checks.check_reports(args, [args.reference, args.quantized])
    if args.top < 1:
        raise FeedError(f"--top takes a number of rows >= 1, got {args.top}")
    with _progress() as progress:
        task = progress.add_task("analyzing", total=None)
        result = analyze(
            args.reference,
            args.quantized,
            _feeds(args, args.reference),
            providers=args.providers.split(","),
            threads=args.threads,
            shapes=parse_shapes(args.shape),
            samples=args.samples,
            seed=args.seed,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    _show(result.tables(max_rows=args.top), args.quiet)
    tables = result.tables()
    if args.json:
        write_json(args.json, result.to_dict())
    if args.html:
        png = result.plot_png()
        images = [base64.b64encode(png).decode()] if png else []
        write_text(args.html, render_html(tables, title="onnxopt analyze", images=images))
    return 0


def _bench(args: argparse.Namespace) -> int:
    args_checks.check_reports(args, args.models)
    shapes = parse_shapes(args.shape)
    providers = [p for p in args.providers.split(",") if p]
    with _progress() as progress:
        task = progress.add_task("benchmarking", total=args.runs)
        result = api.bench(
            args.models,
            providers,
            data=_feeds(args, args.models[0]),
            shape=shapes,
            threads=args.threads,
            warmup=args.warmup,
            runs=args.runs,
            seed=args.seed,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    tables = bench_tables(result)
    _show(tables, args.quiet)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.markdown:
        write_text(args.markdown, render_markdown(tables))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    args_checks.check_reports(args, [args.model])
    shapes = parse_shapes(args.shape)
    model = api.load_model(args.model)
    summary = api.inspect(model, shapes)
    tables = summary_tables(summary, Path(args.model).name)
    data = summary.to_dict()
    if args.prune_groups:
        from .passes.prune_channels import analyze, group_table

        tables.append(group_table(model, shapes))
        data["channel_groups"] = [
            {
                "id": g.id,
                "classes": g.size,
                "channels": g.channels,
                "producers": g.producers,
                "consumers": g.consumers,
                "frozen": g.frozen,
            }
            for g in analyze(model, shapes)
        ]
    _show(tables, args.quiet)
    if args.json:
        write_json(args.json, data)
    return 0


def _passes(args: argparse.Namespace) -> int:
    args_checks.check_reports(args, [])
    listing = api.list_passes()
    if args.name:
        item = api.describe(args.name)
        columns = ["group", "option", "type", "default", "what it does"]
        tables = [Table(f"{item['name']}: {item['summary']}", columns)]
        group = None
        for option in item["options"]:
            default = "unset" if option["default"] is None else fmt_option(option["default"])
            shown = option["group"] if option["group"] != group else ""
            group = option["group"]
            tables[0].rows.append([shown, option["name"], option["type"], default, option["help"]])
        if not args.quiet:
            console.print(item["description"], markup=False, highlight=False)
        listing = [item]
    else:
        tables = [Table("Passes (onnxopt passes NAME shows one in full)", ["name", "what it does"])]
        for item in listing:
            options = ", ".join(o["name"] for o in item["options"])
            tables[0].rows.append(
                [item["name"], item["summary"] + (f" Options: {options}." if options else "")]
            )
    _show(tables, args.quiet)
    if args.json:
        write_json(args.json, {"passes": listing})
    return 0


def fmt_option(value: Any) -> str:
    """An option value as a spec writes it: lists in brackets, booleans lower case."""
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    tables, passed = run_demo(args.out_dir, runs=args.runs, report=args.report)
    _show(tables, args.quiet)
    if not passed:
        raise VerificationFailed("a demo result fails verify (see the table)")
    return 0


COMMANDS: dict[str, Any] = {
    "optimize": _optimize,
    "verify": _verify,
    "analyze": _analyze,
    "bench": _bench,
    "inspect": _inspect,
    "passes": _passes,
    "report": _report,
    "demo": _demo,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` removes its temporary files."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    with command_line_voice():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (main() called from a worker): leave it be
        previous = None
    try:
        args = build_parser().parse_args(argv)
        api.quiet_libraries()
        if args.quiet:
            logging.getLogger("onnxopt").setLevel(logging.ERROR)
        return COMMANDS[args.command](args)
    except OnnxoptError as exc:
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("onnxopt: terminated; no partial file was left", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("onnxopt: interrupted; no partial file was left", file=sys.stderr)
        return 130
    except OSError as exc:  # a report that could not be written after the checks passed
        print(f"onnxopt: error: {write_error(Path(exc.filename or '?'), exc)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
