"""The registry of tasks (base.py states the contract).

`config.task` names one; absent, the model's registered task (models.MODELS) is used. A new task
is a module here with a Task subclass, and one line in TASKS.
"""

from miml_jax.errors import UserInputError
from miml_jax.tasks.base import IMAGE, MASK, DenseTask, Task
from miml_jax.tasks.copy_move import CopyMoveTask
from miml_jax.tasks.pair_classification import PairClassificationTask
from miml_jax.tasks.pair_segmentation import PairSegmentationTask
from miml_jax.tasks.sdg_segmentation import SDGSegmentationTask
from miml_jax.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {
  "segmentation": SegmentationTask,
  "pair_segmentation": PairSegmentationTask,
  "pair_classification": PairClassificationTask,
  "sdg_segmentation": SDGSegmentationTask,
  "copy_move": CopyMoveTask,
}


def task_name(config) -> str:
  """The config's task: `config.task`, else the default registered with its model."""
  name = config.get("task")
  if name is None:
    from miml_jax import models

    name = models.model_spec(config.model).task
  if name not in TASKS:
    raise UserInputError(f"task: {name!r} is not one of {', '.join(TASKS)}")
  return name


def task_class(config) -> type[Task]:
  return TASKS[task_name(config)]


def build(config) -> Task:
  """The task of an experiment config."""
  return task_class(config)(config)


def validate_config(config):
  """config.validate with the loss section checked against the config's task: every section
  checked and optional keys filled in, before anything is traced or written."""
  from miml_jax import config as config_lib

  return config_lib.validate(config, loss_schema=task_class(config).loss_schema)


__all__ = [
  "IMAGE",
  "MASK",
  "TASKS",
  "DenseTask",
  "Task",
  "build",
  "task_class",
  "task_name",
  "validate_config",
]
