"""The ``trd`` command: Lightning's own CLI (fit / validate / test / predict, YAML configs).

Every config names its module and data module by ``class_path`` (``DistillationModule`` and
``PromptDataModule`` for distillation, ``SFTModule`` and ``SFTDataModule`` for supervised
fine-tuning), so one entry point serves both, and users' own subclasses plug in the same way.
"""

from __future__ import annotations


from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningCLI

from trd_lightning.audit import AuditOptions, audit_with_trainer
from trd_lightning.callbacks.predictions import PredictionWriter
from trd_lightning.cli_errors import SuggestingArgumentParser
from trd_lightning.progress import default_progress_bar
from trd_lightning.export import export_student


class TRDTrainer(Trainer):
    """Lightning's Trainer plus ``audit``. LightningCLI subcommands are Trainer methods (it reads
    their signatures for the subcommand's arguments and calls ``trainer.<subcommand>``), so this is
    how ``trd audit`` gets the same config, ``--print_config`` and ``--ckpt_path`` as ``trd test``."""

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


class TRDCli(LightningCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # The distillation progress bar (see trd_lightning.progress) unless the config brings its
        # own bar or turns the bar off.
        user = config.get("callbacks") or []
        user = user if isinstance(user, list) else [user]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in [*user, *callbacks]):
            callbacks = [*callbacks, default_progress_bar()]
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in [*user, *callbacks]):
            callbacks = [*callbacks, PredictionWriter()]  # `trd predict` writes what it sampled
        return super()._instantiate_trainer(config, callbacks)

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

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def build_cli(args: list[str] | None = None, run: bool = True) -> TRDCli:
    """The CLI object (``run=False`` in notebooks: parse a config, get ``cli.model``/``cli.trainer``).

    With ``run=False`` a leading subcommand (``["fit", "-c", ...]``) is accepted and dropped, so the
    same argument list works both ways.
    """
    if not run and args and args[0] in TRDCli.subcommands():
        args = args[1:]
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
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    build_cli(args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
