"""Every shipped YAML parses through the `trd` CLI, and the CLI runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from trd_lightning.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Configs meant to be layered on top of a run config (`-c run.yaml -c fsdp.yaml`).
OVERLAYS = {"fsdp.yaml"}


def shipped_configs():
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.name not in OVERLAYS)


@pytest.mark.parametrize("config", shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_configs_compose(overlay, capsys):
    if not (CONFIGS / overlay).exists():
        pytest.skip(f"{overlay} not shipped yet")
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "-c", str(CONFIGS / "arith" / "opd.yaml"), "-c", str(CONFIGS / overlay), "--print_config"])
    assert exit_info.value.code in (0, None)


def test_typo_in_config_key_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(CONFIGS / "arith" / "opd.yaml"), "--model.init_args.los=forward_kl", "--print_config"])
    assert "los" in capsys.readouterr().err


def test_unknown_loss_name_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(CONFIGS / "arith" / "opd.yaml"), "--model.init_args.loss=revers_kl", "--print_config"])
    assert "revers_kl" in capsys.readouterr().err
