"""Rollout engines side by side: tokens/s of a rollout and seconds of an OPD step, per engine and size.

    python benchmarks/rollout_engines.py                  # in a venv with vLLM (the CPU build: see .ci/run)
    python benchmarks/rollout_engines.py --rounds 3 --sizes shipped   # a quick look

Same work for every engine: the same student (the shipped 1.1M-parameter arithmetic student, and
a 25M-parameter Llama built from config with the arithmetic tokenizer), the same 64 prompts, and
exactly ``--new-tokens`` sampled tokens per row at temperature 1, fp32 (stopping is switched off:
``min_new_tokens`` for generate and vLLM, no stop ids for continuous batching; each engine's token
count is checked before its numbers are printed). A *step* is one OPD step as the module runs
it: the engine's rollout (for vLLM including the weight push that follows every update), a
teacher forward without grad, the student's forward and backward (reverse KL), one AdamW step.
Engines take turns one round at a time, the order rotated every round, so load from other jobs
hits them alike; warm-up rounds are dropped (vLLM's first call compiles and allocates) and the
table gives medians and the ratio to ``hf`` measured in the same run.

The law check draws ``--law-samples`` first tokens of one prompt from each engine (temperature
1.5, top-p 0.9, shipped student) and gives the total variation to `sampling_law` of the model's
logits, next to the gap a correct sampler shows at that sample size.

Without vLLM importable the ``vllm`` rows say so and the other engines still run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
import transformers  # noqa: E402

from trd_lightning.engines import ENGINES, make_engine  # noqa: E402
from trd_lightning.engines.base import sampling_law  # noqa: E402
from trd_lightning.losses import compute_loss  # noqa: E402
from trd_lightning.models import build_tiny_causal_lm, load_causal_lm  # noqa: E402
from trd_lightning.rollout import Context, Sampling, encode_prompts, response_logits  # noqa: E402
from trd_lightning.tasks import ArithmeticTask  # noqa: E402
from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer  # noqa: E402

_SIZES = {"shipped": None, "25M": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536)}


def _build_student(size: str, tokenizer, folder: str) -> torch.nn.Module:
    if _SIZES[size] is None:
        return load_causal_lm("builtin:arith/student", trainable=True)
    model = build_tiny_causal_lm(tokenizer, seed=0, **_SIZES[size])
    model.save_pretrained(folder)  # a real checkpoint, loaded back like any other
    return load_causal_lm(folder, trainable=True)


def _forced(engine_name: str, new_tokens: int, tokenizer) -> dict:
    """How each engine is made to sample exactly ``new_tokens`` tokens per row."""
    if engine_name == "hf_continuous":  # it has no min_new_tokens
        return {"stop_ids": []}
    return {"min_new_tokens": new_tokens, "stop_ids": [tokenizer.eos_token_id]}


def rollout(engine, name, model, tok, ids, mask, sampling, new_tokens):
    out, out_mask = engine.generate(model, tok, ids, mask, sampling, **_forced(name, new_tokens, tok))
    return out, out_mask


def _opd_step(engine, name, student, teacher, tok, ids, mask, sampling, optimizer, new_tokens):
    """Rollout, teacher forward, student forward/backward (reverse KL), AdamW: the module's step."""
    start = time.perf_counter()
    out, out_mask = rollout(engine, name, student, tok, ids, mask, sampling, new_tokens)
    rollout_s = time.perf_counter() - start
    ctx = Context.joined(ids, mask, out, out_mask)
    with torch.no_grad():
        t_logits = response_logits(teacher, ctx)
    loss = compute_loss("reverse_kl", response_logits(student, ctx), t_logits, out_mask, tokens=out)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return rollout_s, time.perf_counter() - start, int(out_mask.sum())


def _law_gap(engine, model, tok, n: int) -> tuple[float, float]:
    sampling = Sampling(temperature=1.5, top_p=0.9, max_new_tokens=1)
    ids, mask = encode_prompts(tok, ["3+4*2-5="], "cpu")
    with torch.no_grad():
        law = sampling_law(model(input_ids=ids, attention_mask=mask).logits[0, -1], sampling)
    torch.manual_seed(0)
    out, _ = engine.generate(model, tok, ids, mask, sampling, num_return_sequences=n)
    counts = torch.bincount(out[:, 0], minlength=law.numel()).float()
    return 0.5 * (counts / n - law).abs().sum().item(), 0.5 * ((law > 0).sum().item() / n) ** 0.5


