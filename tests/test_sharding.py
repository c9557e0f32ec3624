"""Sharding: FSDP2 strategy from YAML, decoder-layer names resolved against the model, activation
checkpointing, the teacher's own bf16 shards, and a real 2-process FSDP2 fit on CPU (gloo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import cpu_trainer
from tests.fsdp_fit import launch
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.callbacks import PassAtKEvaluation, TeacherSharding
from trd_lightning.cli import build_cli
from trd_lightning.lora import apply_lora
from trd_lightning.models import load_causal_lm
from trd_lightning.sharding import FSDP2Strategy, ShardingPlan, _apply_activation_checkpointing, resolve_layer_classes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_decoder_layer_names_resolve_against_the_model(tiny_paths):
    model = load_causal_lm(tiny_paths["student"])
    assert [c.__name__ for c in resolve_layer_classes(model, None)] == ["LlamaDecoderLayer"]
    assert [c.__name__ for c in resolve_layer_classes(model, ["LlamaDecoderLayer"])] == ["LlamaDecoderLayer"]
    # Through a LoRA wrapper too (the layer class is found inside the peft model).
    lora = apply_lora(model, {"r": 2, "target_modules": ["q_proj"]})
    assert [c.__name__ for c in resolve_layer_classes(lora, None)] == ["LlamaDecoderLayer"]
    with pytest.raises(ValueError, match=r"\['Qwen3DecoderLayer'\] not found in the student.*LlamaDecoderLayer"):
        resolve_layer_classes(model, ["Qwen3DecoderLayer"])


def test_bad_plan_values_are_refused():
    with pytest.raises(ValueError, match="NO_SHARD.*ddp"):
        ShardingPlan(sharding_strategy="NO_SHARD")
    with pytest.raises(ValueError, match="mixed_precision"):
        ShardingPlan(mixed_precision="bfloat8")
    with pytest.raises(ValueError, match="state_dict_type"):
        FSDP2Strategy(state_dict_type="local")
    with pytest.raises(ValueError, match="placement"):
        TeacherSharding(placement="offload")
    with pytest.raises(ValueError, match="rollout_gather must be one of"):
        FSDP2Strategy(rollout_gather="never")
    for bad in (0, 1.5, True, "racks"):
        with pytest.raises(ValueError, match="replicate_size must be an integer >= 1 or 'nodes'"):
            FSDP2Strategy(replicate_size=bad)


def test_hsdp_replicas_that_do_not_divide_the_processes_are_refused_before_any_process_group():
    strategy = FSDP2Strategy(replicate_size=3)
    strategy.parallel_devices = [torch.device("cpu")] * 4
    strategy.num_nodes = 1
    with pytest.raises(ValueError, match=r"replicate_size=3 \(3 replica groups\) does not divide the 4 processes"):
        strategy.setup_environment()
    assert not dist.is_initialized()


def test_fsdp_overlay_composes_with_a_run_config_from_yaml(tiny_paths):
    cli = build_cli(
        [
            "-c", str(CONFIGS / "arith" / "opd.yaml"), "-c", str(CONFIGS / "fsdp.yaml"),
            f"--model.init_args.student={tiny_paths['student']}", f"--model.init_args.teacher={tiny_paths['teacher']}",
            "--trainer.strategy.init_args.decoder_layers=[LlamaDecoderLayer]",
            "--trainer.strategy.init_args.sharding_strategy=SHARD_GRAD_OP",
            "--trainer.strategy.init_args.state_dict_type=full",
            "--trainer.logger=false",
        ],
        run=False,
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.plan == ShardingPlan(["LlamaDecoderLayer"], True, "bf16", "SHARD_GRAD_OP", False)
    assert strategy._save_distributed_checkpoint is False  # state_dict_type: full
    assert strategy._tensor_parallel_size == 1
    assert (strategy.replicate_size, strategy.rollout_gather) == (1, "auto")  # the overlay's stated defaults
    # `callbacks+:` in the overlay appends to the run config's callbacks instead of replacing them.
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert TeacherSharding in kinds and PassAtKEvaluation in kinds
    sharding = next(c for c in cli.trainer.callbacks if isinstance(c, TeacherSharding))
    assert (sharding.placement, sharding.dtype) == ("shard", "bf16")


def test_sharding_strategy_outside_the_choices_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        build_cli(
            ["fit", "-c", str(CONFIGS / "arith" / "opd.yaml"), "-c", str(CONFIGS / "fsdp.yaml"),
             "--trainer.strategy.init_args.sharding_strategy=NO_SHARD", "--print_config"]
        )
    assert "NO_SHARD" in capsys.readouterr().err


def test_layer_name_the_model_lacks_fails_before_the_first_step(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task)
    steps = []
    module.make_rollout = lambda problems: steps.append(problems)  # would run at the first step
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, strategy=FSDP2Strategy(decoder_layers=["Qwen3DecoderLayer"]))
    environ = dict(os.environ)  # Lightning exports MASTER_PORT & co.; later distributed tests pick their own
    try:
        with pytest.raises(ValueError, match=r"Qwen3DecoderLayer.*its module classes are.*LlamaDecoderLayer"):
            trainer.fit(module, PromptDataModule(task, batch_size=2))
    finally:
        if dist.is_initialized():  # the one-process gloo group must not leak into other tests
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert steps == []


def test_activation_checkpointing_keeps_gradients_and_the_kv_cache(tiny_paths):
    plain = load_causal_lm(tiny_paths["student"])
    wrapped = load_causal_lm(tiny_paths["student"])
    _apply_activation_checkpointing(wrapped, resolve_layer_classes(wrapped, None))
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in wrapped.modules()) == 2
    ids = torch.randint(3, 20, (2, 9))
    for model in (plain, wrapped):
        model(ids, labels=ids).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    # Rollouts are generated in train mode: the wrapper must not switch the KV cache off.
    calls = []
    hook = wrapped.model.layers[0].register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[1] if "hidden_states" in kw else a[0].shape[1]), with_kwargs=True)
    out_plain = plain.generate(ids[:, :4], do_sample=False, max_new_tokens=5, use_cache=True, pad_token_id=0)
    out_wrapped = wrapped.generate(ids[:, :4], do_sample=False, max_new_tokens=5, use_cache=True, pad_token_id=0)
    hook.remove()
    assert torch.equal(out_plain, out_wrapped)
    assert calls[1:] == [1] * (len(calls) - 1), "after the prompt each step must feed one token (cache on)"


def test_teacher_sharding_casts_the_teacher_to_bf16_on_one_device(tiny_paths, task):
    module = DistillationModule(
        student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=Sampling(max_new_tokens=6)
    )
    cpu_trainer(max_steps=1, limit_val_batches=0, callbacks=[TeacherSharding(dtype="bf16")]).fit(
        module, PromptDataModule(task, batch_size=2)
    )
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.student.parameters()} == {torch.float32}
    assert torch.isfinite(module.trainer.logged_metrics["train/loss"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [["--state-dict", "full"], ["--state-dict", "sharded", "--lora", "--activation-checkpointing"]],
    ids=["full-state-dict", "sharded-lora-ac"],
)
def test_two_process_fsdp2_fit_on_cpu(tiny_paths, tmp_path, options):
    ranks = launch(tmp_path, tiny_paths["student"], tiny_paths["teacher"], *options, world_size=2)
    for r in ranks:
        assert r["world_size"] == 2 and r["student_sharded"] and r["teacher_sharded"]
        # The teacher: its own bf16 shards (half the rows per rank), frozen, out of the optimizer.
        assert r["teacher_dtype"] == "torch.bfloat16" and r["teacher_local_rows"] * 2 == r["teacher_rows"]
        assert not r["teacher_requires_grad"] and not r["optimizer_has_teacher"] and r["teacher_unchanged"]
        assert r["student_changed"] and len(r["losses"]) == 3
        # Sharded forward = unsharded recomputation on the same rollout.
        assert r["losses"][0] == pytest.approx(r["expected_first_loss"], abs=1e-5)
        weights = [k for k in r["checkpoint_keys"] if k.startswith("state_dict.")]
        assert weights and all(k.startswith("state_dict.student.") for k in weights)
        assert r["reloaded"], "the checkpoint must restore the trained weights through the strategy"
        if "--lora" in options:
            assert all(".lora_" in k for k in weights)
            assert r["checkpoint_wrapped_layers"] == 2
    # Different prompts per rank, so different rollouts and losses.
    assert ranks[0]["losses"] != ranks[1]["losses"]


# --- module.sample (Pass@k sampling, the rewrite refiner) gathers once under FSDP2 ------------------
def _sample_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    from torch.distributed.device_mesh import init_device_mesh

    from trd_lightning.sharding import shard_model
    from trd_lightning.tasks import ArithmeticTask

    sharded_rollout = _benchmark()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        counter = sharded_rollout._Counter()
        task = ArithmeticTask(train_size=4 * world, val_size=2, test_size=2, seed=0)
        prompts = [task.student_prompt(p) for p in list(task.problems("train"))[4 * rank : 4 * rank + 4]]
        assets = Path(__file__).resolve().parents[1] / "trd_lightning" / "assets" / "arith"
        sampling = Sampling(temperature=1.0, max_new_tokens=8)

        def build():
            return DistillationModule(student=str(assets / "student"), teacher=str(assets / "teacher"), task=task, sampling=sampling)

        module, reference = build(), build()  # sharded, and a single-process copy of the same weights
        mesh = init_device_mesh("cpu", (world,))
        shard_model(module.student, ShardingPlan(), mesh)
        shard_model(module.teacher, ShardingPlan(), mesh, role="teacher")
        module.rollout_gather = "once"
        result = {}
        for role in ("student", "refiner"):
            module.sample(prompts, role=role)  # the first call decides (and logs the memory estimate)
            torch.manual_seed(100 + rank)
            want = reference.sample(prompts, role=role)
            torch.manual_seed(100 + rank)
            before = counter.snapshot()
            got = module.sample(prompts, role=role)
            after = counter.snapshot()
            result[role] = {"equal": all(torch.equal(a, b) for a, b in zip(got, want)),
                            "gathers": after["all_gather_single"] - before["all_gather_single"]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _benchmark():
    from benchmarks import sharded_rollout  # the gather counter and port finder the benchmark uses

    return sharded_rollout


@pytest.mark.slow
def test_module_sample_gathers_each_layer_once_and_equals_one_process(tmp_path):
    """Pass@k's sampling and the rewrite refiner go through ``module.sample``; under FSDP2 with
    ``rollout_gather: once`` it all-gathers each FSDP group once per call (not once per token) and
    samples the tokens of a single-process copy with the same seed."""
    import json

    import torch.multiprocessing as mp
    from transformers import AutoConfig

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_sample_worker, args=(2, _benchmark()._free_port(), str(tmp_path)), nprocs=2, join=True)
    assets = Path(__file__).resolve().parents[1] / "trd_lightning" / "assets" / "arith"
    groups = {r: AutoConfig.from_pretrained(assets / r).num_hidden_layers + 1 for r in ("student", "teacher")}
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["student"] == {"equal": True, "gathers": groups["student"]}, (rank, result)
        assert result["refiner"] == {"equal": True, "gathers": groups["teacher"]}, (rank, result)
