"""The embedded default task: mod-10 arithmetic chains that a 1M-parameter model learns on a CPU.

A problem is an expression evaluated left to right modulo 10, e.g. ``3+4*2-5`` (answer 9). A
solution writes one step per operation and ends with the answer::

    3+4=7|7*2=4|4-5=9#9

Why this shape (each property is one the paper's method needs to be observable):

* several valid derivations: ``+`` and ``*`` steps may be written with either operand first
  (``7*2=4`` or ``2*7=4``), so distinct correct trajectories exist for every problem;
* privileged information: the canonical reference solution (``R...`` section, for OPSD);
* a refinement format: problem + attempt (``A...``) -> a corrected solution that keeps the attempt's
  correct steps verbatim and recomputes from its first error on (what a TRD refiner writes);
* a prefix-failure signature: the teacher's training text (`noisy_solution`) sometimes contains a
  wrong step, after which the writer either carries on from the wrong value or writes the
  correction onset ``!`` and redoes the step, so a teacher conditioned on a student's wrong step
  splits its next-token mass between carrying on (``|``) and correcting (``!``);
* disjoint splits by construction: a problem's split is a hash of its expression.

Context markers are single tokens: ``R`` reference, ``Q`` problem, ``A`` attempt, ``S`` solution.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from functools import cached_property

from trd_lightning.tasks.base import SPLITS

OPS = "+-*"
CORRECTION = "!"
_STEP = re.compile(r"^(\d)([+\-*])(\d)=(\d)$")
_ANSWER = re.compile(r"#(\d)\s*$")


def apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return (a + b) % 10
    if op == "-":
        return (a - b) % 10
    return (a * b) % 10


class ArithmeticProblem:
    """One problem. A plain class on purpose: Lightning's batch transfer descends into (and
    rebuilds) dataclasses and namedtuples, and refuses frozen ones; problems are not tensors."""

    def __init__(self, operands: tuple[int, ...], ops: tuple[str, ...]):
        self.operands, self.ops = tuple(operands), tuple(ops)

    def __eq__(self, other) -> bool:
        return isinstance(other, ArithmeticProblem) and (self.operands, self.ops) == (other.operands, other.ops)

    def __hash__(self) -> int:
        return hash((self.operands, self.ops))

    def __repr__(self) -> str:
        return f"ArithmeticProblem({self.expression!r})"

    @cached_property
    def expression(self) -> str:
        return str(self.operands[0]) + "".join(op + str(b) for op, b in zip(self.ops, self.operands[1:]))

    @cached_property
    def running_values(self) -> tuple[int, ...]:
        values = [self.operands[0]]
        for op, b in zip(self.ops, self.operands[1:]):
            values.append(apply(op, values[-1], b))
        return tuple(values)

    @property
    def answer(self) -> int:
        return self.running_values[-1]

    def step_text(self, i: int, swap: bool = False, value: int | None = None, result: int | None = None) -> str:
        """Step ``i`` as text; ``value`` overrides the running value (a carried-on error)."""
        a = self.running_values[i] if value is None else value
        op, b = self.ops[i], self.operands[i + 1]
        r = apply(op, a, b) if result is None else result
        x, y = (b, a) if swap and op != "-" else (a, b)
        return f"{x}{op}{y}={r}"

    @cached_property
    def reference(self) -> str:
        steps = "|".join(self.step_text(i) for i in range(len(self.ops)))
        return f"{steps}#{self.answer}"


def split_of(expression: str) -> str:
    """Deterministic split so train/val/test never share a problem: 80/10/10 by hash."""
    bucket = zlib.crc32(expression.encode()) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


class ProblemSet(Sequence):
    """Problems of one split, generated on demand from ``(seed, index)``.

    The training split is virtual (large, generated lazily, duplicates possible); evaluation splits
    are materialised once and de-duplicated so every problem counts once in Pass@k.

    Args:
        split: ``train``, ``val`` or ``test``.
        size: number of problems.
        seed: seed of the generator (problem ``i`` is drawn from ``(seed, split, i)``).
        min_steps / max_steps: range of the number of operations.
        unique: de-duplicate (evaluation splits) instead of generating lazily (training).
    """

    def __init__(self, split: str, size: int, seed: int, min_steps: int, max_steps: int, unique: bool):
        self.split, self.size, self.seed = split, size, seed
        self.min_steps, self.max_steps = min_steps, max_steps
        self._items: list[ArithmeticProblem] | None = None
        if unique:
            seen: dict[str, ArithmeticProblem] = {}
            i = 0
            while len(seen) < size:
                p = self._generate(i)
                seen.setdefault(p.expression, p)
                i += 1
                if i > 50 * size:
                    raise ValueError(f"cannot draw {size} distinct {split} problems; lower the size")
            self._items = list(seen.values())

    def _generate(self, index: int) -> ArithmeticProblem:
        rng = random.Random(f"{self.seed}:{self.split}:{index}")
        while True:
            n = rng.randint(self.min_steps, self.max_steps)
            p = ArithmeticProblem(
                tuple(rng.randrange(10) for _ in range(n + 1)), tuple(rng.choice(OPS) for _ in range(n))
            )
            if split_of(p.expression) == self.split:
                return p

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        index %= self.size
        return self._items[index] if self._items is not None else self._generate(index)


def parse_steps(attempt: str) -> list[tuple[int, str, int, int] | None]:
    """The steps of an attempt as ``(x, op, y, result)``; a corrected step counts as its last redo."""
    body = attempt.split("#", 1)[0]
    steps = []
    for chunk in body.split("|"):
        chunk = chunk.rsplit(CORRECTION, 1)[-1]
        m = _STEP.match(chunk)
        steps.append((int(m[1]), m[2], int(m[3]), int(m[4])) if m else None)
    return steps


class ArithmeticTask:
    """The embedded default `Task`: mod-10 arithmetic chains (see the module docstring for the format).

    Args:
        min_steps: fewest operations in a problem (>= 1).
        max_steps: most operations in a problem (>= ``min_steps``).
        train_size: problems in the (virtual, lazily generated) training split.
        val_size: distinct validation problems (0: none).
        test_size: distinct test problems (0: none).
        seed: seed of the problem generator (a problem's split is a hash of its expression, so
            the splits stay disjoint for every seed).
        max_attempt_chars: longest attempt kept in a refinement context (the rest is cut).
    """

    correction_onsets = (CORRECTION,)

    def __init__(
        self,
        min_steps: int = 3,
        max_steps: int = 5,
        train_size: int = 1_000_000,
        val_size: int = 64,
        test_size: int = 128,
        seed: int = 0,
        max_attempt_chars: int = 64,
    ):
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
        if max_attempt_chars < 1:
            raise ValueError(f"max_attempt_chars must be >= 1, got {max_attempt_chars}")
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if size < 0:
                raise ValueError(f"{name} must be >= 0 (0: no {name[:-5]} problems), got {size}")
        self.min_steps, self.max_steps, self.seed = min_steps, max_steps, seed
        self.max_attempt_chars = max_attempt_chars
        self._sizes = {"train": train_size, "val": val_size, "test": test_size}
        self._sets: dict[str, ProblemSet] = {}

    # --- Task protocol -------------------------------------------------------------------------
    def problems(self, split: str) -> Sequence:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if split not in self._sets:
            self._sets[split] = ProblemSet(
                split, self._sizes[split], self.seed, self.min_steps, self.max_steps, unique=split != "train"
            )
        return self._sets[split]

    def student_prompt(self, problem: ArithmeticProblem) -> str:
        return f"Q{problem.expression}S"

    def privileged_prompt(self, problem: ArithmeticProblem) -> str:
        return f"R{problem.reference}Q{problem.expression}S"

    def refinement_prompt(self, problem: ArithmeticProblem, attempt: str, *, privileged: bool = False) -> str:
        # Truncate the attempt, never the response: the refiner only needs the attempt's start to
        # keep its correct steps, and the refinement context must stay within the model's limit.
        attempt = clean_response(attempt)[: self.max_attempt_chars]
        ref = f"R{problem.reference}" if privileged else ""
        return f"{ref}Q{problem.expression}A{attempt}S"

    def reference_solution(self, problem: ArithmeticProblem) -> str:
        return problem.reference

    def verify(self, problem: ArithmeticProblem, response: str) -> bool:
        m = _ANSWER.search(clean_response(response))
        return bool(m) and int(m[1]) == problem.answer

    def problem_id(self, problem: ArithmeticProblem) -> int:
        return zlib.crc32(problem.expression.encode())

    # --- optional hook: coverage of alternative valid derivations (PassAtKEvaluation) ----------
    def valid_derivations(self, problem: ArithmeticProblem) -> list[str]:
        """Every clean correct solution: each ``+``/``*`` step with either operand first.

        A step whose operands are equal (``3*3``) or that subtracts has one written form, so a
        problem has ``2 ** (commutative steps with distinct operands)`` derivations.
        """
        options = []
        for i, op in enumerate(problem.ops):
            a, b = problem.running_values[i], problem.operands[i + 1]
            options.append((False, True) if op != "-" and a != b else (False,))
        out = [""]
        for i, swaps in enumerate(options):
            sep = "|" if i else ""
            out = [prefix + sep + problem.step_text(i, swap=s) for prefix in out for s in swaps]
        return [o + f"#{problem.answer}" for o in out]

    def derivation(self, problem: ArithmeticProblem, response: str) -> tuple[bool, ...] | None:
        """Which valid derivation a correct response follows: the operand order of each step
        (``True`` = swapped), or ``None`` when it is not one (wrong answer, a wrong or missing step,
        text that is not a step). A corrected step (``3+4=8!4+3=7``) counts as its last redo, as
        `parse_steps` reads it, so a self-corrected solution counts under the derivation it ends in.
        """
        if not self.verify(problem, response):
            return None
        steps = parse_steps(clean_response(response))
        if len(steps) != len(problem.ops):
            return None
        key = []
        for i, got in enumerate(steps):
            a, b, r = problem.running_values[i], problem.operands[i + 1], problem.running_values[i + 1]
            if got is None or got[1] != problem.ops[i] or got[3] != r:
                return None
            if (got[0], got[2]) == (a, b):
                key.append(False)
            elif (got[0], got[2]) == (b, a) and problem.ops[i] != "-":
                key.append(True)
            else:
                return None
        return tuple(key)

    # --- optional hook: the prefix audit aligns its statistics on the verifier's first error ----
    def first_error_char(self, problem: ArithmeticProblem, response: str) -> int | None:
        """Index of the first character where ``response`` stops being a prefix of every correct
        solution (either operand order per step), or ``None`` if it is exactly a correct solution.

        For the usual failure this is the first wrong result digit; a wrong operand counts too, and
        a self-corrected slip (``3+4=8!3+4=7``) still reports the slip. A response that stops early
        (EOS or the token budget) reports ``len(response)``: its end is the mistake. ``response`` is
        the decoded text without special tokens, so with the char-level tokenizer the index is also
        the token index in the response block.
        """
        pos, last = 0, len(problem.ops) - 1
        for i in range(len(problem.ops)):
            tail = "|" if i < last else f"#{problem.answer}"
            candidates = {problem.step_text(i) + tail, problem.step_text(i, swap=True) + tail}
            match = next((c for c in candidates if response.startswith(c, pos)), None)
            if match is None:
                return pos + max(_common_prefix(response[pos:], c) for c in candidates)
            pos += len(match)
        return None if pos == len(response) else pos

    # --- text the tiny models are trained on (SFT) ---------------------------------------------
    def refined_solution(self, problem: ArithmeticProblem, attempt: str) -> str:
        """What an ideal refiner writes: the attempt's correct steps verbatim, then correct steps.

        Operand order is taken from the attempt wherever it wrote that step, so the refined
        trajectory stays close to the student's own (on-policy support, softly).
        """
        parsed = parse_steps(clean_response(attempt))
        steps = []
        for i in range(len(problem.ops)):
            a, b = problem.running_values[i], problem.operands[i + 1]
            got = parsed[i] if i < len(parsed) else None
            swap = got is not None and got[0] == b and got[2] == a and a != b
            steps.append(problem.step_text(i, swap=swap))
        return "|".join(steps) + f"#{problem.answer}"

    def sample_solution(
        self,
        problem: ArithmeticProblem,
        rng: random.Random,
        *,
        swap_prob: float = 0.3,
        error_prob: float = 0.0,
        fix_prob: float = 0.5,
    ) -> tuple[str, list[bool]]:
        """A solution by a writer who sometimes errs; returns the text and a per-character mask.

        The mask is False on wrong result digits: a teacher trained on this text learns what to do
        *after* an error (carry on or correct, the split the paper diagnoses) without learning to
        make errors itself.
        """
        text, trainable = [], []

        def emit(s: str, train: bool = True):
            text.append(s)
            trainable.extend([train] * len(s))

        value = problem.operands[0]
        for i, op in enumerate(problem.ops):
            b = problem.operands[i + 1]
            swap = rng.random() < swap_prob
            right = apply(op, value, b)
            if i:
                emit("|")
            if rng.random() < error_prob:
                wrong = rng.choice([d for d in range(10) if d != right])
                step = problem.step_text(i, swap=swap, value=value, result=wrong)
                emit(step[:-1])
                emit(step[-1], train=False)
                if rng.random() < fix_prob:
                    emit(CORRECTION + problem.step_text(i, swap=swap, value=value, result=right))
                    value = right
                else:
                    value = wrong
            else:
                emit(problem.step_text(i, swap=swap, value=value, result=right))
                value = right
        emit(f"#{value}")
        return "".join(text), trainable

    def sample_attempt(self, problem: ArithmeticProblem, rng: random.Random) -> str:
        """A plausible (often wrong, sometimes cut short) student attempt, to teach refinement."""
        attempt, _ = self.sample_solution(
            problem, rng, error_prob=rng.choice([0.0, 0.2, 0.4]), fix_prob=0.2, swap_prob=0.3
        )
        if rng.random() < 0.15:
            attempt = attempt[: rng.randrange(1, len(attempt) + 1)]
        return attempt


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def clean_response(text: str) -> str:
    """Strip whitespace and special tokens that a decode may leave behind."""
    return re.sub(r"<[^>]*>", "", text).strip()


SFT_FORMATS = ("clean", "noisy", "privileged", "refine", "privileged_refine")


def sft_example(task: ArithmeticTask, problem: ArithmeticProblem, rng: random.Random, fmt: str, error_prob: float = 0.15):
    """One supervised example ``(prompt, response, per-character trainable mask)`` of a format.

    ``noisy`` is the teacher's text with wrong steps that are carried on or corrected; ``refine``
    teaches the TRD refiner; ``privileged*`` teach a student to read the reference (OPSD teacher).
    """
    if fmt == "clean":
        response, mask = task.sample_solution(problem, rng)
        return task.student_prompt(problem), response, mask
    if fmt == "noisy":
        response, mask = task.sample_solution(problem, rng, error_prob=error_prob)
        return task.student_prompt(problem), response, mask
    if fmt == "privileged":
        response = problem.reference
        return task.privileged_prompt(problem), response, [True] * len(response)
    if fmt in ("refine", "privileged_refine"):
        attempt = task.sample_attempt(problem, rng)
        response = task.refined_solution(problem, attempt)
        prompt = task.refinement_prompt(problem, attempt, privileged=fmt == "privileged_refine")
        return prompt, response, [True] * len(response)
    raise ValueError(f"unknown SFT format {fmt!r}; choose one of {SFT_FORMATS}")
