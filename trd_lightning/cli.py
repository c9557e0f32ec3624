"""The ``trd`` command: Lightning's own CLI (fit / validate / test / predict, YAML configs).

Every config names its module and data module by ``class_path`` (``DistillationModule`` and
``PromptDataModule`` for distillation, ``SFTModule`` and ``SFTDataModule`` for supervised
fine-tuning), so one entry point serves both, and users' own subclasses plug in the same way.

What ``trd`` adds to LightningCLI, all for reliability (docs/reliability.md):

* every checkpoint is written atomically (`AtomicCheckpointIO`) and ``trd fit`` saves one on
  SIGTERM (`PreemptionCheckpoint`, added unless the config has one) and exits non-zero;
* each run gets its own logger version folder (reserved with an exclusive ``mkdir``, so two runs
  of one config started together never share it); checkpoints and ``config.yaml`` go there;
* ``--ckpt_path`` never replaces the config with the checkpoint's hyperparameters: the
  checkpoint's configuration is compared with the new one (`trd_lightning.run_config`);
* cheap checks (paths, folders, numbers, the data files) run before any model is loaded, and an
  error found before compute is printed as one line (``TRD_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from trd_lightning import run_config
from trd_lightning.audit import AuditOptions, audit_with_trainer
from trd_lightning.callbacks import PredictionWriter
from trd_lightning.callbacks.preemption import PreemptionCheckpoint
from trd_lightning.checkpoint_io import AtomicCheckpointIO, load_checkpoint_file
from trd_lightning.cli_errors import SuggestingArgumentParser, check_config_files, unwrap_union_error
from trd_lightning.compose import expand_bases
from trd_lightning.export import export_student
from trd_lightning.progress import default_progress_bar


class TRDTrainer(Trainer):
    """Trainer: Lightning's Trainer options (devices, precision, steps, logger, callbacks, plugins).

    Lightning's Trainer plus ``audit`` and ``export``. LightningCLI subcommands are Trainer methods
    (it reads their signatures for the subcommand's arguments and calls ``trainer.<subcommand>``), so
    this is how ``trd audit`` gets the same config, ``--print_config`` and ``--ckpt_path`` as
    ``trd test``. (The first line is the title of ``trd fit --help``'s trainer group.)"""

    def audit(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        audit: AuditOptions | None = None,
    ) -> dict:
        """Prefix-failure audit: sample student rollouts, diagnose the teacher along them, write a report.

        Args:
            ckpt_path: a checkpoint of ``trd fit`` whose student weights are audited (default: the
                config's initial weights).
            audit: the audit's options (``--audit.num_problems``, ``--audit.output_dir``, ...).
        """
        return audit_with_trainer(self, model, datamodule, ckpt_path, audit)

    def export(
        self,
        model: LightningModule,
        output_dir: str,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        adapter_only: bool = False,
        overwrite: bool = False,
    ) -> str:
        """Write the trained student as a Hugging Face folder (see `trd_lightning.export`).

        Args:
            output_dir: the folder to write (weights, config, generation config, tokenizer).
            ckpt_path: the checkpoint of ``trd fit`` (a .ckpt file or a sharded FSDP2 folder).
            adapter_only: with a LoRA student, write the peft adapter alone instead of merged weights.
            overwrite: replace a non-empty ``output_dir``.
        """
        if not self.is_global_zero:
            return str(output_dir)
        return str(export_student(model, ckpt_path, output_dir, adapter_only=adapter_only, overwrite=overwrite))


class TRDSaveConfig(SaveConfigCallback):
    """``config.yaml`` in the run folder (Lightning's), and the same configuration, plus a
    fingerprint of the model weights, inside every checkpoint: what ``--ckpt_path`` compares."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[run_config.CONFIG_KEY] = self.parser.dump(self.config, skip_none=False)
        if not hasattr(self, "_fingerprints"):
            self._fingerprints = run_config.model_fingerprints(self.config)
        checkpoint[run_config.FINGERPRINT_KEY] = self._fingerprints


class TRDCli(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "audit": {"model", "datamodule"}, "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after `fit`, evaluate the final weights on the test split (Pass@k callbacks log test/*)",
        )
        _instantiate_data_before_model(parser)
        _title_groups(parser)

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)

    # --- before any model loads -----------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """LightningCLI re-parses the config with the checkpoint's hyperparameters, so a resume or
        ``trd test`` silently runs with the *checkpoint's* student, loss, LoRA... whatever the
        config and config.yaml say. Compare instead: refuse what changes the run, keep the rest."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path:
            return
        with _before_compute():
            if ckpt_path in ("last", "best", "hpc", "registry"):
                ckpt_path = run_config.resolve_named_checkpoint(subcommand, ckpt_path, self.config[subcommand])
                if ckpt_path is None:
                    return
                self.config[subcommand].ckpt_path = ckpt_path
            ckpt = load_checkpoint_file(ckpt_path)
            run_config.check_resume(subcommand, ckpt, ckpt_path, self._parser(subcommand), self.config[subcommand])

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        with _before_compute():
            run_config.check_before_models(cfg, self.subcommand)
            run_config.check_data(cfg, self.subcommand)

    def instantiate_classes(self) -> None:
        with _before_compute():
            try:
                super().instantiate_classes()
            except Exception as e:  # noqa: BLE001 - re-raised, only unwrapped
                raise unwrap_union_error(e) from None

    def _instantiate_trainer(self, config: dict, callbacks: list[Callback]) -> Trainer:
        user = config.get("callbacks") or []
        given = (list(user) if isinstance(user, list) else [user]) + list(callbacks)
        # The distillation progress bar (see trd_lightning.progress) unless the config brings its
        # own bar or turns the bar off; `trd predict` writes what it sampled.
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, default_progress_bar()]
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in given):
            callbacks = [*callbacks, PredictionWriter()]
        if self.subcommand in (None, "fit") and not any(isinstance(c, PreemptionCheckpoint) for c in given):
            # A scheduler's SIGTERM must never end a run without a checkpoint.
            callbacks = [*callbacks, PreemptionCheckpoint()]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        run_config.reserve_logger_versions(config.get("logger"))
        trainer = super()._instantiate_trainer(config, callbacks)
        run_config.check_writable_folders(trainer, self.subcommand)
        return trainer


