from trd_lightning.tasks.arithmetic import ArithmeticProblem, ArithmeticTask
from trd_lightning.tasks.base import Problem, Task

__all__ = ["ArithmeticProblem", "ArithmeticTask", "Problem", "Task"]
