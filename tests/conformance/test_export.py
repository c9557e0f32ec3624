"""`trd export`: the trained student as a Hugging Face folder whose logits equal the module's student
(dense, LoRA merged, adapter alone through peft, from a sharded FSDP2 checkpoint), written atomically,
never over files that are there."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.conformance.fixtures import stop_ids
from tests.conformance.harness import build, fit, write_config
from tests.conftest import cpu_trainer
from trd_lightning.cli import build_cli
from trd_lightning.export import EXPORT_INFO, export_student


def probe_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3? Wait, actually 7-4."}], add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=ids).logits.float()
    model.train(was)
    return out


def trained(parts, pair, tmp_path, **kwargs):
    """A module after two training steps and its checkpoint file."""
    module, dm = build(parts, pair, **kwargs)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, ckpt


def assert_hf_folder(folder, pair_paths, layout):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", EXPORT_INFO} <= names
    assert not any(n.startswith(".") for n in names)
    # The tokenizer as the user saved it (no pad token added where there was none), and the stop set kept.
    original, exported = AutoTokenizer.from_pretrained(pair_paths["student"]), AutoTokenizer.from_pretrained(folder)
    assert exported.get_vocab() == original.get_vocab() and exported.pad_token == original.pad_token
    assert exported.chat_template == original.chat_template
    gen = GenerationConfig.from_pretrained(folder).eos_token_id
    assert sorted(gen if isinstance(gen, list) else [gen]) == sorted(stop_ids(original, layout))


@pytest.mark.parametrize("pair", ["llama-qwen2", pytest.param("gemma-gemma", marks=pytest.mark.slow)])
def test_dense_export_loads_with_from_pretrained_and_matches_the_trained_student(parts, tmp_path, pair):
    module, ckpt = trained(parts, pair, tmp_path)
    expected = logits_of(module.student, probe_ids(module.tokenizer))
    initial = logits_of(AutoModelForCausalLM.from_pretrained(parts[pair]["student"]), probe_ids(module.tokenizer))
    assert not torch.allclose(expected, initial, atol=1e-4)  # training moved the weights: the check can fail
    fresh, _ = build(parts, pair)  # what `trd export` does: the config's module, the checkpoint's weights
    out = export_student(fresh, ckpt, tmp_path / "export")
    assert out == tmp_path / "export"
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert type(exported) is type(module.student)
    torch.testing.assert_close(logits_of(exported, probe_ids(module.tokenizer)), expected, atol=1e-5, rtol=1e-5)
    assert_hf_folder(out, parts[pair], parts[pair]["layout"])
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["format"] == "full" and info["global_step"] == 2 and info["ckpt_path"] == str(ckpt)


@pytest.mark.slow
def test_lora_export_merged_and_adapter_only(parts, tmp_path):
    from peft import PeftModel

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    module, ckpt = trained(parts, "qwen3-mistral", tmp_path, student_lora=lora)
    ids = probe_ids(module.tokenizer)
    expected = logits_of(module.student, ids)
    base = logits_of(AutoModelForCausalLM.from_pretrained(parts["qwen3-mistral"]["student"]), ids)
    assert not torch.allclose(expected, base, atol=1e-4)

    merged_dir = export_student(build(parts, "qwen3-mistral", student_lora=lora)[0], ckpt, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not hasattr(merged, "peft_config") and not (merged_dir / "adapter_config.json").exists()
    torch.testing.assert_close(logits_of(merged, ids), expected, atol=1e-5, rtol=1e-5)
    assert_hf_folder(merged_dir, parts["qwen3-mistral"], "chatml")

    adapter_dir = export_student(build(parts, "qwen3-mistral", student_lora=lora)[0], ckpt, tmp_path / "adapter", adapter_only=True)
    assert (adapter_dir / "adapter_config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(parts["qwen3-mistral"]["student"]), adapter_dir)
    torch.testing.assert_close(logits_of(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((adapter_dir / EXPORT_INFO).read_text())["format"] == "peft_adapter"


def test_export_refuses_a_non_empty_folder_and_keeps_it(parts, tmp_path):
    module, ckpt = trained(parts, "llama-qwen2", tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty.*--overwrite true"):
        export_student(module, ckpt, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="adapter_only true needs a LoRA student"):
        export_student(module, ckpt, tmp_path / "x", adapter_only=True)
    assert not (tmp_path / "x").exists()
    export_student(module, ckpt, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


@pytest.mark.slow
def test_trd_export_subcommand(parts, tmp_path):
    """`trd fit` then `trd export --ckpt_path ... --output_dir ...` from the same config."""
    config = write_config(tmp_path / "cfg.yaml", parts, "gpt2-llama", model={"loss": "forward_kl"})
    fit_cli = build_cli(["fit", "-c", config])
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.exists()
    ids = probe_ids(fit_cli.model.tokenizer)
    expected = logits_of(fit_cli.model.student, ids)
    build_cli(["export", "-c", config, f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'hf'}"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(logits_of(exported, ids), expected, atol=1e-5, rtol=1e-5)
    assert_hf_folder(tmp_path / "hf", parts["gpt2-llama"], "chatml_nopad")
    with pytest.raises(FileExistsError, match="not empty"):
        build_cli(["export", "-c", config, f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'hf'}"])


@pytest.fixture(scope="module")
def sharded(tiny_paths, tmp_path_factory):
    """Two gloo processes train with FSDP2 (tests/fsdp_fit.py) and save a sharded checkpoint folder;
    torch's own DCP converter gives the reference weights."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tests.fsdp_fit import launch

    root = tmp_path_factory.mktemp("sharded")
    launch(root / "run", tiny_paths["student"], tiny_paths["teacher"], "--state-dict", "sharded", world_size=2)
    ckpt = root / "run" / "model.ckpt"
    assert ckpt.is_dir()
    dcp_to_torch_save(ckpt, root / "reference.pt")
    reference = torch.load(root / "reference.pt", weights_only=False)["state_dict"]
    return {"ckpt": ckpt, "root": root, "expected": {k[len("student."):]: v for k, v in reference.items() if k.startswith("student.")}}


