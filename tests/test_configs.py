"""Every shipped composition builds through the real `trd` parser and says what the code runs.

The model is litgpt's ``tests/test_config_hub.py``: every config instantiates. Here: each method
config of ``configs/`` (a delta on its ``base.yaml``, see `trd_lightning.compose`), each fragment of
the top-level ``callbacks/`` with each base config, the ``_base_`` rules, and ``trd fit --help``.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

import pytest
import yaml

from trd_lightning.cli import build_cli
from trd_lightning.compose import BASE_KEY

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FRAGMENTS = ROOT / "callbacks"
BASES = {"arith": CONFIGS / "arith" / "base.yaml", "qwen3": CONFIGS / "qwen3" / "base.yaml"}
# Configs meant to be layered on top of a run config (`-c run.yaml -c fsdp.yaml`).
OVERLAYS = {"fsdp.yaml"}
# Asset builders (SFTModule), not methods of the comparison: complete files, no base.
STANDALONE = {"student_sft.yaml", "teacher_sft.yaml"}
# What a method file may change on top of its base: its loss, its reviser, its mode, its run name.
METHOD_KEYS = {"loss", "loss_kwargs", "mode", "teacher", "teacher_dtype", "opsd_teacher"}


def shipped_configs():
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.name not in OVERLAYS)


def method_configs():
    return [p for p in shipped_configs() if p.name not in STANDALONE and p.name != "base.yaml"]


def fragments():
    return sorted(FRAGMENTS.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _printed(args: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def resolved(*args: str) -> dict:
    """``trd fit ARGS --print_config``, parsed (each command parsed once per session: a fresh dict)."""
    return yaml.safe_load(_printed(args))


def c(*files: Path) -> list[str]:
    return [x for f in files for x in ("-c", str(f))]


def callback_paths(config: dict) -> list[str]:
    return [cb["class_path"] for cb in config["trainer"]["callbacks"] or []]


@pytest.mark.parametrize("config", shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_parses(config):
    printed = resolved(*c(config))
    assert printed["model"]["class_path"] and printed["data"]["class_path"] and printed["trainer"]["logger"]


@pytest.mark.parametrize("config", method_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_method_config_is_its_base_plus_only_what_differs(config):
    """"Same budget" is structural: the resolved method config equals its base everywhere except
    the method's own keys (loss, mode, reviser callbacks, run name)."""
    text = yaml.safe_load(config.read_text())
    bases = text[BASE_KEY] if isinstance(text[BASE_KEY], list) else [text[BASE_KEY]]
    assert bases[0] == "base.yaml", f"{config.name} must be written on top of its folder's base.yaml"
    method, base = resolved(*c(config)), resolved(*c(BASES[config.parent.name]))
    assert method["trainer"]["logger"]["init_args"]["name"] in (config.stem, f"qwen3_{config.stem}")
    for side in (method, base):
        side["trainer"]["logger"]["init_args"].pop("name")
        side["trainer"]["callbacks"] = [cb for cb in side["trainer"]["callbacks"] if not cb["class_path"].endswith("TrajectoryRevision")]
        for key in METHOD_KEYS:
            side["model"]["init_args"].pop(key)
    assert method == base


