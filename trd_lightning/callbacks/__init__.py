from trd_lightning.callbacks.pass_at_k import PassAtKEvaluation
from trd_lightning.callbacks.prefix_audit import PrefixAudit
from trd_lightning.callbacks.revision import TrajectoryRevision

__all__ = ["PassAtKEvaluation", "PrefixAudit", "TrajectoryRevision"]