class _before_compute:
    """Marks an exception as raised before any compute, for `main` to print as one line."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, Exception):
            exc.trd_before_compute = True
        return False


def _instantiate_data_before_model(parser) -> None:
    """jsonargparse instantiates same-depth keys in the parser's order (model, then data): put the
    data module first, so its cheap checks fail before a multi-minute model load."""
    actions = parser._actions
    model = next((i for i, a in enumerate(actions) if a.dest == "model"), None)
    data = next((i for i, a in enumerate(actions) if a.dest == "data"), None)
    if model is not None and data is not None and data > model:
        actions.insert(model, actions.pop(data))


#: ``--help`` group titles for the subclass-mode keys: jsonargparse titles a group with its base
#: class's docstring, which for LightningModule is none (the title read
#: ``<class 'lightning.pytorch.core.module.LightningModule'>``) and for LightningDataModule
#: Lightning's developer docstring cut mid-sentence.
_GROUP_TITLES = {
    "model": "Model: the LightningModule to train (its arguments: --model.help CLASS_PATH)",
    "data": "Data: the LightningDataModule that serves the problems (its arguments: --data.help CLASS_PATH)",
}
_CONFIG_HELP = (
    "A YAML (or JSON) config file. Repeat -c to layer files: each later file overrides the earlier "
    "ones and `trainer.callbacks+:` appends callbacks (e.g. -c configs/arith/opd.yaml -c "
    "callbacks/prefix_audit.yaml). A file's `_base_:` names the files it is written on top of."
)


def _title_groups(parser) -> None:
    for key, title in _GROUP_TITLES.items():
        group = getattr(parser, "groups", {}).get(key)
        if group is not None:
            group.title, group.description = title, None
    for action in parser._actions:
        if action.dest == "config":
            action.help = _CONFIG_HELP


_NULLS = ("null", "Null", "NULL", "~")


def nested_nulls_as_objects(args: list[str]) -> list[str]:
    """jsonargparse 4.53 hands a value two class levels down (``--data.init_args.task.init_args.X``)
    to the inner parser as ``f"--X={value}"``, so a ``null`` arrives as the string ``'None'``
    (a system turn that says "None"). The same assignment written as an object for the outer key
    (``--data '{"init_args": {"task": {"init_args": {"X": null}}}}'``) merges like the original
    and keeps the null."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key, value, width = None, None, 1
        if arg.startswith("--") and arg.count(".init_args.") >= 2:
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
            elif i + 1 < len(args):
                key, value, width = arg[2:], args[i + 1], 2
        if key is not None and value in _NULLS and key.split(".", 1)[0] in ("model", "data"):
            top, *rest = key.split(".")
            nested: object = None
            for part in reversed(rest):
                nested = {part: nested}
            out += [f"--{top}", json.dumps(nested)]
        else:
            out += args[i : i + width]
        i += width
    return out


def build_cli(args: list[str] | None = None, run: bool = True) -> TRDCli:
    """The CLI object (``run=False`` in notebooks: parse a config, get ``cli.model``/``cli.trainer``).

    With ``run=False`` a leading subcommand (``["fit", "-c", ...]``) is accepted and dropped, so the
    same argument list works both ways.
    """
    if not run and args and args[0] in TRDCli.subcommands():
        args = args[1:]
    if args is None:
        sys.argv[1:] = nested_nulls_as_objects(sys.argv[1:])
    else:
        args = nested_nulls_as_objects(list(args))
    with _before_compute():
        check_config_files(sys.argv[1:] if args is None else [a for a in args if isinstance(a, str)])
        # A config file's `_base_:` files become LightningCLI's own multiple -c (trd_lightning.compose).
        if args is None:
            sys.argv[1:] = expand_bases(sys.argv[1:])
        else:
            args = expand_bases(args)
    # auto_configure_optimizers would hand the teacher's parameters to the optimizer too: modules
    # take an `optimizer` callable instead and build it from the student's parameters.
    return TRDCli(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=TRDTrainer,
        parser_class=SuggestingArgumentParser,  # "did you mean" for a misspelled key
        auto_configure_optimizers=False,
        save_config_callback=TRDSaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    try:
        build_cli(args)  # None: LightningCLI reads sys.argv itself
    except Exception as e:
        if not getattr(e, "trd_before_compute", False) or os.environ.get("TRD_TRACEBACK"):
            raise
        # Nothing was computed: the message (which names the file or key and the fix) is the news.
        sys.stderr.write(f"error: {type(e).__name__}: {e}\n(set TRD_TRACEBACK=1 for the traceback)\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
