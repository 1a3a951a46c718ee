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
orbax temporary directory, which is neither listed nor restored. A finished checkpoint that
cannot be read back (a truncated data file, a zeroed `_METADATA`) is named in a warning and the
next older one is used (`restore_newest_intact`): by the trainer when it resumes, and by `eval`,
`predict` and `demo` unless a step was asked for.
"""

import json
import os
import re
import sys

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
  directory, steps, _ = _locate(path, step)
  return directory, steps[-1]


def _locate(path: str, step: int | None) -> tuple[str, list[int], bool]:
  """(checkpoint directory, its steps up to the one to use (oldest first), whether that step
  was asked for: a --step or a step's folder, which is never swapped for an older one)."""
  path = os.path.abspath(path)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(path) and int(base) in _steps(os.path.dirname(path)):
    if step is not None and step != int(base):
      raise UserInputError(f"{path} is the checkpoint of step {base}, not of step {step}")
    return os.path.dirname(path), [int(base)], True
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
    return directory, steps, False
  if step not in steps:
    raise UserInputError(f"{directory}: no checkpoint for step {step} (have {steps})")
  return directory, [step], True


def short_reason(error: BaseException) -> str:
  """One short line for why a checkpoint could not be read: the root cause of an orbax /
  TensorStore / JSON error (they chain several, each many lines long), without file paths."""
  while error.__cause__ is not None or (
    error.__context__ is not None and not error.__suppress_context__
  ):
    error = error.__cause__ or error.__context__
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
  # Absolute paths (quoted or not) shortened to their last part.
  text = re.sub(
    r"([\"'])(/[^\"']*)\1", lambda m: m[1] + os.path.basename(m[2].rstrip("/")) + m[1], text
  )
  text = re.sub(r"(?<![^\s(\[])/[^\s,;:)\]]+", lambda m: os.path.basename(m.group(0)), text)
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= 160 else text[:157] + "..."


# The JSON files orbax writes into a step's folder (and each item's): its own metadata.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def _broken_json(step_dir: str, error: Exception) -> str:
  """short_reason, with the file at fault when it is a JSON file that does not parse (orbax's
  JSONDecodeError names none)."""
  reason = short_reason(error)
  if not reason.startswith("JSONDecodeError"):
    return reason
  for root, _, files in sorted(os.walk(step_dir)):
    for name in sorted(files):
      if name in _JSON_FILES:
        path = os.path.join(root, name)
        try:
          with open(path, "rb") as f:
            json.loads(f.read())
        except (OSError, ValueError):
          return f"{os.path.relpath(path, step_dir)}: {reason}"
  return reason


def restore_newest_intact(directory: str, steps: list[int], restore, pinned: bool = False):
  """`restore(step)` for each of `steps`, newest first, until one succeeds: returns (step, what
  it returned, the newer steps that could not be read).

  Each unreadable step is warned about on stderr, `warning: <directory>/<step> is unreadable
  (<reason>); using step <older>`. pinned: only the newest step may be used (a step the user
  asked for). None readable: a one-line UserInputError naming the directory and the reason.
  A UserInputError from `restore` (a config this version refuses, say) is not unreadability:
  it is raised as it is.
  """
  failures = []
  for step in sorted(steps, reverse=True)[: 1 if pinned else None]:
    try:
      restored = restore(step)
    except UserInputError:
      raise
    except Exception as e:  # orbax, TensorStore and json raise many types; all mean unreadable.
      failures.append((step, _broken_json(os.path.join(directory, str(step)), e)))
      continue
    if jax.process_index() == 0:
      for broken, reason in failures:
        print(
          f"warning: {directory}/{broken} is unreadable ({reason}); using step {step}",
          file=sys.stderr,
          flush=True,
        )
    return step, restored, [broken for broken, _ in failures]
  newest, reason = failures[0]
  others = (
    f"; so are the older step(s) {', '.join(str(s) for s, _ in failures[1:])}"
    if len(failures) > 1
    else ""
  )
  if pinned:
    raise UserInputError(f"{directory}/{newest} is unreadable ({reason})")
  raise UserInputError(
    f"{directory}/{newest} is unreadable ({reason}){others}; no intact checkpoint to use"
  )


def load_model(path: str, step: int | None = None):
  """Loads (config, model, variables, step) of a checkpoint for inference on the local devices.

  Without `step` (and for a directory of steps) the newest readable step is used: a broken
  newer one is warned about (restore_newest_intact)."""
  # Local imports keep this module light for the trainer's import.
  from miml_jax import models, tasks

  directory, steps, pinned = _locate(path, step)
  checkpointer = Checkpointer(directory, max_to_keep=None, read_only=True)

  def restore(step):
    config = tasks.validate_config(checkpointer.restore_config(step))
    model = models.build_model(config.model)
    abstract = models.abstract_variables(model, config)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )
    return config, model, checkpointer.restore_model(step, abstract)

  try:
    step, (config, model, variables), _ = restore_newest_intact(
      directory, steps, restore, pinned=pinned
    )
  finally:
    checkpointer.close()
  return config, model, variables, step


def set_aside(directory: str, steps: list[int]) -> list[str]:
  """Moves unreadable `<directory>/<step>` folders to `<directory>.unreadable/<step>` (kept for
  a look, out of the way of new saves of the same steps); returns where each went."""
  moved = []
  for step in steps:
    target = os.path.join(f"{directory}.unreadable", str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(f"{directory}.unreadable", f"{step}_{suffix}")
      suffix += 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(directory, str(step)), target)
    moved.append(target)
  return moved


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
