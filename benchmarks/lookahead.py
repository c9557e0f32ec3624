"""How many tokens the student should draft per teacher forward in the splice reviser's decode.

    python benchmarks/lookahead.py                       # ~2 minutes on 2 CPU cores
    python benchmarks/lookahead.py --lookahead 1 2 3 4 6 --rounds 20

`PrefixSpliceReviser` decodes speculatively: the student drafts ``lookahead`` tokens, the teacher
checks them in one forward (``lookahead=1``: one teacher step per token). More lookahead means
fewer teacher forwards but more student drafts thrown away after a rejection. This times one
fused revised rollout (``sample_revised``: the decode and everything around it, no training) per
lookahead, interleaved round by round in one process, for two pairs:

* ``random``: the random pair of ``benchmarks/throughput.py`` (64 x 2 student, 128 x 3 teacher),
  proposals forced to 32 tokens: the teacher disowns almost every first token, so nearly every
  token is a restricted draw;
* ``trained``: the shipped arithmetic student and teacher (``trd_lightning/assets/arith``), the
  ``trd_splice.yaml`` settings (temperature 1, up to 48 tokens): revision where it is used.

The reference row is the OPD rollout of the same batch (`make_rollout`, then one teacher forward
for the loss): what the fused decode replaces.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build_module(pair: str, tmp: str, batch_size: int, student_size=(64, 2), teacher_size=(128, 3)):
    from throughput import FixedLengthSampling, build_models

    import trd_lightning
    from trd_lightning import DistillationModule, Sampling
    from trd_lightning.tasks import ArithmeticTask

    task = ArithmeticTask(train_size=max(64, batch_size), val_size=8, test_size=8, seed=0)
    if pair == "random":
        student, teacher = build_models(Path(tmp), seed=0, student_size=student_size, teacher_size=teacher_size)
        sampling = FixedLengthSampling(temperature=1.0, max_new_tokens=32)
    else:
        assets = Path(trd_lightning.__file__).parent / "assets" / "arith"
        student, teacher = str(assets / "student"), str(assets / "teacher")
        sampling = Sampling(temperature=1.0, max_new_tokens=48)
    module = DistillationModule(student=student, teacher=teacher, task=task, sampling=sampling)
    return module, list(task.problems("train"))[:batch_size]


def measure(pair: str, lookaheads: list[int], rounds: int, batch_size: int, device: str = "cpu", sizes=None) -> list[dict]:
    import torch

    from trd_lightning.revision import PrefixSpliceReviser

    with tempfile.TemporaryDirectory(prefix="trd_lookahead_") as tmp:
        module, problems = build_module(pair, tmp, batch_size, *(sizes or ()))
        module.to(device)

        def opd():
            with torch.no_grad():
                rollout = module.make_rollout(problems)
                module.score(rollout.teacher, role="teacher")
            return {}

        runs = {"OPD rollout + teacher forward": opd}
        for k in lookaheads:
            reviser = PrefixSpliceReviser(lookahead=k)
            runs[f"fused splice, lookahead {k}"] = lambda r=reviser: r.sample_revised(module, problems).info
        times = {name: [] for name in runs}
        infos = {name: [] for name in runs}
        for run in runs.values():  # warm-up
            run()
        for i in range(rounds):
            names = list(runs)
            for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order
                start = time.perf_counter()
                infos[name].append(runs[name]())
                if device == "cuda":  # the decode's host syncs leave the last kernels in flight
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["OPD rollout + teacher forward"])
    base = statistics.median(times[f"fused splice, lookahead {lookaheads[0]}"])
    rows = []
    for name in runs:
        median = statistics.median(times[name])
        info = infos[name]
        rows.append({
            "pair": pair,
            "run": name,
            "ms": 1000 * median,
            "vs_opd": median / reference,
            "vs_first": median / base if name != "OPD rollout + teacher forward" else None,
            "teacher_forwards": statistics.mean(x["teacher_forwards"] for x in info) if info[0] else None,
            "acceptance": statistics.mean(x["lookahead_acceptance"] for x in info) if info[0] else None,
        })
    return rows


def table(rows: list[dict], first: int) -> str:
    lines = [
        f"| pair | run | ms (median) | ÷ OPD rollout | ÷ lookahead {first} | teacher forwards | drafts kept |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, spec, unit=""):
        return "" if value is None else format(value, spec) + unit

    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['run']} | {r['ms']:.0f} | {r['vs_opd']:.2f}× | {fmt(r['vs_first'], '.2f', '×')}"
            f" | {fmt(r['teacher_forwards'], '.1f')} | {fmt(r['acceptance'], '.0%')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookahead", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--pairs", nargs="+", choices=["random", "trained"], default=["random", "trained"])
    parser.add_argument("--rounds", type=int, default=15, help="timed rollouts per run (interleaved)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--student-size", type=int, nargs=2, default=[64, 2], metavar=("HIDDEN", "LAYERS"), help="random pair")
    parser.add_argument("--teacher-size", type=int, nargs=2, default=[128, 3], metavar=("HIDDEN", "LAYERS"), help="random pair")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/lookahead.md"), help="markdown output ('' for none)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.lookahead) < 1:
        parser.error("--rounds and every --lookahead must be >= 1")
    import torch

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu needs CUDA, and torch.cuda.is_available() is False here")
    torch.set_num_threads(args.threads)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    sizes = (tuple(args.student_size), tuple(args.teacher_size))
    rows = [
        row
        for pair in args.pairs
        for row in measure(pair, args.lookahead, args.rounds, args.batch_size, device, sizes if pair == "random" else None)
    ]
    report = "\n\n".join([
        "# Lookahead of the splice reviser's speculative decode",
        f"Command: `{' '.join(['python', 'benchmarks/lookahead.py', *(argv if argv is not None else sys.argv[1:])])}`",
        (
            f"Measured {datetime.datetime.now().isoformat(timespec='minutes')}, {args.threads} torch thread(s), batch "
            f"{args.batch_size}, median of {args.rounds} interleaved rollouts per run (one process; {device}). Random pair: "
            f"student {args.student_size[0]} × {args.student_size[1]}, teacher {args.teacher_size[0]} × {args.teacher_size[1]}."
        ),
        table(rows, args.lookahead[0]),
        (
            "teacher forwards: per rollout (prefill excluded); drafts kept: the share of drafted tokens kept, "
            "the rest were dropped after a rejection or past a row's end."
        ),
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return rows


if __name__ == "__main__":
    main()
