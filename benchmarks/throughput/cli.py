"""The command line of the throughput benchmark (``python -m benchmarks.throughput --help``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import throughput
from benchmarks.throughput import report
from benchmarks.throughput.contenders import OPT_IN, RUNNERS
from benchmarks.throughput.harness import ROOT, Result, Setup, build_models, profile, run_interleaved


def main(argv: list[str] | None = None) -> dict[str, Result]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=throughput.__doc__.split("\n\n")[0])
    parser.add_argument(
        "--contenders", nargs="+", default=[n for n in RUNNERS if n not in OPT_IN], choices=list(RUNNERS),
        help=f"default: all but {', '.join(OPT_IN)}",
    )
    parser.add_argument("--steps", type=int, default=30, help="measured steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="dropped steps per contender")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="rollout length (forced)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per contender (1: on a shared machine, 2 OpenMP threads on 2 busy cores stall each other)",
    )
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="gpu: ours and the bare loop on CUDA")
    parser.add_argument("--student-size", type=int, nargs=2, default=[64, 2], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--teacher-size", type=int, nargs=2, default=[128, 3], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/throughput.md"), help="markdown output ('' for none)")
    parser.add_argument("--profile", choices=list(RUNNERS), help="profile one contender alone instead")
    parser.add_argument("--profiler", choices=["cprofile", "torch"], default="cprofile")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.accelerator == "gpu":
        cpu_only = [n for n in args.contenders if n.startswith("trl")]
        if cpu_only:
            parser.error(f"{cpu_only} run on the CPU only; leave them out with --accelerator gpu")
        import torch

        if not torch.cuda.is_available():
            parser.error("--accelerator gpu needs CUDA, and torch.cuda.is_available() is False here")

    with tempfile.TemporaryDirectory(prefix="trd_throughput_") as tmp:
        student_size, teacher_size = tuple(args.student_size), tuple(args.teacher_size)
        student, teacher = build_models(Path(tmp), seed=0, student_size=student_size, teacher_size=teacher_size)
        setup = Setup(
            student, teacher, batch_size=args.batch_size, new_tokens=args.new_tokens, steps=args.steps,
            warmup=args.warmup, threads=args.threads,
            train_size=max(4096, args.batch_size * (args.steps + args.warmup)),
            accelerator=args.accelerator, student_size=student_size, teacher_size=teacher_size,
        )
        if args.profile:
            profile(args.profile, RUNNERS[args.profile], setup, args.profiler, args.top)
            return {}
        load_before = os.getloadavg()
        started = time.perf_counter()
        results = run_interleaved({name: RUNNERS[name] for name in args.contenders}, setup)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()

    command = "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report.render(results, setup, load_before, load_after, wall)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.markdown(command, text))
        print(f"\nwritten to {out}")
    return results
