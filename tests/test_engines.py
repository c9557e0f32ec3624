"""Rollout engines (`trd_lightning.engines`): ``hf`` is today's generate path bit for bit,
``hf_continuous`` samples the same law and lays responses out the same way, and a bad engine
request is refused before compute. The vLLM engine's tests are in `test_engines_vllm.py`."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import first_token_law_gap
from trd_lightning.engines import HFContinuousEngine, HFEngine, make_engine
from trd_lightning.engines.base import sampling_law
from trd_lightning.module import DistillationModule
from trd_lightning.revision import RewriteReviser
from trd_lightning.rollout import Sampling, encode_prompts, sample_responses
from trd_lightning.tasks import ArithmeticTask

PROMPTS = ["3+4*2-5=", "1+2=", "7*3-1+2=", "9-9="]


@pytest.fixture(scope="module")
def student():
    module = DistillationModule(task=ArithmeticTask(val_size=8, test_size=8))
    return module.student.eval(), module.tokenizer


def test_hf_engine_is_generate_bit_for_bit(student):
    model, tok = student
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    sampling = Sampling(temperature=0.8, top_p=0.9, max_new_tokens=24)
    torch.manual_seed(3)
    want = sample_responses(model, tok, ids, mask, sampling, num_return_sequences=4)
    torch.manual_seed(3)
    got = HFEngine().generate(model, tok, ids, mask, sampling, num_return_sequences=4)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_module_default_engine_is_hf_and_keeps_rollouts():
    module = DistillationModule(task=ArithmeticTask(val_size=8, test_size=8))
    assert isinstance(module.engine, HFEngine) and module.hparams.rollout_engine == "hf"
    prompts = PROMPTS
    ids, mask = encode_prompts(module.tokenizer, prompts, "cpu")
    torch.manual_seed(5)
    want = sample_responses(module.student, module.tokenizer, ids, mask, module.sampling)
    torch.manual_seed(5)
    got = module.sample(prompts)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_hf_logprobs_are_the_models_raw_logprobs(student):
    model, tok = student
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    torch.manual_seed(0)
    out, out_mask, lp = HFEngine().generate(model, tok, ids, mask, Sampling(temperature=0.7, max_new_tokens=12), return_logprobs=True)
    full = torch.cat([ids, out], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.cat([mask, out_mask.long()], 1),
                       position_ids=(torch.cat([mask, out_mask.long()], 1).cumsum(-1) - 1).clamp(min=0)).logits
    want = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1).gather(-1, out.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp[out_mask], want[out_mask], atol=1e-4)
    assert (lp[~out_mask] == 0).all()


def test_continuous_batching_greedy_equals_generate(student):
    """Token for token, at two stop ids (the tokenizer's EOS and another id the model emits)."""
    model, tok = student
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    greedy = Sampling(temperature=0, max_new_tokens=20)
    first = HFEngine().generate(model, tok, ids, mask, greedy)[0]
    extra_stop = int(first[0, 3])  # a token that occurs mid-response: both engines must stop at it
    stops = [tok.eos_token_id, extra_stop]
    want = HFEngine().generate(model, tok, ids, mask, greedy, stop_ids=stops)
    got = HFContinuousEngine().generate(model, tok, ids, mask, greedy, stop_ids=stops, num_return_sequences=1)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert int(got[1][0].sum()) == int((first[0] == stops[1]).nonzero()[0]) + 1 <= 4  # stopped at its first occurrence


def test_continuous_batching_leaves_the_model_as_it_was(student):
    model, tok = student
    model.train()
    ids, mask = encode_prompts(tok, PROMPTS[:1], "cpu")
    with torch.no_grad():
        before = model(input_ids=ids).logits
    HFContinuousEngine().generate(model, tok, ids, mask, Sampling(max_new_tokens=4))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert model.training and model.config._attn_implementation == "sdpa"
    assert torch.equal(before, after)
    model.eval()


@pytest.mark.parametrize("engine", [HFEngine(), HFContinuousEngine()], ids=["hf", "hf_continuous"])
def test_first_token_law(student, engine):
    """Each engine's empirical first-token distribution matches the tempered, top-p softmax."""
    model, tok = student
    sampling = Sampling(temperature=1.5, top_p=0.9)
    tv, bound = first_token_law_gap(engine, model, tok, "3+4*2-5=", sampling, n=4000)
    assert tv < bound, (tv, bound)
    # The check has power: the untempered law is farther from the right one than the bound.
    ids, mask = encode_prompts(tok, ["3+4*2-5="], "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    wrong = 0.5 * (sampling_law(logits, Sampling(temperature=1.0, top_p=0.9)) - sampling_law(logits, sampling)).abs().sum()
    assert wrong > 2 * bound


def test_sampling_law_against_brute_force():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    law = sampling_law(logits, Sampling(temperature=1.0, top_p=0.8, top_k=3))
    p = logits.softmax(-1)[:3]
    p = p / p.sum()  # top-3, renormalised: [0.63, 0.23, 0.14]; the top-p set needs the first two
    want = torch.tensor([p[0], p[1], 0, 0, 0]) / (p[0] + p[1])
    assert torch.allclose(law, want)


def test_rewrite_reviser_samples_through_the_modules_engine(task):
    """With an engine that returns no logits, y_r comes from that engine and the teacher scores it."""
    module = DistillationModule(task=task, loss="forward_kl", rollout_engine="hf_continuous")
    calls = []
    generate = module.engine.generate
    module.engine.generate = lambda *a, **k: calls.append(a[0]) or generate(*a, **k)
    rollout = module.make_rollout(list(task.problems("val"))[:3])
    revised = RewriteReviser().revise(module, rollout)
    assert calls[0] is module.student and calls[1] is module.teacher
    assert revised.teacher_logits is None and torch.isfinite(module.distillation_loss(revised))


def test_bad_engine_requests_are_refused_before_compute(task):
    with pytest.raises(ValueError, match="unknown rollout_engine 'vlm'.*hf, hf_continuous, vllm"):
        DistillationModule(task=task, rollout_engine="vlm")
    with pytest.raises(ValueError, match="bad rollout_engine_kwargs"):
        make_engine("vllm", {"gpu_memory_utilisation": 0.3})
    with pytest.raises(TypeError, match="max_batch_token"):
        DistillationModule(task=task, rollout_engine="hf_continuous", rollout_engine_kwargs={"config": {"max_batch_token": 64}})
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="rollout_engine='vllm' needs vLLM.*hf"):
            DistillationModule(task=task, rollout_engine="vllm")
