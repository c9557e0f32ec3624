"""The harness of the throughput benchmark: contenders run in their own processes and take turns
one step at a time (`run_interleaved`); each step is timed from its release to its end (`_Pacer`).
Also the pieces every contender shares: the `Setup`, the task's prompts, the saved random models
(`build_models`) and exactly ``--new-tokens`` tokens per rollout (`FixedLengthSampling`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trd_lightning.rollout import Sampling

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Setup:
    student: str
    teacher: str
    batch_size: int = 32
    new_tokens: int = 32
    lr: float = 1e-4
    steps: int = 30  # measured steps per contender
    warmup: int = 3  # dropped
    threads: int = 1
    train_size: int = 4096
    seed: int = 0
    accelerator: str = "cpu"  # "gpu": ours and the bare loop on CUDA (TRL rows are CPU-only here)
    student_size: tuple[int, int] = (64, 2)  # hidden size, layers
    teacher_size: tuple[int, int] = (128, 3)

    @property
    def total(self) -> int:
        return self.steps + self.warmup


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux



# --- pacing: one step at a time, timed from "go" to the end of the step ------------------------


def _wait_for_gpu() -> None:
    """A step ends when its kernels have run, not when they are queued."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _Pacer:
    """The worker side of the round-robin: blocks between steps, times each step from its release."""

    def __init__(self, conn, on_measured=None):
        self.conn, self.t0, self.count = conn, None, 0
        self.on_measured = on_measured

    def wait(self) -> None:
        msg = self.conn.recv()
        if msg not in ("go", "finish"):
            raise RuntimeError(f"unexpected message {msg!r}")
        self.t0 = time.perf_counter()

    def step_done(self, work: dict) -> None:
        _wait_for_gpu()
        seconds = time.perf_counter() - self.t0
        self.count += 1
        self.conn.send(("step", seconds, work))
        self.wait()


class _SoloPacer:
    """For --profile: no other process; records step times, starts the profiler after warm-up."""

    def __init__(self, warmup: int, profiler):
        self.warmup, self.profiler, self.times, self.works = warmup, profiler, [], []
        self.t0, self.count = None, 0

    def wait(self) -> None:
        self.t0 = time.perf_counter()

    def step_done(self, work: dict) -> None:
        _wait_for_gpu()
        self.times.append(time.perf_counter() - self.t0)
        self.works.append(work)
        self.count += 1
        if self.count == self.warmup:
            self.profiler.start()
        self.wait()


# --- shared pieces ----------------------------------------------------------------------------


def task_for(setup: Setup):
    from trd_lightning.tasks import ArithmeticTask

    return ArithmeticTask(train_size=setup.train_size, val_size=8, test_size=8, seed=setup.seed)


def train_prompts(setup: Setup) -> list[str]:
    task = task_for(setup)
    return [task.student_prompt(p) for p in task.problems("train")]


def load_models(setup: Setup):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(setup.student)
    teacher = AutoModelForCausalLM.from_pretrained(setup.teacher)
    student.train()  # from_pretrained returns eval mode
    teacher.eval().requires_grad_(False)
    return student, teacher



@dataclass
class FixedLengthSampling(Sampling):
    """Exactly ``max_new_tokens`` per rollout (EOS suppressed until then): equal work per step."""

    def __post_init__(self):
        self.min_new_tokens = self.max_new_tokens  # the Sampling field, so every sampler honours it
        super().__post_init__()



def build_models(root: Path, seed: int, student_size=(64, 2), teacher_size=(128, 3)) -> tuple[str, str]:
    """Random student and teacher ((hidden, layers) each; default 64 x 2 and 128 x 3), saved like checkpoints."""
    from trd_lightning.models import build_tiny_causal_lm
    from trd_lightning.tasks.arithmetic_tokenizer import build_arithmetic_tokenizer

    tok = build_arithmetic_tokenizer()
    paths = []
    for name, (hidden, layers), s in (("student", student_size, seed), ("teacher", teacher_size, seed + 1)):
        model = build_tiny_causal_lm(tok, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64), seed=s)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