def _available(names):
    ok, missing = [], {}
    for name in names:
        try:
            make_engine(name).check(build_tiny_causal_lm(build_arithmetic_tokenizer(), hidden_size=32, num_layers=1, num_heads=2), build_arithmetic_tokenizer(), Sampling())
            ok.append(name)
        except (ImportError, ValueError) as err:
            missing[name] = str(err).split(";")[0]
    return ok, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    parser.add_argument("--sizes", nargs="+", default=list(_SIZES), choices=list(_SIZES))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--law-samples", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads wait on each other)")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tok = build_arithmetic_tokenizer()
    names, missing = _available(args.engines)
    task = ArithmeticTask(min_steps=3, max_steps=5)
    problems = [task.problems("train")[i] for i in range(args.rows)]
    prompts = [task.student_prompt(p) for p in problems]
    ids, mask = encode_prompts(tok, prompts, "cpu")
    sampling = Sampling(temperature=1.0, max_new_tokens=args.new_tokens)
    lines = [
        f"`python benchmarks/rollout_engines.py {' '.join(os.sys.argv[1:])}`, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
        f"{args.threads} torch thread(s), torch {torch.__version__}, transformers {transformers.__version__}"
        + (f", vllm {__import__('vllm').__version__}" if "vllm" in names else "")
        + f"; {args.rows} rows x {args.new_tokens} forced tokens, temperature 1, fp32, median of {args.rounds} rounds after {args.warmup} warm-up",
        "",
        "| size | engine | rollout s | rollout tok/s | OPD step s | rollout ÷ hf | step ÷ hf |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            students = {n: _build_student(size, tok, os.path.join(folder, size)) for n in names}
            teacher = _build_student(size, tok, os.path.join(folder, size)).eval().requires_grad_(False)
            n_params = sum(p.numel() for p in teacher.parameters())
            engines = {n: make_engine(n) for n in names}
            optims = {n: torch.optim.AdamW(students[n].parameters(), lr=1e-5) for n in names}
            times = {n: [] for n in names}
            for r in range(args.warmup + args.rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for n in order:
                    torch.manual_seed(r)
                    roll_s, step_s, tokens = _opd_step(engines[n], n, students[n], teacher, tok, ids, mask, sampling, optims[n], args.new_tokens)
                    if tokens != args.rows * args.new_tokens:
                        raise RuntimeError(f"{n} sampled {tokens} tokens, not {args.rows * args.new_tokens}: the work differs")
                    if r >= args.warmup:
                        times[n].append((roll_s, step_s))
                print(f"{size} round {r}: " + ", ".join(f"{n} {times[n][-1][1]:.2f}s" if times[n] else n for n in order), flush=True)
            med = {n: (statistics.median(t[0] for t in times[n]), statistics.median(t[1] for t in times[n])) for n in names}
            base = med.get("hf")
            for n in names:
                roll, step = med[n]
                ratio = (f"{roll / base[0]:.2f}×", f"{step / base[1]:.2f}×") if base else ("–", "–")
                lines.append(f"| {size} ({n_params / 1e6:.1f}M) | {n} | {roll:.3f} | {args.rows * args.new_tokens / roll:,.0f} | {step:.3f} | {ratio[0]} | {ratio[1]} |")
            for n in missing:
                lines.append(f"| {size} | {n} | not run: {missing[n]} | | | | |")
            for e in engines.values():
                e.close()
        lines += ["", f"Sampling law (shipped student, one prompt, {args.law_samples} first tokens, temperature 1.5, top-p 0.9):", "",
                  "| engine | total variation to the softmax law | expected for a correct sampler (≤) |", "|---|---:|---:|"]
        model = load_causal_lm("builtin:arith/student", trainable=False)
        for n in names:
            tv, expected = _law_gap(make_engine(n), model, tok, args.law_samples)
            lines.append(f"| {n} | {tv:.4f} | {expected:.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":  # vLLM may spawn processes: keep the entry point guarded
    main()
