"""`MathTask`: competition math from local jsonl / parquet files, judged by math-verify.

Data: one record per problem with three fields (names configurable):

* ``problem``  the question (the student's context ``x``);
* ``solution`` a worked reference solution ``y*`` (the privileged information of OPSD);
* ``answer``   the final answer the verifier compares against (LaTeX or plain, e.g. ``\\frac{1}{2}``).

Files are read with ``datasets`` (local files only, nothing is downloaded). Bad data fails at the
first ``problems(split)`` call, naming the file, the line (jsonl) or row (parquet) and the field.

Prompts are rendered with the model's chat template (``apply_chat_template(...,
add_generation_prompt=True, tokenize=False)``) so each context ends right where the assistant's
response starts, which is what lets one response block follow every context (`rollout.py`). A
response is correct when the last ``\\boxed{...}`` in it is mathematically equal to the answer.

The refinement contexts follow ../PAPER.md: OPD rewrites the attempt keeping its structure and
correct steps and fixing errors; OPSD additionally sees the reference and makes the attempt
consistent with it while keeping its useful parts.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from trd_lightning.tasks.base import SPLITS

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

PRIVILEGED = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n\n"
    "Using the reference solution as a guide, write your own complete step-by-step solution. {instruction}"
)
REFINE = (
    "Here is a math problem and an attempted solution.\n\nProblem:\n{problem}\n\nAttempted solution:\n{attempt}\n\n"
    "Rewrite the attempted solution. Keep its structure and every step that is correct, fix the steps that "
    "are wrong and continue correctly from there. {instruction}"
)
REFINE_PRIVILEGED = (
    "Here is a math problem, a reference solution and an attempted solution.\n\nProblem:\n{problem}\n\n"
    "Reference solution:\n{solution}\n\nAttempted solution:\n{attempt}\n\n"
    "Rewrite the attempted solution so that it is consistent with the reference solution, while keeping "
    "the useful parts of the original attempt (its structure and its correct steps). {instruction}"
)


@dataclass(frozen=True)
class MathProblem:
    problem: str
    solution: str
    answer: str
    source: str  # "file:line" (jsonl) or "file:row" (parquet), for error messages and audits


# --- answers ----------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    found = list(_BOXED.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end():]
    if not rest.lstrip().startswith("{"):
        token = rest.split()  # "\boxed 5"
        return token[0].rstrip(".$") if token else None
    i = len(rest) - len(rest.lstrip())
    depth = 0
    for j in range(i, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[j], 0)
        if depth == 0:
            return rest[i + 1 : j]
    return None  # unbalanced: an unfinished answer does not count


def _timeouts() -> dict[str, Any]:
    # math-verify enforces its timeouts with signals, which only the main thread may use.
    main = threading.current_thread() is threading.main_thread()
    return {} if main else {"parsing_timeout": None}


@lru_cache(maxsize=65536)
def _parse_gold(answer: str):
    from math_verify import parse

    gold = parse(f"${answer}$", **_timeouts())
    return gold or parse(answer, **_timeouts())


def answers_match(answer: str, response: str) -> bool:
    from math_verify import parse, verify

    boxed = last_boxed(response)
    if boxed is None or not boxed.strip():
        return False
    gold = _parse_gold(answer)
    pred = parse(f"${boxed}$", **_timeouts())
    if not gold or not pred:
        return False
    timeout = {} if threading.current_thread() is threading.main_thread() else {"timeout_seconds": None}
    return bool(verify(gold, pred, **timeout))


# --- reading files ----------------------------------------------------------------------------
def _check_value(value: Any, key: str, where: str, fix: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field {key!r} is empty; {fix}")
    if isinstance(value, (list, dict, tuple)):
        # str() would make "['1', '2']" a gold answer that no response ever matches
        raise ValueError(f"{where}: field {key!r} is a {type(value).__name__} ({str(value)[:60]}); it must be text or a number")
    if isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} is a boolean ({value}); it must be text or a number")
    return str(value)


def read_problems(path: str | Path, keys: dict[str, str | None], limit: int | None = None) -> list[MathProblem]:
    """Problems of one file (jsonl validated line by line, parquet through `datasets`).

    Built from the rows read now (the checked jsonl records / a parquet table), not through
    ``load_dataset``'s cache, which keys local files by path and modification time: a file
    replaced by another with the same mtime was read from the cache, with the old rows."""
    from datasets import Dataset

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass a local .jsonl or .parquet file")
    suffix = path.suffix.lower()
    fix = "fix the file or set problem_key / solution_key / answer_key to the field names it uses"
    required = [k for k in keys.values() if k is not None]
    if suffix in (".jsonl", ".json"):
        # The rows were parsed (and checked) line by line already; Arrow would also coerce a
        # column whose rows mix 2 and "2".
        lines, records = _validate_jsonl(path, required, fix)
        data = {key: [r.get(key) for r in records] for key in required}
        where = lambda i: f"{path}, line {lines[i]}"  # noqa: E731
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            data = Dataset(pq.read_table(path))
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{path} is not a readable parquet file ({str(err).splitlines()[0][:120]}); write it with pandas/datasets to_parquet, or use .jsonl") from None
        missing = [k for k in required if k not in data.column_names]
        if missing:
            raise ValueError(
                f"{path}: no column {missing[0]!r} (from row 1 on; columns: {data.column_names}); {fix}"
            )
        where = lambda i: f"{path}, row {i + 1}"  # noqa: E731
    else:
        raise ValueError(f"unsupported data file {str(path)!r}: use .jsonl (one JSON object per line) or .parquet")
    rows = len(lines) if isinstance(data, dict) else len(data)
    n = rows if limit is None else min(limit, rows)
    columns = {role: data[key][:n] if key is not None else None for role, key in keys.items()}
    problems = []
    for i in range(n):
        problem = _check_value(columns["problem"][i], keys["problem"], where(i), fix)
        solution = _check_value(columns["solution"][i], keys["solution"], where(i), fix)
        if columns["answer"] is not None:
            answer = _check_value(columns["answer"][i], keys["answer"], where(i), fix)
        else:
            answer = last_boxed(solution)
            if answer is None:
                raise ValueError(f"{where(i)}: answer_key is null but the solution has no \\boxed{{}} answer; {fix}")
        problems.append(MathProblem(problem, solution, answer, where(i)))
    return problems


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise _DuplicateKey(dup)
    return dict(pairs)


class _DuplicateKey(ValueError):
    pass


def _validate_jsonl(path: Path, required: list[str], fix: str) -> tuple[list[int], list[dict]]:
    """Line numbers and records; a malformed line or a missing field is an error naming the line."""
    lines, records = [], []
    with path.open("rb") as f:
        raw_lines = f.read().split(b"\n")
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}, line {number}: not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as dup:
            raise ValueError(f"{path}, line {number}: field {str(dup)!r} appears twice; keep one") from None
        except json.JSONDecodeError as err:
            if number == 1 and line.lstrip().startswith("["):
                raise ValueError(
                    f"{path} looks like a JSON array; a .jsonl file holds one JSON object per line "
                    "(convert it, e.g. jq -c '.[]' file.json > file.jsonl)"
                ) from None
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if isinstance(record, list) and number == 1:
            raise ValueError(f"{path} holds a JSON array; a .jsonl file holds one JSON object per line (jq -c '.[]' file.json > file.jsonl)")
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{path}, line {number}: no field {missing[0]!r} (fields: {sorted(record)}); {fix}")
        lines.append(number)
        records.append(record)
    if not lines:
        raise ValueError(f"{path} holds no records")
    return lines, records


# --- the task ---------------------------------------------------------------------------------
class MathTask:
    """Math problems from local files, chat-template prompts, math-verify answers.

    Args:
        train_file / val_file / test_file: ``.jsonl`` or ``.parquet``; a split without a file has
            no problems (disable that loop, e.g. ``trainer.limit_val_batches: 0``).
        tokenizer: directory of the tokenizer whose chat template renders the prompts (usually the
            student's path); ``null`` renders plain ``Problem: ... Solution:`` text.
        problem_key / solution_key / answer_key: field names in the files; ``answer_key: null``
            takes the answer from the last ``\\boxed{}`` of the solution.
        system_prompt: optional system turn.
        instruction: appended to the problem in every user turn.
        chat_template_kwargs: extra template variables (Qwen3: ``{enable_thinking: false}``).
        max_attempt_chars: attempts longer than this are cut (their start is kept) in ``c_r``;
            default: no cut here (`RewriteReviser` shortens an attempt only when ``c_r`` exceeds
            the refiner's token budget, and counts it).
        max_problems: read at most this many problems per split (smoke runs).
    """

    correction_onsets = ("Wait", " Wait", "Actually", " Actually", "Hmm", " Hmm", "Alternatively", " Alternatively")

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        tokenizer: str | None = None,
        problem_key: str = "problem",
        solution_key: str = "solution",
        answer_key: str | None = "answer",
        system_prompt: str | None = None,
        instruction: str = INSTRUCTION,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_attempt_chars: int | None = None,
        max_problems: int | None = None,
    ):
        if max_attempt_chars is not None and max_attempt_chars < 1:
            raise ValueError(f"max_attempt_chars must be >= 1, got {max_attempt_chars}")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        for split, f in self.files.items():
            if f is not None and not Path(f).expanduser().is_file():
                raise FileNotFoundError(f"{split}_file {f!r} does not exist; pass a local .jsonl or .parquet file")
        self.keys = {"problem": problem_key, "solution": solution_key, "answer": answer_key}
        self.tokenizer_path = tokenizer
        self.system_prompt, self.instruction = system_prompt, instruction
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.max_attempt_chars, self.max_problems = max_attempt_chars, max_problems
        self._problems: dict[str, list[MathProblem]] = {}
        self._tokenizer = None
        if tokenizer is not None:
            self._load_tokenizer()  # fail on a bad path now, not at the first prompt

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = Path(self.tokenizer_path).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"tokenizer {self.tokenizer_path!r} is not a directory; pass the model directory whose "
                    "chat template renders the prompts (usually the student's path), or null for plain text"
                )
            tok = AutoTokenizer.from_pretrained(path)
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"the tokenizer at {self.tokenizer_path!r} has no chat_template; set tokenizer: null for plain-text prompts")
            self._tokenizer = tok
        return self._tokenizer

    def check_tokenizer_reads(self, tokenizer, split: str, role: str = "student") -> None:
        """Refuse a tokenizer that maps this task's text to its unknown token (the shipped
        arithmetic tokenizer knows digits and operators only): the model would read ``<unk>``
        for every word and every score would be meaningless, with no error anywhere."""
        unk = getattr(tokenizer, "unk_token_id", None)
        problems = self.problems(split)
        if unk is None or not problems:
            return  # byte-level vocabularies have no unknown token: every text is readable
        prompt = self.student_prompt(problems[0])
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        unknown = sum(i == unk for i in ids)
        if unknown:
            words = [w for w in prompt.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
            raise ValueError(
                f"model.init_args.{role}: its tokenizer cannot read the math task's {split} prompts: {unknown} of "
                f"{len(ids)} tokens of the first prompt are the unknown token {tokenizer.unk_token!r} "
                f"(e.g. {words[:3]}; a {len(tokenizer)}-token vocabulary"
                + (", the arithmetic task's" if len(tokenizer) < 100 else "")
                + "); use a student and teacher whose tokenizer reads text (e.g. configs/qwen3/), or the arithmetic task"
            )

    # --- Task protocol ------------------------------------------------------------------------
    def problems(self, split: str) -> Sequence:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if split not in self._problems:
            f = self.files[split]
            self._problems[split] = [] if f is None else read_problems(f, self.keys, self.max_problems)
        return self._problems[split]

    def messages(self, user: str) -> list[dict[str, str]]:
        """The conversation of one user turn (with the system turn, when one is set)."""
        return ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": user}
        ]

    def chat_messages(self, problem: MathProblem) -> list[dict[str, str]] | None:
        """The conversation behind `student_prompt` (``None`` for plain-text prompts): what a
        pre-flight check renders through the teacher's template too."""
        return None if self.tokenizer_path is None else self.messages(f"{problem.problem}\n\n{self.instruction}")

    def render(self, user: str) -> str:
        """One user turn as the text right before the assistant's first token."""
        if self.tokenizer_path is None:
            system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            return f"{system}Problem: {user}\n\nSolution: "
        return self._load_tokenizer().apply_chat_template(
            self.messages(user), add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs
        )

    def student_prompt(self, problem: MathProblem) -> str:
        return self.render(f"{problem.problem}\n\n{self.instruction}")

    def privileged_prompt(self, problem: MathProblem) -> str:
        return self.render(PRIVILEGED.format(problem=problem.problem, solution=problem.solution, instruction=self.instruction))

    def refinement_prompt(self, problem: MathProblem, attempt: str, *, privileged: bool = False) -> str:
        # Keep the attempt's start: the refiner needs its structure and first steps, and the
        # context must stay within the refiner's length limit.
        attempt = attempt.strip()[: self.max_attempt_chars]  # [:None] keeps it whole
        template = REFINE_PRIVILEGED if privileged else REFINE
        return self.render(
            template.format(problem=problem.problem, solution=problem.solution, attempt=attempt, instruction=self.instruction)
        )

    def reference_solution(self, problem: MathProblem) -> str:
        return problem.solution

    def verify(self, problem: MathProblem, response: str) -> bool:
        return answers_match(problem.answer, response)

    def problem_id(self, problem: MathProblem) -> int:
        return zlib.crc32(problem.problem.encode())

    def __getstate__(self):
        # Tokenizers pickle, but re-loading from the path in a worker is cheaper and always valid.
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state
