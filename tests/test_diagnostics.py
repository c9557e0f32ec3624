"""Prefix-failure statistics against direct computations on hand-made distributions (a unimodal,
a bimodal and a uniform one), t* under both criteria, alignment around the first error, the
correction-onset token check, empty rollouts, and the arithmetic task's first-error hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trd_lightning.decoding import top_p_support

from trd_lightning import diagnostics as D
from trd_lightning.losses import forward_kl, reverse_kl
from trd_lightning.tasks.arithmetic import ArithmeticProblem

UNIMODAL = [0.96, 0.01, 0.01, 0.01, 0.01]
BIMODAL = [0.45, 0.03, 0.45, 0.04, 0.03]  # "carry on" (0) vs "correct" (2)
UNIFORM = [0.2] * 5
ONSETS = [2, 4]


def hand_batch():
    """One row, three positions: the teacher unimodal, bimodal, uniform; the student differs."""
    teacher = np.array([UNIMODAL, BIMODAL, UNIFORM])
    student = np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.2, 0.3, 0.2, 0.2]])
    tokens = np.array([0, 0, 4])  # the last sampled token is itself a correction onset
    as_logits = lambda p: torch.tensor(np.log(p), dtype=torch.float32).unsqueeze(0)  # noqa: E731
    return teacher, student, tokens, as_logits(student), as_logits(teacher), torch.tensor(tokens).unsqueeze(0)


def test_every_statistic_matches_a_direct_computation():
    q, p, y, s_logits, t_logits, ids = hand_batch()
    d = D.rollout_diagnostics(s_logits, t_logits, ids, torch.ones(1, 3, dtype=torch.bool), ONSETS)
    rows = np.arange(3)
    expected = {
        "teacher_entropy": -(q * np.log(q)).sum(-1),
        "student_entropy": -(p * np.log(p)).sum(-1),
        "teacher_logprob": np.log(q[rows, y]),
        "forward_kl": (q * np.log(q / p)).sum(-1),
        "reverse_kl": (p * np.log(p / q)).sum(-1),
        "top1_prob": np.sort(q, -1)[:, -1],
        "top2_prob": np.sort(q, -1)[:, -2],
        "bimodality": 2 * np.sort(q, -1)[:, -2],
        "onset_mass": q[:, ONSETS].sum(-1),
        "continue_mass": np.where(np.isin(y, ONSETS), 0.0, q[rows, y]),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(getattr(d, name)[0].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    # Known values: uniform entropy log 5; bimodality 0.02 / 0.9 / 2/V; the bimodal row splits 0.45/0.45.
    assert d.teacher_entropy[0, 2].item() == pytest.approx(math.log(5), abs=1e-5)
    assert d.bimodality[0].tolist() == pytest.approx([0.02, 0.9, 0.4], abs=1e-5)
    assert d.continue_mass[0, 2].item() == 0.0, "a sampled onset token is not 'continuing'"
    # The standalone per-position functions agree with the batched one.
    t_logp = D.log_probs(t_logits)
    torch.testing.assert_close(-(t_logp.exp() * t_logp).sum(-1), d.teacher_entropy)
    torch.testing.assert_close(D.bimodality(t_logits), d.bimodality)
    torch.testing.assert_close(D.onset_mass(t_logits, ONSETS), d.onset_mass)
    torch.testing.assert_close(D.continue_mass(t_logits, ids, ONSETS), d.continue_mass)
    torch.testing.assert_close(D.token_logprob(t_logits, ids), d.teacher_logprob)


def test_kl_means_agree_with_the_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    ids = torch.randint(0, 11, (3, 7), generator=g)
    d = D.rollout_diagnostics(s, t, ids, mask, [1])
    assert d.mean("forward_kl") == pytest.approx(float(forward_kl(s, t, mask)), rel=1e-5)
    assert d.mean("reverse_kl") == pytest.approx(float(reverse_kl(s, t, mask)), rel=1e-5)
    assert d.forward_kl[~mask].isnan().all(), "positions outside the response are NaN, not 0"


def test_bimodality_definition_at_its_extremes():
    v = 1000
    even = torch.full((v,), -1e9)
    even[[3, 7]] = 0.0
    point = torch.full((v,), -1e9)
    point[5] = 0.0
    uniform = torch.zeros(v)
    scores = D.bimodality(torch.stack([even, point, uniform]))
    assert scores.tolist() == pytest.approx([1.0, 0.0, 2 / v], abs=1e-6)


def test_t_star_under_each_criterion():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(5, 4)
    logits = probs.log().unsqueeze(0)
    tokens = torch.tensor([[0, 1, 2, 3, 0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    # prob criterion: the token's own probability below the threshold.
    assert D.first_failure(logits, tokens, mask, criterion="prob", threshold=0.1).tolist() == [3]
    assert D.first_failure(logits, tokens, mask, criterion="prob", threshold=0.2).tolist() == [2]
    assert D.first_failure(logits, tokens, mask, criterion="prob", threshold=0.01).tolist() == [-1]
    # top-p: token 2 has 0.8 above it (in the 0.9 set, not in the 0.7 set); token 3 has 0.95.
    assert D.first_failure(logits, tokens, mask, criterion="top_p", top_p=0.9).tolist() == [3]
    assert D.first_failure(logits, tokens, mask, criterion="top_p", top_p=0.7).tolist() == [2]
    # Positions outside the response never fail.
    assert D.first_failure(logits, tokens, torch.tensor([[1, 1, 1, 0, 1]]).bool(), threshold=0.1).tolist() == [-1]
    # The batched function agrees.
    d = D.rollout_diagnostics(logits, logits, tokens, mask, [0], criterion="top_p", top_p=0.7)
    assert d.t_star.tolist() == [2]
    with pytest.raises(ValueError, match="unknown t\\* criterion 'entropy'"):
        D.first_failure(logits, tokens, mask, criterion="entropy")


def test_the_t_star_rule_agrees_with_the_nucleus_set():
    # One t* rule (`disowned`) for the reviser, the diagnostics and the audit: "outside the
    # teacher's top-p set" is decided by the mass of strictly more likely tokens, which matches
    # membership in the sorted nucleus set (no ties in random logits).
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 9, generator=g) * 2
    tokens = torch.randint(0, 9, (4, 6), generator=g)
    for p in (0.3, 0.7, 0.95):
        nucleus = top_p_support(logits.log_softmax(-1).exp(), p).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        logp = D.log_probs(logits)
        assert torch.equal(~D.disowned(logp, tokens, "top_p", 0.05, p), nucleus)
        assert torch.equal(D.disowned(logp, tokens, "teacher_top_p", 0.05, p), ~nucleus)  # the reviser's spelling
        assert torch.equal(D.disowned(logp, tokens, "teacher_prob", 0.1, p), logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).exp() < 0.1)


def test_alignment_around_the_first_error():
    nan = math.nan
    values = torch.tensor([
        [0.0, 1.0, 2.0, 3.0, 4.0, nan],  # error at 2: offsets -2..2 -> 0 1 2 3 4
        [10.0, 11.0, 12.0, 13.0, 14.0, 15.0],  # no error: contributes nothing
        [20.0, 21.0, nan, 23.0, nan, nan],  # error at 0: -2, -1 off the row; +2 is masked (NaN)
        [30.0, 31.0, 32.0, 33.0, 34.0, 35.0],  # error at 5: +1, +2 off the row
    ])  # fmt: skip
    first = torch.tensor([2, -1, 0, 5])
    a = D.align_on_error(values, first, window=2)
    assert a.offsets.tolist() == [-2, -1, 0, 1, 2]
    assert a.count.tolist() == [2, 2, 3, 2, 1]
    want = [(0 + 33) / 2, (1 + 34) / 2, (2 + 20 + 35) / 3, (3 + 21) / 2, 4.0]
    assert a.mean.tolist() == pytest.approx(want)
    assert torch.isnan(a.values[1]).all()
    # No row with an error: every offset is NaN with count 0 (documented empty result).
    empty = D.align_on_error(values, torch.full((4,), -1), window=1)
    assert empty.count.tolist() == [0, 0, 0] and empty.mean.isnan().all()

    at, elsewhere = D.at_offset_and_elsewhere(values, first, offset=1)
    assert at == pytest.approx((3 + 21) / 2)
    rest = [v for v in values[~values.isnan()].tolist() if v not in (3.0, 21.0)]
    assert elsewhere == pytest.approx(sum(rest) / len(rest))


def test_onset_token_check_names_every_bad_string(tokenizer):
    bang = tokenizer.convert_tokens_to_ids("!")
    assert D.onset_token_ids(tokenizer, ["!"]) == [(bang,)]
    # A multi-token onset is a token sequence (issue 12 item 10: it used to be refused); one that
    # extends another onset is dropped (its mass is part of the shorter one's).
    redo = tuple(tokenizer.encode("1+2", add_special_tokens=False))
    assert len(redo) == 3 and D.onset_token_ids(tokenizer, ["!", "1+2"]) == sorted([(bang,), redo])
    assert D.onset_token_ids(tokenizer, ["!", "!1"]) == [(bang,)]
    with pytest.raises(ValueError) as err:
        D.onset_token_ids(tokenizer, ["!", "Wait", "x"])
    msg = str(err.value)
    assert "'x' -> the unknown token" in msg and "'Wait' -> the unknown token" in msg and "'!'" not in msg
    with pytest.raises(ValueError, match="no correction-onset strings"):
        D.onset_token_ids(tokenizer, [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        D.onset_mass(torch.zeros(1, 1, 5), [7])


def test_empty_rollout_is_a_clear_error():
    logits = torch.zeros(2, 3, 5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="empty rollout"):
        D.rollout_diagnostics(logits, logits, ids, torch.zeros(2, 3, dtype=torch.bool), [1])
    with pytest.raises(ValueError, match="empty rollout"):
        D.rollout_diagnostics(torch.zeros(0, 3, 5), torch.zeros(0, 3, 5), ids[:0], torch.zeros(0, 3, dtype=torch.bool), [1])
    with pytest.raises(ValueError, match="share one vocabulary"):
        D.rollout_diagnostics(torch.zeros(2, 3, 4), logits, ids, torch.ones(2, 3, dtype=torch.bool), [1])


def test_concat_pads_batches_of_different_widths():
    g = torch.Generator().manual_seed(2)
    parts = []
    for n in (3, 5):
        s, t = torch.randn(2, n, 6, generator=g), torch.randn(2, n, 6, generator=g)
        parts.append(D.rollout_diagnostics(s, t, torch.zeros(2, n, dtype=torch.long), torch.ones(2, n, dtype=torch.bool), [1]))
    d = D.RolloutDiagnostics.concat(parts)
    assert d.teacher_entropy.shape == (4, 5) and d.mask.sum() == 2 * 3 + 2 * 5
    assert d.teacher_entropy[:2, 3:].isnan().all() and (d.topk_ids[:2, 3:] == -1).all()
    assert d.mean("teacher_entropy") == pytest.approx(float(torch.cat([p.teacher_entropy.flatten() for p in parts]).mean()))


def test_arithmetic_first_error_char(task):
    p = ArithmeticProblem((3, 4, 2, 5), ("+", "*", "-"))  # 3+4=7|7*2=4|4-5=9#9
    assert task.first_error_char(p, "3+4=7|7*2=4|4-5=9#9") is None
    assert task.first_error_char(p, "4+3=7|2*7=4|4-5=9#9") is None, "either operand order is correct"
    assert task.first_error_char(p, "3+4=8|8*2=6|6-5=1#1") == 4, "the first wrong result digit"
    assert task.first_error_char(p, "3+4=8!3+4=7|7*2=4|4-5=9#9") == 4, "a corrected slip still counts"
    assert task.first_error_char(p, "3+4=7|7*3=1|1-5=6#6") == 8, "a wrong operand"
    assert task.first_error_char(p, "3+4=7|7*2") == 9, "stopping early: the end is the error"
    assert task.first_error_char(p, "3+4=7|7*2=4|4-5=9#9#") == 19
