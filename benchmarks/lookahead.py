"""How many tokens the student should draft per teacher forward in the splice reviser's decode.

    python -m benchmarks.lookahead                       # ~2 minutes on 2 CPU cores
    python -m benchmarks.lookahead --lookahead 1 2 3 4 6 --rounds 20
    python -m benchmarks.lookahead --split --lookahead 3 --pairs random   # time per model call too
    python -m benchmarks.lookahead --compaction --lookahead 3 --rounds 30  # with vs without dropping finished rows

`PrefixSpliceReviser` decodes speculatively: the student drafts ``lookahead`` tokens, the teacher
checks them in one forward (``lookahead=1``: one teacher step per token). More lookahead means
fewer teacher forwards but more student drafts thrown away after a rejection. This times one
fused revised rollout (``sample_revised``: the decode and everything around it, no training) per
lookahead, interleaved round by round in one process, for two pairs:

* ``random``: the random pair of ``benchmarks.throughput`` (64 x 2 student, 128 x 3 teacher),
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


def _build_module(pair: str, tmp: str, batch_size: int, student_size=(64, 2), teacher_size=(128, 3)):
    from benchmarks.throughput.harness import FixedLengthSampling, build_models

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


def _measure(pair: str, lookaheads: list[int], rounds: int, batch_size: int, device: str = "cpu", sizes=None) -> list[dict]:
    import torch

    from trd_lightning.revision import PrefixSpliceReviser

    with tempfile.TemporaryDirectory(prefix="trd_lookahead_") as tmp:
        module, problems = _build_module(pair, tmp, batch_size, *(sizes or ()))
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


def _split_calls(pair: str, lookahead: int, rounds: int, batch_size: int, device: str = "cpu", sizes=None) -> str:
    """Where one fused rollout's time goes: each model call timed (prefill or forward over k new
    tokens), the rest is sampling arithmetic and bookkeeping."""
    import collections

    import torch

    from trd_lightning import revision, splice_decode

    with tempfile.TemporaryDirectory(prefix="trd_lookahead_") as tmp:
        module, problems = _build_module(pair, tmp, batch_size, *(sizes or ()))
        module.to(device)
        student = module.model_for("student")
        spent, calls = collections.defaultdict(float), collections.Counter()
        model_step = splice_decode.model_step

        def timed(model, ids, mask, positions, cache, keep=1):
            start = time.perf_counter()
            out = model_step(model, ids, mask, positions, cache, keep)
            if device == "cuda":
                torch.cuda.synchronize()
            what = ("student" if model is student else "teacher") + (" prefill" if cache is None else f" forward, {ids.shape[1]} token(s)")
            spent[what] += time.perf_counter() - start
            calls[what] += 1
            return out

        reviser = revision.PrefixSpliceReviser(lookahead=lookahead)
        reviser.sample_revised(module, problems)  # warm-up
        splice_decode.model_step = timed
        try:
            start = time.perf_counter()
            for _ in range(rounds):
                reviser.sample_revised(module, problems)
            total = (time.perf_counter() - start) / rounds
        finally:
            splice_decode.model_step = model_step
    lines = [f"| {pair}, lookahead {lookahead} | calls per rollout | ms per call | ms per rollout |", "|---|---:|---:|---:|"]
    for what in sorted(spent):
        lines.append(f"| {what} | {calls[what] / rounds:.1f} | {1000 * spent[what] / calls[what]:.2f} | {1000 * spent[what] / rounds:.1f} |")
    rest = total - sum(spent.values()) / rounds
    lines.append(f"| the rest (sampling arithmetic, bookkeeping) | | | {1000 * rest:.1f} |")
    lines.append(f"| **one fused rollout** | | | **{1000 * total:.1f}** |")
    return "\n".join(lines)


def _compaction_ab(pair: str, lookahead: int, rounds: int, batch_size: int, device: str = "cpu", sizes=None) -> str:
    """The decode with and without dropping finished rows, interleaved. Without: the caches are
    made to look as if they could not select rows (the decode then keeps every row to the end)."""
    from transformers import DynamicCache

    from trd_lightning.revision import PrefixSpliceReviser

    select = DynamicCache.batch_select_indices

    def unavailable(self):
        raise AttributeError("batch_select_indices disabled by benchmarks.lookahead --compaction")

    times = {"with": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="trd_lookahead_") as tmp:
        module, problems = _build_module(pair, tmp, batch_size, *(sizes or ()))
        module.to(device)
        reviser = PrefixSpliceReviser(lookahead=lookahead)
        try:
            for i in range(rounds + 1):  # the first round warms up
                for mode in ("with", "without") if i % 2 else ("without", "with"):
                    DynamicCache.batch_select_indices = select if mode == "with" else property(unavailable)
                    start = time.perf_counter()
                    reviser.sample_revised(module, problems)
                    if device == "cuda":
                        import torch

                        torch.cuda.synchronize()
                    if i:
                        times[mode].append(time.perf_counter() - start)
        finally:
            DynamicCache.batch_select_indices = select
    with_, without = statistics.median(times["with"]), statistics.median(times["without"])
    return f"| {pair} | {lookahead} | {1000 * without:.0f} | {1000 * with_:.0f} | {with_ / without:.2f}× |"


def _table(rows: list[dict], first: int) -> str:
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
    parser.add_argument("--split", action="store_true", help="time every model call of the first --lookahead instead")
    parser.add_argument(
        "--compaction", action="store_true", help="compare the first --lookahead with and without dropping finished rows instead"
    )
    parser.add_argument("--student-size", type=int, nargs=2, default=[64, 2], metavar=("HIDDEN", "LAYERS"), help="random pair")
    parser.add_argument("--teacher-size", type=int, nargs=2, default=[128, 3], metavar=("HIDDEN", "LAYERS"), help="random pair")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/lookahead.md"), help="markdown output ('' for none)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.lookahead) < 1:
        parser.error("--rounds and every --lookahead must be >= 1")
    import torch

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu needs CUDA, and torch.cuda.is_available() is False here")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)  # called in-process (tests): leave the caller's setting


def _run(args, argv: list[str] | None) -> list[dict]:
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    sizes = (tuple(args.student_size), tuple(args.teacher_size))
    if args.split:
        for pair in args.pairs:
            print(_split_calls(pair, args.lookahead[0], args.rounds, args.batch_size, device, sizes if pair == "random" else None))
        return []
    if args.compaction:
        print("| pair | lookahead | ms, finished rows kept | ms, finished rows dropped | ratio |\n|---|---:|---:|---:|---:|")
        for pair in args.pairs:
            print(_compaction_ab(pair, args.lookahead[0], args.rounds, args.batch_size, device, sizes if pair == "random" else None))
        return []
    rows = [
        row
        for pair in args.pairs
        for row in _measure(pair, args.lookahead, args.rounds, args.batch_size, device, sizes if pair == "random" else None)
    ]
    report = "\n\n".join([
        "# Lookahead of the splice reviser's speculative decode",
        f"Command: `{' '.join(['python', '-m', 'benchmarks.lookahead', *(argv if argv is not None else sys.argv[1:])])}`",
        (
            f"Measured {datetime.datetime.now().isoformat(timespec='minutes')}, {args.threads} torch thread(s), batch "
            f"{args.batch_size}, median of {args.rounds} interleaved rollouts per run (one process; {device}). Random pair: "
            f"student {args.student_size[0]} × {args.student_size[1]}, teacher {args.teacher_size[0]} × {args.teacher_size[1]}."
        ),
        _table(rows, args.lookahead[0]),
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
