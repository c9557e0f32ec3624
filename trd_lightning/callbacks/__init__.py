from trd_lightning.callbacks.pass_at_k import PassAtKEvaluation

__all__ = ["PassAtKEvaluation"]
