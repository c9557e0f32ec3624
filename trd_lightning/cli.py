"""The ``trd`` command: Lightning's own CLI (fit / validate / test / predict, YAML configs).

Every config names its module and data module by ``class_path`` (``DistillationModule`` and
``PromptDataModule`` for distillation, ``SFTModule`` and ``SFTDataModule`` for supervised
fine-tuning), so one entry point serves both, and users' own subclasses plug in the same way.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class TRDCli(LightningCLI):
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
    """The CLI object (``run=False`` in notebooks: parse a config, get ``cli.model``/``cli.trainer``)."""
    # auto_configure_optimizers would hand the teacher's parameters to the optimizer too: modules
    # take an `optimizer` callable instead and build it from the student's parameters.
    return TRDCli(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    build_cli(sys.argv[1:] if args is None else args)


if __name__ == "__main__":
    main()