@dataclass
class Result:
    name: str
    times: list[float] = dataclasses.field(default_factory=list)
    works: list[dict] = dataclasses.field(default_factory=list)
    rss_ready: float | None = None
    rss_peak: float | None = None
    error: str | None = None



def _worker(name: str, runner: Callable, setup: Setup, conn) -> None:
    """One contender's process: set up with ``runner(setup, pacer)``, then train step by step on the pipe's "go"."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(setup.threads)
    torch.manual_seed(setup.seed)
    try:
        pacer = _Pacer(conn)
        run = runner(setup, pacer)
        conn.send(("ready", _peak_rss_mb()))
        pacer.wait()
        run()
        conn.send(("done", _peak_rss_mb()))
    except Exception:
        conn.send(("error", traceback.format_exc()))



def run_interleaved(runners: dict[str, Callable], setup: Setup, log=print) -> dict[str, Result]:
    """Run every contender (name -> ``runner(setup, pacer)``, picklable: each runs in a spawned
    process) for ``setup.total`` round-robin steps; their step times and work, or their errors."""
    names = list(runners)
    ctx = mp.get_context("spawn")
    results = {n: Result(n) for n in names}
    conns, procs = {}, {}
    for n in names:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(n, runners[n], setup, child), daemon=True)
        p.start()
        conns[n], procs[n] = parent, p
    live = []
    for n in names:  # set-up happens in parallel, before any timing
        kind, payload = conns[n].recv()
        if kind == "error":
            results[n].error = payload
            log(f"[{n}] failed to set up:\n{payload}")
        else:
            results[n].rss_ready = payload
            live.append(n)
    log(f"set up: {', '.join(live)}; {setup.warmup} warm-up + {setup.steps} measured steps each, round-robin")
    for step in range(setup.total):
        k = step % max(len(live), 1)
        for n in live[k:] + live[:k]:  # rotated so that no contender always follows the same one
            if results[n].error:
                continue
            conns[n].send("go")
            kind, *payload = conns[n].recv()
            if kind == "error":
                results[n].error = payload[0]
                log(f"[{n}] failed:\n{payload[0]}")
                continue
            seconds, work = payload
            if step >= setup.warmup:
                results[n].times.append(seconds)
                results[n].works.append(work)
        if (step + 1) % 10 == 0:
            log(f"  round {step + 1}/{setup.total}")
    for n in live:
        if results[n].error:
            continue
        conns[n].send("finish")  # releases the last step; the loop has reached max_steps and ends
        kind, payload = conns[n].recv()
        if kind == "error":
            results[n].error = payload
        else:
            results[n].rss_peak = payload
    for p in procs.values():
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
    return results



def profile(name: str, runner: Callable, setup: Setup, kind: str, top: int) -> None:
    """Run one contender alone (no pacing processes) and print where its measured steps go."""
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(setup.threads)
    torch.manual_seed(setup.seed)
    if kind == "torch":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        prof = torch_profile(activities=[ProfilerActivity.CPU])

        class P:
            def start(self):
                prof.__enter__()

            def stop(self):
                prof.__exit__(None, None, None)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    else:
        cp = cProfile.Profile()

        class P:
            def start(self):
                cp.enable()

            def stop(self):
                cp.disable()
                stats = pstats.Stats(cp).strip_dirs()
                stats.sort_stats("cumulative").print_stats(top)
                stats.sort_stats("tottime").print_stats(top)

    p = P()
    pacer = _SoloPacer(setup.warmup, p)
    run = runner(setup, pacer)
    pacer.wait()
    run()
    p.stop()
    measured = pacer.times[setup.warmup:]
    print(f"{name}: median {statistics.median(measured):.3f} s/step over {len(measured)} profiled steps "
          f"(profiler overhead included); work {pacer.works[-1]}")

