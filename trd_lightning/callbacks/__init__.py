from trd_lightning.callbacks.collapse_guard import CollapseGuard
from trd_lightning.callbacks.learning_curve import LearningCurve
from trd_lightning.callbacks.pass_at_k import PassAtKEvaluation
from trd_lightning.callbacks.predictions import PredictionWriter
from trd_lightning.callbacks.preemption import PreemptionCheckpoint
from trd_lightning.callbacks.prefix_audit import PrefixAudit
from trd_lightning.callbacks.revision import TrajectoryRevision
from trd_lightning.callbacks.sharding import TeacherSharding

__all__ = ["CollapseGuard", "LearningCurve", "PassAtKEvaluation", "PredictionWriter", "PreemptionCheckpoint", "PrefixAudit", "TeacherSharding", "TrajectoryRevision"]
