"""The embedded arithmetic task: answers, derivations, refinements, splits and its tokenizer."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from trd_lightning.tasks import ArithmeticTask
from trd_lightning.tasks.arithmetic import ArithmeticProblem, apply, parse_steps, sft_example, split_of


def brute_force_answer(expression: str) -> int:
    value = int(expression[0])
    for op, digit in zip(expression[1::2], expression[2::2]):
        value = {"+": value + int(digit), "-": value - int(digit), "*": value * int(digit)}[op] % 10
    return value


def test_reference_solution_and_verifier_agree_with_brute_force(task):
    for p in list(task.problems("test")) + list(task.problems("val")):
        assert p.answer == brute_force_answer(p.expression)
        assert task.verify(p, p.reference) and task.verify(p, p.reference + "<eos>")
        assert not task.verify(p, p.reference[:-1] + str((p.answer + 1) % 10))
        assert not task.verify(p, p.reference[:-2])  # no answer written


def test_several_valid_derivations_exist_and_all_verify():
    task = ArithmeticTask()
    p = ArithmeticProblem((3, 4, 2, 5), ("+", "*", "-"))
    rng = random.Random(0)
    solutions = {task.sample_solution(p, rng, swap_prob=0.5)[0] for _ in range(50)}
    assert len(solutions) >= 3 and p.reference in solutions
    for s in solutions:
        assert task.verify(p, s)
        for x, op, y, r in parse_steps(s):
            assert apply(op, x, y) == r  # every step is arithmetic that holds


def test_noisy_text_masks_wrong_digits_and_shows_both_continuations():
    task = ArithmeticTask()
    p = ArithmeticProblem((3, 4, 2, 5, 1), ("+", "*", "-", "+"))
    rng = random.Random(1)
    after_error = set()
    for _ in range(200):
        text, mask = task.sample_solution(p, rng, error_prob=0.3, fix_prob=0.5)
        assert len(text) == len(mask)
        for i, trainable in enumerate(mask):
            if not trainable:  # an untrained character is exactly a wrong result digit
                assert text[i - 1] == "=" and text[i].isdigit()
                after_error.add(text[i + 1])
    assert after_error == {"!", "|", "#"} or {"!", "|"} <= after_error  # carry on and correct both occur


def test_refined_solution_keeps_correct_steps_and_fixes_the_rest():
    task = ArithmeticTask()
    p = ArithmeticProblem((3, 4, 2, 5), ("+", "*", "-"))  # 3+4=7 | 7*2=4 | 4-5=9 #9
    attempt = "4+3=7|2*7=5|5-5=0#0"  # swapped correct first step, wrong second step
    refined = task.refined_solution(p, attempt)
    assert refined.startswith("4+3=7|")  # the attempt's own correct step, verbatim
    assert task.verify(p, refined) and refined.split("|")[1] in ("7*2=4", "2*7=4")
    assert task.refined_solution(p, p.reference) == p.reference  # a correct attempt stays as it is


def test_contexts_are_what_the_paper_describes(task):
    p = task.problems("test")[0]
    assert task.student_prompt(p) == f"Q{p.expression}S"
    assert task.privileged_prompt(p) == f"R{p.reference}Q{p.expression}S"
    assert task.refinement_prompt(p, "1+1=2") == f"Q{p.expression}A1+1=2S"
    assert task.refinement_prompt(p, "1+1=2", privileged=True) == f"R{p.reference}Q{p.expression}A1+1=2S"
    long = "1" * 500
    assert task.refinement_prompt(p, long).count("1") - p.expression.count("1") == task.max_attempt_chars


def test_splits_never_overlap_by_construction():
    task = ArithmeticTask(val_size=200, test_size=200)
    train = {task.problems("train")[i].expression for i in range(3000)}
    val = {p.expression for p in task.problems("val")}
    test = {p.expression for p in task.problems("test")}
    assert len(val) == 200 and len(test) == 200  # de-duplicated
    assert not (train & val) and not (train & test) and not (val & test)
    assert all(split_of(e) == "train" for e in train)
    # Problems are generated deterministically from (seed, index).
    assert task.problems("train")[17] == ArithmeticTask().problems("train")[17]


def test_sft_formats_and_unknown_format():
    task = ArithmeticTask()
    p = task.problems("train")[0]
    rng = random.Random(0)
    prompt, response, mask = sft_example(task, p, rng, "privileged")
    assert prompt == task.privileged_prompt(p) and response == p.reference and all(mask)
    prompt, response, _ = sft_example(task, p, rng, "privileged_refine")
    assert prompt.startswith(f"R{p.reference}Q") and task.verify(p, response)
    with pytest.raises(ValueError, match="unknown SFT format 'nosiy'"):
        sft_example(task, p, rng, "nosiy")
    with pytest.raises(ValueError, match="unknown split"):
        task.problems("dev")


def test_tokenizer_round_trips_through_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "R3+4=7|7*2=4#4Q3+4*2S3+4=7!3+4=7#7"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(loaded(text)["input_ids"]) == len(text)  # one token per character
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token, loaded.eos_token, loaded.padding_side) == ("<pad>", "<eos>", "left")