@pytest.mark.parametrize("config", [p for p in method_configs() if p.parent.name == "arith"], ids=lambda p: p.stem)
def test_arith_method_config_instantiates_what_it_says(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' run folders are relative
    from trd_lightning.callbacks import TrajectoryRevision

    printed = resolved(*c(config))
    cli = build_cli(["fit", *c(config), "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)
    init = printed["model"]["init_args"]
    assert cli.model.loss_name == init["loss"] and cli.model.mode == init["mode"]
    revisers = [cb.reviser for cb in cli.trainer.callbacks if isinstance(cb, TrajectoryRevision)]
    wanted = [cb["init_args"]["reviser"]["class_path"] for cb in printed["trainer"]["callbacks"] if cb["class_path"].endswith("TrajectoryRevision")]
    assert [f"{type(r).__module__}.{type(r).__name__}" for r in revisers] == wanted
    assert cli.trainer.max_steps == 100 and cli.datamodule.batch_size == 32


def test_trd_splice_reads_as_base_plus_fragment_plus_its_loss():
    assert resolved(*c(CONFIGS / "arith" / "trd_splice.yaml")) == resolved(
        *c(BASES["arith"], FRAGMENTS / "trd_splice.yaml"), "--model.init_args.loss=forward_kl", "--trainer.logger.init_args.name=trd_splice"
    )


@pytest.mark.parametrize("base", sorted(BASES), ids=str)
@pytest.mark.parametrize("fragment", fragments(), ids=lambda p: p.stem)
def test_fragment_composes_with_each_base(fragment, base):
    alone = callback_paths(resolved(*c(BASES[base])))
    composed = callback_paths(resolved(*c(BASES[base], fragment)))
    added = [cb["class_path"] for cb in yaml.safe_load(fragment.read_text())["trainer"]["callbacks+"]]
    assert composed == alone + added, "a fragment appends its callbacks and keeps the base's"


def test_fragments_compose_with_a_method_config():
    # The example: OPD plus the splice reviser plus the prefix audit.
    names = callback_paths(resolved(*c(CONFIGS / "arith" / "opd.yaml", FRAGMENTS / "trd_splice.yaml", FRAGMENTS / "prefix_audit.yaml")))
    assert names[-2:] == ["trd_lightning.callbacks.TrajectoryRevision", "trd_lightning.callbacks.PrefixAudit"]


def test_a_file_is_read_once_per_command():
    # trd_splice.yaml names callbacks/trd_splice.yaml already: giving it again must not add a second reviser.
    names = callback_paths(resolved(*c(CONFIGS / "arith" / "trd_splice.yaml", FRAGMENTS / "trd_splice.yaml", BASES["arith"])))
    assert names.count("trd_lightning.callbacks.TrajectoryRevision") == 1


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_configs_compose(overlay):
    printed = resolved(*c(CONFIGS / "arith" / "opd.yaml", CONFIGS / overlay))
    assert printed["trainer"]["strategy"]["class_path"] == "trd_lightning.sharding.FSDP2Strategy"
    assert callback_paths(printed)[-1] == "trd_lightning.callbacks.TeacherSharding"


def _write(folder: Path, name: str, data: dict) -> Path:
    (folder / name).write_text(yaml.safe_dump(data))
    return folder / name


@pytest.mark.parametrize(
    "files, message",
    [
        ({"m.yaml": {BASE_KEY: "missing.yaml", "seed_everything": 1}}, "names 'missing.yaml' under `_base_:`"),
        ({"m.yaml": {BASE_KEY: "n.yaml"}, "n.yaml": {BASE_KEY: "m.yaml"}}, "makes a cycle"),
        ({"m.yaml": {BASE_KEY: 3}}, "must be a path or a list of paths"),
        ({"m.yaml": {"model": {"init_args": {"loss": "forward_kl"}}}}, "it is a delta written on top of a base"),
    ],
    ids=["missing", "cycle", "not-a-path", "no-base"],
)
def test_a_wrong_or_missing_base_is_refused_before_compute(files, message, tmp_path):
    for name, data in files.items():
        _write(tmp_path, name, data)
    with pytest.raises(ValueError, match="config file .*m.yaml") as error:
        build_cli(["fit", "-c", str(tmp_path / "m.yaml"), "--print_config"])
    assert message in str(error.value) and error.value.trd_before_compute


def test_typo_in_config_key_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(CONFIGS / "arith" / "opd.yaml"), "--model.init_args.los=forward_kl", "--print_config"])
    assert "los" in capsys.readouterr().err


def test_unknown_loss_name_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(CONFIGS / "arith" / "opd.yaml"), "--model.init_args.loss=revers_kl", "--print_config"])
    assert "revers_kl" in capsys.readouterr().err


def _help(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_cli(["fit", *args])
    return out.getvalue()


def test_fit_help_titles_read_as_help_for_users():
    text = _help("--help")
    assert "<class '" not in text
    titles = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert any(t.startswith("Model: ") for t in titles) and any(t.startswith("Data: ") for t in titles)
    assert any(t.startswith("Trainer: ") for t in titles)
    assert "`_base_:`" in text  # -c says how files compose


def test_data_and_task_arguments_have_help_text():
    data = _help("--data.help", "trd_lightning.PromptDataModule")
    assert "problems per training step" in data
    task = _help("--data.help", "trd_lightning.PromptDataModule", "--data.task.help", "trd_lightning.tasks.ArithmeticTask")
    assert "fewest operations in a problem" in task


def test_expanded_arguments_expand_to_themselves():
    """A DDP/FSDP child process is re-launched with the already expanded argument list, whose
    inline JSON configs must pass through (they were once read as file names: OSError, name too long)."""
    from trd_lightning.compose import expand_bases

    once = expand_bases(["fit", "-c", "configs/arith/trd_splice.yaml", "-c", "configs/fsdp.yaml"])
    assert any(a.startswith("{") for a in once)
    assert expand_bases(once) == once
