"""Faults and hostile inputs against ``trd`` (issue 13, and items 3-5/14 of issue 12): no run ends
without a checkpoint, no checkpoint is half-written, a resume does what its config says, and every
bad input is named in one line before the models load. docs/reliability.md lists each case."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import cpu_trainer, save_chat_setup
from trd_lightning import DistillationModule, PromptDataModule, Sampling
from trd_lightning.checkpoint_io import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from trd_lightning.cli import build_cli, main
from trd_lightning.run_config import reserve_logger_versions

ROOT = Path(__file__).resolve().parents[1]
OPD = str(ROOT / "configs" / "arith" / "opd.yaml")
SMALL = [
    "--trainer.max_steps=1",
    "--trainer.val_check_interval=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
    "--data.init_args.batch_size=4",
    "--data.init_args.eval_batch_size=4",
    "--data.init_args.task.init_args.val_size=4",
    "--data.init_args.task.init_args.test_size=4",
    "--model.init_args.sampling.max_new_tokens=8",
]


def cli_error(args, capsys, monkeypatch) -> str:
    """Run ``trd`` as the console script does; return what it printed (it must exit 2)."""
    monkeypatch.setattr(sys, "argv", ["trd", *args])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Cheap checks must fail before any model is loaded: loading one is a test failure."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("trd_lightning.module.load_causal_lm", refuse)


# --- a disk that fills during a save ----------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (we run as root); skipped where mounting is not allowed."""
    mounted = []

    def make(size_bytes: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        pages = (size_bytes + 4095) // 4096 * 4096
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_disk_full_during_save_leaves_only_loadable_checkpoints_and_names_the_last_good(tiny_paths, task, tmp_path, small_disk):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=Sampling(max_new_tokens=6))
    probe = tmp_path / "probe.ckpt"
    trainer = cpu_trainer(max_steps=1, plugins=[AtomicCheckpointIO()], limit_val_batches=0)
    trainer.fit(module, PromptDataModule(task, batch_size=4))
    trainer.save_checkpoint(probe)
    size = probe.stat().st_size
    disk = small_disk(int(size * 2.5))  # room for two checkpoints, not three
    tmp_before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=Sampling(max_new_tokens=6))
    trainer = cpu_trainer(
        max_steps=5,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=disk, every_n_train_steps=1, save_top_k=-1)],
    )
    with pytest.raises(OSError, match=r"could not write checkpoint '.*step=3\.ckpt': the disk is full; nothing was left under that name and the newest checkpoint that loads is '.*step=2\.ckpt'"):
        trainer.fit(module, PromptDataModule(task, batch_size=4))
    left = sorted(p.name for p in disk.iterdir())
    assert left == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"], left  # no temporary file, no partial file
    for name in left:
        load_checkpoint_file(disk / name)
    # Nothing of the save leaked into the system's temporary folder (other processes may write
    # there meanwhile: only checkpoint-like names count).
    leaked = set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - tmp_before
    assert not [p for p in leaked if "ckpt" in p or p.endswith(".tmp")], leaked


def test_corrupt_or_foreign_checkpoints_are_named_in_one_line(tmp_path, tiny_paths):
    (tmp_path / "good.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint '.*good.ckpt' is empty \(0 bytes"):
        load_checkpoint_file(tmp_path / "good.ckpt")
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.zeros(1000)}}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint '.*cut.ckpt' is truncated or corrupt .*use another checkpoint \(others in .*: good.ckpt, whole.ckpt\)"):
        load_checkpoint_file(tmp_path / "cut.ckpt")
    torch.save({"student": torch.zeros(2)}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match=r"is not a Lightning checkpoint \(no 'pytorch-lightning_version'"):
        load_checkpoint_file(tmp_path / "plain.ckpt")
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {}, "obj": Sampling()}, tmp_path / "obj.ckpt")
    torch.save({"x": object.__new__(CSVLogger)}, tmp_path / "pickle.ckpt")
    with pytest.raises(CheckpointError, match=r"holds objects that a safe load refuses"):
        load_checkpoint_file(tmp_path / "pickle.ckpt")


