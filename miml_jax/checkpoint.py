"""Orbax checkpoints of a training run.

Layout: `<workdir>/checkpoints/<step>/` (the latest steps, to resume) and `<workdir>/best/<step>/`
(the best by a validation metric; weights and config only). A training checkpoint holds three
items, so inference can restore the weights without the optimiser:
  model   {'params', 'batch_stats'}            what `eval` / `predict` load
  train   {'opt_state', 'step', 'rng', 'nan_skips'}
  config  the full experiment config as JSON (the model is rebuilt from it)
The input pipeline's state is `train.step`: the pipeline is a pure function of the global batch
index (input/pipeline.py), so a resumed run rebuilds it at that step.
Saves are asynchronous; `close()` waits for the last one. A run killed mid-save leaves only an
orbax temporary directory, which is neither listed nor restored.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from miml_jax.errors import UserInputError

CHECKPOINT_SUBDIR = "checkpoints"  # the latest `train.keep_checkpoints` steps, for resuming
BEST_SUBDIR = "best"  # the `train.keep_best` steps with the best `train.best_metric`: model only


def checkpoint_dir(workdir: str, subdir: str = CHECKPOINT_SUBDIR) -> str:
  return os.path.join(os.path.abspath(workdir), subdir)


class Checkpointer:
  """A CheckpointManager over one directory of `<step>/` checkpoints with the items above.

  best_metric: keep the `max_to_keep` checkpoints with the highest value of this key of the
  metrics passed to save() (the `best/` directory); None keeps the latest ones.
  """

  def __init__(
    self,
    directory: str,
    max_to_keep: int | None = 3,
    read_only: bool = False,
    best_metric: str | None = None,
  ):
    self.directory = directory
    handlers = {
      "model": ocp.StandardCheckpointHandler(),
      "train": ocp.StandardCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    }
    best = {}
    if best_metric:
      best = dict(
        best_fn=lambda metrics: metrics[best_metric],
        best_mode="max",
        keep_checkpoints_without_metrics=False,
      )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only, **best
      ),
      item_handlers=handlers,
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, model_vars, config, train_vars=None, metrics: dict | None = None):
    """Saves the weights and config, and the training state unless train_vars is None."""
    items = dict(
      model=ocp.args.StandardSave(model_vars), config=ocp.args.JsonSave(config.to_dict())
    )
    if train_vars is not None:
      items["train"] = ocp.args.StandardSave(train_vars)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

  def restore_training(self, step: int, abstract_model, abstract_train):
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_model),
        train=ocp.args.StandardRestore(abstract_train),
      ),
    )
    return restored["model"], restored["train"]

  def restore_model(self, step: int, abstract_model):
    restored = self._manager.restore(
      step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model))
    )
    return restored["model"]

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _steps(directory: str) -> list[int]:
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
  """Resolves a path to (checkpoint directory, step); errors name the path.

  `path` is a training workdir (its latest checkpoints/ are used), a directory of `<step>/`
  checkpoints itself, such as `<workdir>/best`, or one step's folder (`<workdir>/best/900`).
  """
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path) and int(base) in _steps(os.path.dirname(path)):
    if step is not None and step != int(base):
      raise UserInputError(f"{path} is the checkpoint of step {base}, not of step {step}")
    return os.path.dirname(path), int(base)
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    if not (os.path.isdir(path) and _steps(path)):
      raise UserInputError(
        f"{path}: no checkpoint here (expected {directory}/<step>/, or "
        f"<step>/ folders in {path} itself)"
      )
    directory = path
  steps = _steps(directory)
  if not steps:
    raise UserInputError(f"{directory}: holds no finished checkpoint")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise UserInputError(f"{directory}: no checkpoint for step {step} (have {steps})")
  return directory, step


def load_model(path: str, step: int | None = None):
  """Loads (config, model, variables, step) of a checkpoint for inference on the local devices."""
  from miml_jax import models  # Local import keeps this module light for the trainer's import.

  directory, step = find_checkpoint(path, step)
  checkpointer = Checkpointer(directory, max_to_keep=None, read_only=True)
  try:
    from miml_jax import tasks

    config = tasks.validate_config(checkpointer.restore_config(step))
    model = models.build_model(config.model)
    abstract = models.abstract_variables(model, config)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )
    try:
      variables = checkpointer.restore_model(step, abstract)
    except (ValueError, KeyError) as e:
      raise UserInputError(
        f"{directory}: checkpoint step {step} does not match the model in its own config "
        f"({config.model.name}): {e}"
      ) from e
  finally:
    checkpointer.close()
  return config, model, variables, step


def load_for_inference(
  checkpoint: str | None,
  step: int | None = None,
  init: str | None = None,
  config_spec: str | None = None,
  overrides: list[str] = (),
):
  """(config, model, variables, step) from a checkpoint (with its own config, `overrides`
  applied), or from an init file of `miml-jax convert` with the experiment config that built it
  (step None)."""
  from miml_jax import config as config_lib
  from miml_jax import models, tasks

  if checkpoint:
    if init or config_spec:
      raise UserInputError(
        "--checkpoint brings its own config: give --checkpoint, or --init with --config"
      )
    config, model, variables, step = load_model(checkpoint, step)
    config_lib.apply_overrides(config, list(overrides))
    return tasks.validate_config(config), model, variables, step
  if not init or not config_spec:
    raise UserInputError("give --checkpoint WORKDIR, or --init FILE with --config CFG")
  config = config_lib.load_config(config_spec)
  config_lib.apply_overrides(config, list(overrides))
  config = tasks.validate_config(config)
  model = models.build_model(config.model)
  return config, model, models.load(model, config, init)[0], None


def describe_model(config) -> str:
  return json.dumps(config.model.to_dict(), sort_keys=True, default=list)
