"""Orbax checkpoints of a training run: one directory per step under `<workdir>/checkpoints/`.

Each step holds four items, so inference can restore the weights without the optimiser:
  model   {'params', 'batch_stats'}            what `eval` / `predict` load
  train   {'opt_state', 'step', 'rng', 'nan_skips'}
  data    the grain iterator state (the exact next batch on resume)
  config  the full experiment config as JSON (the model is rebuilt from it)
Saves are asynchronous; `close()` waits for the last one.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from miml_jax.errors import UserInputError

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def _data_handler():
  import grain  # Imported here: inference-only users need no input pipeline.
  return grain.checkpoint.CheckpointHandler()


class Checkpointer:
  """A CheckpointManager with the four items above."""

  def __init__(self, workdir: str, max_to_keep: int | None = 3, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    handlers = {"model": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    if not read_only:
      handlers["data"] = _data_handler()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                             read_only=read_only),
        item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, model_vars, train_vars, data_iter, config, force: bool = False):
    import grain
    self._manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_vars),
            train=ocp.args.StandardSave(train_vars),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config.to_dict())),
        force=force)

  def restore_training(self, step: int, abstract_model, abstract_train, data_iter):
    import grain
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(abstract_model),
            train=ocp.args.StandardRestore(abstract_train),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["model"], restored["train"]

  def restore_model(self, step: int, abstract_model):
    restored = self._manager.restore(
        step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model)))
    return restored["model"]

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
  """Resolves a workdir (or its checkpoints/ folder) to (workdir, step); errors name the path."""
  path = os.path.abspath(path)
  if os.path.basename(path) == CHECKPOINT_SUBDIR:
    path = os.path.dirname(path)
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise UserInputError(f"{path}: no checkpoint here (expected {directory}/<step>/)")
  steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  if not steps:
    raise UserInputError(f"{directory}: holds no finished checkpoint")
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise UserInputError(f"{directory}: no checkpoint for step {step} (have {steps})")
  return path, step


def load_model(path: str, step: int | None = None):
  """Loads (config, model, variables) of a checkpoint for inference on the local devices."""
  from miml_jax import models  # Local import keeps this module light for the trainer's import.
  workdir, step = find_checkpoint(path, step)
  checkpointer = Checkpointer(workdir, max_to_keep=None, read_only=True)
  try:
    config = checkpointer.restore_config(step)
    model = models.build_model(config.model)
    abstract = models.abstract_variables(model, config)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    try:
      variables = checkpointer.restore_model(step, abstract)
    except (ValueError, KeyError) as e:
      raise UserInputError(
          f"{workdir}: checkpoint step {step} does not match the model in its own config "
          f"({config.model.name}): {e}") from e
  finally:
    checkpointer.close()
  return config, model, variables, step


def describe_model(config) -> str:
  return json.dumps(config.model.to_dict(), sort_keys=True, default=list)
