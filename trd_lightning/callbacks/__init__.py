"""Callbacks, each in the file named after it; configs name them ``trd_lightning.callbacks.<Class>``."""

from trd_lightning.callbacks.collapse_guard import CollapseGuard
from trd_lightning.callbacks.learning_curve import LearningCurve
from trd_lightning.callbacks.pass_at_k import PassAtKEvaluation
from trd_lightning.callbacks.prediction_writer import PredictionWriter
from trd_lightning.callbacks.preemption import PreemptionCheckpoint
from trd_lightning.callbacks.prefix_audit import PrefixAudit
from trd_lightning.callbacks.teacher_sharding import TeacherSharding
from trd_lightning.callbacks.trajectory_revision import TrajectoryRevision

__all__ = ["CollapseGuard", "LearningCurve", "PassAtKEvaluation", "PredictionWriter", "PreemptionCheckpoint", "PrefixAudit", "TeacherSharding", "TrajectoryRevision"]