def test_corrupt_checkpoint_given_to_the_cli_fails_before_the_models_load(tmp_path, capsys, monkeypatch, no_model_loads):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    err = cli_error(["fit", "-c", OPD, *SMALL, f"--ckpt_path={bad}"], capsys, monkeypatch)
    assert err.startswith(f"error: CheckpointError: checkpoint '{bad}' is truncated or corrupt")


# --- SIGTERM ------------------------------------------------------------------------------------
def _trd_fit(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "trd_lightning.cli", "fit", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_sigterm_with_a_shipped_config_saves_a_checkpoint_and_exits_nonzero(tmp_path):
    marker = tmp_path / "at_step_2"
    pause = {"class_path": "tests.helpers.PauseForSignal", "init_args": {"step": 2, "marker": str(marker)}}
    # `--trainer.callbacks+=` appends to the shipped list (which has no PreemptionCheckpoint)
    proc = _trd_fit(["-c", OPD, *SMALL, "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                     f"--trainer.callbacks+={json.dumps(pause)}"], tmp_path)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]
    ckpt = tmp_path / "runs" / "opd" / "version_0" / "checkpoints" / "preempted.ckpt"
    assert ckpt.exists(), out[-3000:]
    assert load_checkpoint_file(ckpt)["global_step"] == 2
    assert f"resume with --ckpt_path {ckpt.relative_to(tmp_path)}" in out


# --- one folder per run -------------------------------------------------------------------------
def test_two_runs_of_one_config_started_together_get_separate_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = CSVLogger("runs", name="opd"), CSVLogger("runs", name="opd")
    assert a.version == b.version == 0  # Lightning alone: both would write to version_0
    a, b = CSVLogger("runs", name="opd"), CSVLogger("runs", name="opd")
    reserve_logger_versions(a)
    reserve_logger_versions([b])
    assert (a.version, b.version) == (0, 1)
    # and through the CLI: two trainers built before either has written anything
    first = build_cli(["-c", OPD, *SMALL], run=False)
    second = build_cli(["-c", OPD, *SMALL], run=False)
    assert first.trainer.log_dir != second.trainer.log_dir
    assert {Path(first.trainer.log_dir).name, Path(second.trainer.log_dir).name} == {"version_2", "version_3"}


# --- --ckpt_path: compared, not overriding ------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 1-step `trd fit` of opd.yaml (with a copy of the built-in student that can move)."""
    root = tmp_path_factory.mktemp("fitted")
    student = root / "student"
    shutil.copytree(ROOT / "trd_lightning" / "assets" / "arith" / "student", student)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        build_cli(["fit", "-c", OPD, *SMALL, f"--model.init_args.student={student}"])
    finally:
        os.chdir(cwd)
    return root, student, root / "runs" / "opd" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "change, key",
    [
        ("--model.init_args.loss=forward_kl", "model.init_args.loss"),
        ("--model.init_args.mode=opsd", "model.init_args.mode"),
        ("--model.init_args.student_lora={r: 4}", "model.init_args.student_lora"),
        ("--model.init_args.sampling.max_new_tokens=6", "model.init_args.sampling.max_new_tokens"),
        ("--model.init_args.optimizer=torch.optim.SGD", "model.init_args.optimizer.class_path"),
        ("--model.init_args.teacher=builtin:arith/student", "model.init_args.teacher"),
        ("--data.init_args.batch_size=8", "data.init_args.batch_size"),
        ("--seed_everything=1", "seed_everything"),
    ],
)
def test_resume_refuses_a_change_of_meaning_with_the_differing_keys(fitted, change, key, capsys, monkeypatch, no_model_loads):
    root, student, ckpt = fitted
    monkeypatch.chdir(root)
    err = cli_error(["fit", "-c", OPD, *SMALL, f"--model.init_args.student={student}", f"--ckpt_path={ckpt}", change], capsys, monkeypatch)
    assert "was written with another configuration, and the resumed run would train something else" in err
    assert f"differing keys: {key}:" in err or f"; {key}:" in err, err


def test_resume_honours_more_steps_and_evaluation_settings(fitted, monkeypatch, capsys):
    root, student, ckpt = fitted
    monkeypatch.chdir(root)
    cli = build_cli(["fit", "-c", OPD, *SMALL, f"--model.init_args.student={student}", f"--ckpt_path={ckpt}",
                     "--trainer.max_steps=2", "--data.init_args.eval_batch_size=2"])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.eval_batch_size == 2


def test_test_with_a_moved_student_and_explicit_arguments_uses_them(fitted, tmp_path, monkeypatch):
    root, student, ckpt = fitted
    moved = tmp_path / "moved_student"
    shutil.copytree(student, moved)
    monkeypatch.chdir(root)
    hidden = student.with_name("student_away")
    student.rename(hidden)  # the path the checkpoint was trained from no longer exists
    try:
        cli = build_cli(["test", "-c", OPD, *SMALL, f"--model.init_args.student={moved}", f"--ckpt_path={ckpt}",
                         "--model.init_args.sampling.max_new_tokens=5", "--model.init_args.loss=forward_kl"])
    finally:
        hidden.rename(student)
    assert cli.model.hparams.student == str(moved)
    assert cli.model.sampling.max_new_tokens == 5 and cli.model.loss_name == "forward_kl"


def test_test_refuses_a_student_with_other_weights(fitted, capsys, monkeypatch, no_model_loads):
    root, student, ckpt = fitted
    monkeypatch.chdir(root)
    err = cli_error(["test", "-c", OPD, *SMALL, "--model.init_args.student=builtin:arith/teacher", f"--ckpt_path={ckpt}"], capsys, monkeypatch)
    assert "the student weights would not fit the model; differing keys: model.init_args.student:" in err


@pytest.mark.parametrize("name", ["last", "best"])
def test_ckpt_path_last_without_a_checkpoint_is_refused(name, tmp_path, capsys, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "opd" / "version_0" / "checkpoints").mkdir(parents=True)  # a run that saved nothing
    err = cli_error(["test", "-c", OPD, *SMALL, f"--ckpt_path={name}"], capsys, monkeypatch)
    assert err.startswith(f"error: FileNotFoundError: --ckpt_path {name}: no {name} checkpoint under runs/opd/version_0/checkpoints"), err
    assert "--ckpt_path runs/opd/version_<N>/checkpoints/last.ckpt" in err


def test_ckpt_path_last_and_best_resolve_to_the_newest_run_folder(fitted, tmp_path, monkeypatch, caplog):
    """Every run has its own version_N folder, where Lightning's own ``last`` looks (so it finds
    nothing and tests the initial weights): ``trd`` picks the newest run's checkpoint, by mtime."""
    root, student, _ = fitted
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "runs" / "opd" / "version_0", tmp_path / "runs" / "opd" / "version_0")
    older = tmp_path / "runs" / "opd" / "version_7" / "checkpoints"  # a higher number, written earlier
    shutil.copytree(tmp_path / "runs" / "opd" / "version_0" / "checkpoints", older)
    for f in older.iterdir():
        os.utime(f, (1, 1))
    newest = Path("runs/opd/version_0/checkpoints/last.ckpt")
    with caplog.at_level("INFO"):
        cli = build_cli(["test", "-c", OPD, *SMALL, f"--model.init_args.student={student}", "--ckpt_path=last"])
    assert cli.trainer.ckpt_path == str(newest)
    assert f"--ckpt_path last: using {newest} (the newest run's last checkpoint)" in caplog.text
    best = build_cli(["test", "-c", OPD, *SMALL, f"--model.init_args.student={student}", "--ckpt_path=best"])
    recorded = torch.load(newest, weights_only=False)["callbacks"]
    (state,) = [v for k, v in recorded.items() if k.startswith("ModelCheckpoint")]
    assert best.trainer.ckpt_path == state["best_model_path"] and Path(best.trainer.ckpt_path).exists()


# --- bad inputs before any model loads ---------------------------------------------------------
@pytest.mark.parametrize(
    "arg, message",
    [
        ("--model.init_args.optimizer.init_args.lr=0", "model.init_args.optimizer.init_args.lr: must be a finite number > 0, got 0"),
        ("--trainer.val_check_interval=0", "trainer.val_check_interval: must be > 0, got 0"),
        ("--data.init_args.eval_batch_size=0", "data.init_args.eval_batch_size: must be >= 1, got 0"),
        ("--data.init_args.eval_batch_size=-4", "data.init_args.eval_batch_size: must be >= 1, got -4"),
        ("--model.init_args.student_dtype=bfloat17", "unknown dtype 'bfloat17'; use one of float32, float16, bfloat16, float64 (did you mean 'bfloat16'?)"),
        ("--model.init_args.teacher=builtin:arith/student", "model.init_args.teacher: is the student itself"),
        ('--model.init_args.lr_scheduler={"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 0}}',
         "model.init_args.lr_scheduler.init_args.T_max: must be > 0, got 0"),
    ],
)
def test_meaningless_numbers_are_refused_before_the_models_load(arg, message, tmp_path, capsys, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    err = cli_error(["fit", "-c", OPD, *SMALL, arg], capsys, monkeypatch)
    assert err.startswith("error: ValueError: ") and message in err.splitlines()[0], err


def test_read_only_run_folder_is_refused_before_training(tmp_path, capsys, monkeypatch, no_model_loads):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        monkeypatch.chdir(tmp_path)
        err = cli_error(["fit", "-c", OPD, *SMALL, f"--trainer.logger.init_args.save_dir={ro}"], capsys, monkeypatch)
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    assert "cannot be written (it is read-only); checkpoints would be lost at the first save" in err.splitlines()[0], err


def test_yaml_problems_are_named_with_the_file_and_line(tmp_path, capsys, monkeypatch):
    cases = {
        "empty.yaml": ("", "config file '{}' is empty"),
        "dup.yaml": ("trainer:\n  max_steps: 3\n  max_steps: 4\n", "config file '{}', line 3, column 3: key 'max_steps' appears twice (first at line 2)"),
        "syntax.yaml": ("trainer:\n  max_steps: [3\n", "config file '{}', line 3, column 1: "),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        err = cli_error(["fit", "-c", OPD, "-c", str(tmp_path / name)], capsys, monkeypatch)
        assert err.startswith("error: ValueError: " + message.format(tmp_path / name)), err


def test_constructor_errors_come_first_not_inside_the_union_text(tmp_path, capsys, monkeypatch):
    err = cli_error(["fit", "-c", OPD, "--model.init_args.student=/nope"], capsys, monkeypatch)
    assert err.startswith("error: FileNotFoundError: model path '/nope' does not exist"), err
    assert "Union subtypes" not in err
    err = cli_error(["fit", "-c", OPD, "--data.init_args.batch_size=0"], capsys, monkeypatch)
    assert err.startswith("error: ValueError: batch_size must be >= 1, got 0"), err


def test_cli_null_two_class_levels_down_stays_null(tmp_path):
    data = tmp_path / "m.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "solution": "\\boxed{2}", "answer": "2"}) + "\n")
    math = {"data": {"class_path": "trd_lightning.PromptDataModule", "init_args": {"task": {
        "class_path": "trd_lightning.tasks.MathTask",
        "init_args": {"train_file": str(data), "val_file": str(data), "system_prompt": "be brief", "max_problems": 3}}}}}
    (tmp_path / "math.yaml").write_text(json.dumps(math))
    chat = save_chat_setup(tmp_path)  # the arithmetic models cannot read math prompts (refused)
    cli = build_cli(["-c", OPD, "-c", str(tmp_path / "math.yaml"), "--trainer.logger=false",
                     f"--model.init_args.student={chat['student']}", f"--model.init_args.teacher={chat['teacher']}",
                     "--data.init_args.task.init_args.system_prompt", "null",
                     "--data.init_args.task.init_args.max_problems=null"], run=False)
    task = cli.datamodule.task
    assert task.system_prompt is None and task.max_problems is None
    assert task.files["train"] == str(data)  # the rest of the task's config is kept


# --- models: missing tokenizer, corrupt weights, config/weights mismatch ------------------------
def test_student_directory_without_tokenizer_files_says_what_is_missing(tmp_path, tiny_paths):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_paths["student"], bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    with pytest.raises(FileNotFoundError, match=r"the student directory '.*bare' has no tokenizer files \(looked for tokenizer.json"):
        DistillationModule(student=str(bare), teacher=tiny_paths["teacher"])


def test_truncated_weights_name_the_file_and_the_role(tmp_path, tiny_paths):
    cut = tmp_path / "cut"
    shutil.copytree(tiny_paths["teacher"], cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"the teacher weights in '.*cut' \(model.safetensors\) are truncated or corrupt"):
        DistillationModule(student=tiny_paths["student"], teacher=str(cut))


def test_config_with_more_layers_than_the_weights_is_refused(tmp_path, tiny_paths):
    more = tmp_path / "more"
    shutil.copytree(tiny_paths["student"], more)
    config = json.loads((more / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (more / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the student weights in '.*more' do not cover its config.json: \d+ tensors missing \(e.g. model.layers.2"):
        DistillationModule(student=str(more), teacher=tiny_paths["teacher"])
    config["hidden_size"] *= 2
    config["num_hidden_layers"] -= 1
    (more / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the student weights in '.*more' \(model.safetensors\) do not match its config.json"):
        DistillationModule(student=str(more), teacher=tiny_paths["teacher"])


# --- accepted although meaningless: refused at construction ------------------------------------
def test_meaningless_settings_are_refused_at_construction(tiny_paths):
    from trd_lightning.callbacks import PassAtKEvaluation
    from trd_lightning.revision import PrefixSpliceReviser
    from trd_lightning.tasks import ArithmeticTask

    for value in (0, -3):
        with pytest.raises(ValueError, match=rf"max_new_tokens must be >= 1 \(or null for the module's sampling budget\), got {value}"):
            PrefixSpliceReviser(max_new_tokens=value)
    with pytest.raises(ValueError, match=r"min_mass is a probability mass and must be in \[0, 1\], got 1.5"):
        PrefixSpliceReviser(min_mass=1.5)
    with pytest.raises(ValueError, match=r"role must be 'student', 'teacher' or 'refiner', got 'techer'"):
        PassAtKEvaluation(n=2, ks=[1], role="techer")
    with pytest.raises(ValueError, match=r"val_size must be >= 0 \(0: no val problems\), got -1"):
        ArithmeticTask(val_size=-1)
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0 is greedy\)"):
            Sampling(temperature=value)
    with pytest.raises(ValueError, match=r"loss_kwargs.clip must be > 0 \(a per-token divergence cap\), got -0.1"):
        DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], loss="forward_kl", loss_kwargs={"clip": -0.1})
    with pytest.raises(ValueError, match=r"eval_batch_size must be >= 1 \(or null to use batch_size\), got 0"):
        PromptDataModule(ArithmeticTask(), eval_batch_size=0)


# --- bad data files ----------------------------------------------------------------------------
def _rows(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


ROW = {"problem": "1+1?", "solution": "so \\boxed{2}", "answer": "2"}


def test_bad_math_data_is_named_with_file_and_line(tmp_path):
    from trd_lightning.tasks.math import MathTask

    def first_problems(name: str, content: bytes | str):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return MathTask(train_file=str(path)).problems("train")

    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not UTF-8 text \(byte 13"):
        first_problems("bad.jsonl", _rows(ROW).encode() + b'{"problem": "\xff"}\n')
    with pytest.raises(ValueError, match=r"array.jsonl looks like a JSON array; a .jsonl file holds one JSON object per line"):
        first_problems("array.jsonl", json.dumps([ROW, ROW], indent=1))
    with pytest.raises(ValueError, match=r"array1.jsonl holds a JSON array"):
        first_problems("array1.jsonl", json.dumps([ROW, ROW]))
    with pytest.raises(ValueError, match=r"dup.jsonl, line 1: field 'answer' appears twice; keep one"):
        first_problems("dup.jsonl", '{"problem": "p", "solution": "s", "answer": "1", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"list.jsonl, line 2: field 'answer' is a list \(\['1', '2'\]\); it must be text or a number"):
        first_problems("list.jsonl", _rows(ROW, {**ROW, "answer": ["1", "2"]}))
    with pytest.raises(ValueError, match=r"fake.parquet is not a readable parquet file .*write it with pandas/datasets to_parquet, or use .jsonl"):
        first_problems("fake.parquet", _rows(ROW))
    assert [p.answer for p in first_problems("mixed.jsonl", _rows(ROW, {**ROW, "answer": 3}))] == ["2", "3"]


def test_a_data_file_replaced_with_the_same_mtime_is_read_again(tmp_path):
    from trd_lightning.tasks.math import MathTask

    path = tmp_path / "train.jsonl"
    path.write_text(_rows(ROW))
    stamp = path.stat().st_mtime_ns
    assert MathTask(train_file=str(path)).problems("train")[0].answer == "2"
    path.write_text(_rows({**ROW, "answer": "7"}))  # same length, same mtime
    os.utime(path, ns=(stamp, stamp))
    assert MathTask(train_file=str(path)).problems("train")[0].answer == "7"


def test_diverged_weights_are_named_at_the_next_sampling(tiny_paths, task):
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task, sampling=Sampling(max_new_tokens=4))
    with torch.no_grad():
        module.student.get_output_embeddings().weight.fill_(float("inf"))  # what lr 1000 leaves behind
    with pytest.raises(FloatingPointError, match=r"the student's next-token probabilities are not finite \(\d+ weight tensors hold inf/NaN.*lower the lr or set trainer.gradient_clip_val"):
        module.make_rollout(list(task.problems("test"))[:2])


@pytest.mark.parametrize("rollout", ["make_rollout", "sample"])
def test_diverged_weights_are_named_before_a_greedy_rollout(tiny_paths, task, rollout):
    """Greedy decoding takes the argmax of NaN logits without failing: garbage tokens, silently."""
    module = DistillationModule(student=tiny_paths["student"], teacher=tiny_paths["teacher"], task=task,
                                sampling=Sampling(max_new_tokens=4, temperature=0.0))
    problems = list(task.problems("test"))[:2]
    module.make_rollout(problems)  # finite weights: no error
    with torch.no_grad():
        module.student.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"the student's next-token probabilities are not finite \(\d+ weight tensors hold inf/NaN.*lower the lr or set trainer.gradient_clip_val"):
        if rollout == "make_rollout":
            module.make_rollout(problems)
        else:
            module.sample([task.student_prompt(p) for p in problems])


def test_a_math_task_with_the_arithmetic_tokenizer_is_refused_before_the_models_load(tmp_path, capsys, monkeypatch, no_model_loads):
    """The arithmetic vocabulary maps every word of a math prompt to <unk>: a run would train and
    score on unknown tokens without any error."""
    data = tmp_path / "m.jsonl"
    data.write_text(_rows(ROW))
    math = {"data": {"init_args": {"task": {"class_path": "trd_lightning.tasks.MathTask",
                                             "init_args": {"train_file": str(data), "val_file": str(data)}}}}}
    (tmp_path / "math.yaml").write_text(json.dumps(math))
    monkeypatch.chdir(tmp_path)
    small = [a for a in SMALL if ".task." not in a]
    err = cli_error(["fit", "-c", OPD, "-c", str(tmp_path / "math.yaml"), *small], capsys, monkeypatch)
    first = err.splitlines()[0]
    assert first.startswith("error: ValueError: model.init_args.student: its tokenizer cannot read the math task's train prompts: "), err
    assert "are the unknown token '<unk>'" in first and "the arithmetic task's" in first and "configs/qwen3/" in first
