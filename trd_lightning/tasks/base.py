"""The contract between a problem source and the rest of the framework.

A `Task` owns everything that is specific to a domain: where problems come from, how each of the
paper's contexts is rendered as text, and how a response is judged. Modules, data modules and
callbacks only ever talk to this protocol, so a real math task (or a user's own) drops in unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

Problem = Any  # a task-specific record; it must be picklable (it travels through DataLoaders)

SPLITS = ("train", "val", "test")


def problem_record(problem: Problem) -> Any:
    """A JSON-ready view of a problem record (a dataclass, a plain object, or anything else), for
    files that report on problems (predictions)."""
    import dataclasses

    if dataclasses.is_dataclass(problem):
        return dataclasses.asdict(problem)
    if hasattr(problem, "__dict__"):
        return dict(vars(problem))
    return problem


@runtime_checkable
class Task(Protocol):
    """What every component needs to know about a domain.

    Contexts (notation of the paper): the student sees `x` (`student_prompt`); the OPSD teacher sees
    `(x, y*)` (`privileged_prompt`); the TRD refiner sees `(x, y_o)` or `(x, y*, y_o)`
    (`refinement_prompt`). Every prompt is the text right before the first response token, so the
    same response tokens can follow any of them.

    A task should also have a ``correction_onsets`` attribute: the strings whose next-token mass
    signals that a writer starts a correction (``"!"`` here, ``"Wait"`` for real models), used by
    the prefix-failure audit. (It is not a protocol member because YAML type checking of
    protocols only considers methods.)
    """

    def problems(self, split: str) -> Sequence: ...

    def student_prompt(self, problem: Problem) -> str: ...

    def privileged_prompt(self, problem: Problem) -> str: ...

    def refinement_prompt(self, problem: Problem, attempt: str, *, privileged: bool = False) -> str: ...

    def reference_solution(self, problem: Problem) -> str: ...

    def verify(self, problem: Problem, response: str) -> bool: ...

    def problem_id(self, problem: Problem) -> int: ...
