from trd_lightning.tasks.arithmetic import ArithmeticProblem, ArithmeticTask
from trd_lightning.tasks.base import Problem, Task
from trd_lightning.tasks.math import MathProblem, MathTask

__all__ = ["ArithmeticProblem", "ArithmeticTask", "MathProblem", "MathTask", "Problem", "Task"]