def assert_weights_are_the_shards(folder, sharded, student_path):
    exported = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(student_path).state_dict()
    assert set(sharded["expected"]) <= set(exported)
    changed = 0
    for name, value in sharded["expected"].items():
        torch.testing.assert_close(exported[name], value.to(exported[name].dtype), atol=0, rtol=0)
        changed += not torch.equal(value, initial[name])
    assert changed > 0  # the fit moved the weights, so equality with the shards is not equality with the start


@pytest.mark.slow
def test_export_consolidates_a_sharded_fsdp2_checkpoint(tiny_paths, sharded, tmp_path):
    """The export (one process) holds exactly the weights torch's DCP converter reads from the shards."""
    from trd_lightning import DistillationModule

    out = export_student(DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"]), sharded["ckpt"], tmp_path / "hf")
    assert_weights_are_the_shards(out, sharded, tiny_paths["student"])


@pytest.mark.slow
def test_trd_export_subcommand_takes_a_sharded_checkpoint_folder(tiny_paths, sharded, tmp_path):
    import yaml

    config = tmp_path / "cfg.yaml"  # the module and data of tests/fsdp_fit.py
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False},
        "model": {"class_path": "trd_lightning.DistillationModule", "init_args": {
            "student": tiny_paths["student"], "teacher": tiny_paths["teacher"], "sampling": {"temperature": 1.0, "max_new_tokens": 8}}},
        "data": {"class_path": "trd_lightning.PromptDataModule", "init_args": {"batch_size": 4, "task": {
            "class_path": "trd_lightning.tasks.ArithmeticTask", "init_args": {"val_size": 4, "test_size": 4}}}},
    }))
    build_cli(["export", "-c", str(config), f"--ckpt_path={sharded['ckpt']}", f"--output_dir={tmp_path / 'hf'}"])
    assert_weights_are_the_shards(tmp_path / "hf", sharded, tiny_paths["student"])
