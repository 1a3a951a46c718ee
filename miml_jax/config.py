"""Experiment configs: Python files in `experiments/` whose `get_config(arg)` returns a ConfigDict.

`--config experiments/quickstart.py[:arg]` loads the file (the part after ':' is passed to
`get_config`, as in big_vision), and `--config.a.b=v` overrides a field. Overrides are parsed to
the type of the existing field; a key that does not exist is an error that names it (typos must
not silently train something else).

`validate(config)` checks a whole experiment config against the section dataclasses below
(DataConfig, InputConfig, OptimConfig, MeshConfig, TrainConfig, EvalConfig; the task's loss
schema) before anything runs, and returns a copy with the defaults of absent optional keys
filled in, so code reads every key directly.
"""

import ast
from collections.abc import Mapping
import copy
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import types
import typing
from typing import Any, ClassVar

import ml_collections
import numpy as np

from miml_jax.errors import UserInputError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserInputError(f"{path}: config file not found")
  module_spec = importlib.util.spec_from_file_location(
    "miml_jax_config_" + os.path.splitext(os.path.basename(path))[0], path
  )
  module = importlib.util.module_from_spec(module_spec)
  folder = os.path.dirname(os.path.abspath(path))
  sys.path.insert(0, folder)  # As for a script: it may import its neighbours (`import common`).
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # A broken config file is the user's, report it as such.
    raise UserInputError(f"{path}: cannot load config: {type(e).__name__}: {e}") from e
  finally:
    sys.path.remove(folder)
  if not hasattr(module, "get_config"):
    raise UserInputError(f"{path}: defines no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # e.g. an unknown variant after ':'
    raise UserInputError(f"{spec}: get_config failed: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserInputError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  return config


def _parse_value(text: str, current):
  """Parses an override string to the type of the field it replaces."""
  if isinstance(current, str) or current is None and not _looks_literal(text):
    return text
  if isinstance(current, float):
    return float(text)  # Also accepts nan / inf, which literal_eval does not.
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered in ("true", "false"):
        return lowered == "true"
    raise
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def _looks_literal(text: str) -> bool:
  try:
    ast.literal_eval(text)
    return True
  except (ValueError, SyntaxError):
    return False


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
  """Applies `a.b=v` overrides in place (the leading `--config.` already stripped)."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise UserInputError(f"--config.{item}: expected --config.KEY=VALUE")
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserInputError(f"--config.{key}: no config key '{'.'.join(parts[: depth + 1])}'")
      node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise UserInputError(f"--config.{key}: no config key '{key}'")
    current = node[leaf]
    try:
      value = _parse_value(text, current)
      with node.unlocked():
        node[leaf] = value
    except (ValueError, SyntaxError, TypeError) as e:
      raise UserInputError(
        f"--config.{key}={text}: cannot set a field of type {type(current).__name__}: {e}"
      ) from e


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def settings_from_config(cls, config, prefix: str):
  """A frozen dataclass of settings (AugmentConfig, ObjectJitterConfig, ...) from a dict or
  ConfigDict (None: the defaults), checked as `validate` checks a section: an unknown key is an
  error naming it, since a typo would silently do nothing; so is a wrong type or a value out of
  range; lists (ConfigDicts hold tuples as lists) become tuples."""
  _, instance = _check_section(cls, {} if config is None else _plain(config), prefix)
  return instance


# ---- Validation -------------------------------------------------------------------------
# Every section of an experiment config is a frozen dataclass below (the `loss` section's comes
# from the task, e.g. losses.SegmentationLossConfig). A field's annotation is its type; a field
# with a default is optional (configs saved before it existed still load); its metadata (from
# `setting`) holds the range or choices it must satisfy. A class's SECTIONS registry names its
# nested sections (e.g. data.object_jitter), each checked against its own dataclass.


def setting(
  default=dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, choices=None, check=None
):
  """A dataclass field with the constraints `validate` checks, each error naming the key.

  ge / gt / le / lt: bounds of a number. choices: the allowed values, or a zero-argument
  callable returning them (a registry of another module, read when checked: see `lazy`).
  check: value -> error text or None, for rules the others cannot say.
  """
  metadata = {
    name: value
    for name, value in (
      ("ge", ge),
      ("gt", gt),
      ("le", le),
      ("lt", lt),
      ("choices", choices),
      ("check", check),
    )
    if value is not None
  }
  return dataclasses.field(default=default, metadata=metadata)


def probability(default=dataclasses.MISSING):
  return setting(default, ge=0, le=1)


def ordered_pair(low=None, high=None, *, low_open: bool = False):
  """A `check` for a (min, max) pair: min <= max, both in [low, high] ((low, high] if
  low_open)."""

  def check(pair) -> str | None:
    first, second = pair
    if first > second:
      return f"expected (min, max) with min <= max, got {pair!r}"
    if low is not None and (first <= low if low_open else first < low):
      return f"expected values {'>' if low_open else '>='} {_num(low)}, got {pair!r}"
    if high is not None and second > high:
      return f"expected values <= {_num(high)}, got {pair!r}"
    return None

  return check


def lazy(ref: str):
  """A zero-argument callable returning `module:attribute`, imported on first call.

  The settings dataclasses and registries live in modules that import this one (for
  `settings_from_config`), so naming them here at import time would be an import cycle.
  """
  module_name, _, attribute = ref.partition(":")

  def resolve():
    return getattr(importlib.import_module(module_name), attribute)

  return resolve


@dataclasses.dataclass(frozen=True)
class Section:
  """A nested section: its dataclass (or a `lazy` reference to one), and whether it must be
  given; an absent optional section gets its dataclass's defaults."""

  schema: Any
  required: bool = False

  def resolve(self) -> type:
    return self.schema if isinstance(self.schema, type) else self.schema()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """`data`: where examples come from (input/sources.py) and the forgery recipes' settings."""

  # Nested settings sections, data.<name> -> the dataclass that checks them (absent: its
  # defaults); a new source's recipe settings are one line here.
  SECTIONS: ClassVar[dict[str, Section]] = {
    "object_jitter": Section(lazy("miml_jax.input.object_jitter:ObjectJitterConfig")),
    "instance_forgery": Section(lazy("miml_jax.input.instance_forgery:InstanceForgeryConfig")),
    "spg": Section(lazy("miml_jax.input.pairs:SPGConfig")),
    "pair_synth": Section(lazy("miml_jax.input.pairs:PairSynthConfig")),
  }
  train: str
  validation: str
  image_size: int = setting(ge=32)
  seed: int
  on_error: str = setting("raise", choices=("raise", "skip"))
  # Images with more pixels are refused from their file header, before decoding (decompression
  # bombs); 2**28 (16384^2) is io.DEFAULT_MAX_IMAGE_PIXELS. Applied by eval, predict, the demo.
  max_image_pixels: int = setting(2**28, ge=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputConfig:
  """`input`: the training pipeline (input/pipeline.py); `augment` is transforms.AugmentConfig."""

  SECTIONS: ClassVar[dict[str, Section]] = {
    "augment": Section(lazy("miml_jax.input.transforms:AugmentConfig"), required=True),
  }
  # The global batch, over all processes and devices.
  batch_size: int = setting(ge=1)
  num_workers: int = setting(ge=0)
  read_threads: int = setting(16, ge=1)
  prefetch_batches: int = setting(16, ge=1)


def _frozen_patterns(patterns) -> str | None:
  bad = [p for p in patterns if not isinstance(p, str) or not p or p.startswith("/")]
  return f"expected parameter path patterns like 'backbone/*', got {bad!r}" if bad else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """`optim`: the optimiser and its learning-rate rule (optim.py)."""

  name: str = setting(choices=lazy("miml_jax.optim:OPTIMIZERS"))
  lr: float = setting(gt=0)
  b1: float = setting(ge=0, lt=1)
  b2: float = setting(ge=0, lt=1)
  eps: float = setting(ge=0)
  weight_decay: float = setting(ge=0)
  # < 1: ConvNeXt stage-wise decay of the learning rate; 1: one rate for all.
  layer_decay: float = setting(gt=0, le=1)
  layer_decay_num_layers: int = setting(ge=1)
  schedule: str = setting(choices=lazy("miml_jax.optim:SCHEDULES"))
  power: float = setting(ge=0)
  min_lr: float = setting(ge=0)
  warmup_steps: int = setting(ge=0)
  warmup_ratio: float = probability()
  total_steps: int = setting(ge=1)
  # 0: no clipping.
  grad_clip_norm: float = setting(ge=0)
  accumulate_steps: int = setting(ge=1)
  # Glob patterns over '/'-joined parameter paths (e.g. 'backbone/*') whose parameters the
  # optimiser leaves unchanged: a frozen pretrained trunk, or one stage of a staged recipe.
  frozen: tuple[str, ...] = setting((), check=_frozen_patterns)


def _mesh_axis(value: int) -> str | None:
  return None if value == -1 or value >= 1 else f"expected a positive size or -1, got {value}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """`mesh`: the ('data', 'fsdp') device mesh (sharding.py); -1 = the devices left over."""

  data: int = setting(-1, check=_mesh_axis)
  fsdp: int = setting(1, check=_mesh_axis)
  # Parameters with fewer elements stay replicated (2**18 = sharding.DEFAULT_FSDP_MIN_SIZE).
  fsdp_min_size: int = setting(2**18, ge=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """`train`: the loop (train.py)."""

  steps: int = setting(ge=1)
  log_every: int = setting(ge=1)
  checkpoint_every: int = setting(ge=1)
  # 0: validate only at the end.
  eval_every: int = setting(ge=0)
  keep_checkpoints: int = setting(ge=1)
  nan_policy: str = setting(choices=("stop", "skip"))
  # Under nan_policy='skip', a step whose update is larger than this times the weights,
  # ||update|| / ||params||, is skipped like a non-finite one: a diverging learning rate gives
  # finite but absurd updates, which would otherwise be applied and checkpointed. Measured on
  # the quickstart (300 steps, lr 2e-3): at most 0.0055 (just after warm-up), median 0.0012; its
  # first step at lr 1e6 is 4.7, later ones 1e3 to 1e4. inf turns the check off.
  max_update_ratio: float = setting(1.0, gt=0)
  # A key of the task's evaluation summary ('' keeps no best checkpoint); which keys exist is
  # the task's to say, so the trainer checks the name.
  best_metric: str = ""
  keep_best: int = setting(1, ge=1)
  tensorboard: bool = True
  # MFU's denominator; 0 looks the device up (mfu.py).
  peak_flops_per_device: float = setting(0.0, ge=0)


def _known_conventions(value) -> str | None:
  if isinstance(value, str):
    if value.strip() in ("all", "", "none"):
      return None
    value = value.split(",")
  from miml_jax import evaluate  # Heavy (models, jax): imported only when the key is given.

  unknown = [name.strip() for name in value if name.strip() not in evaluate.CONVENTIONS]
  if unknown:
    return (
      f"unknown convention(s) {', '.join(map(repr, unknown))} (known: all, none, "
      f"{', '.join(evaluate.CONVENTIONS)})"
    )
  return None


def _multiple_of_32(value: int) -> str | None:
  # The models' output stride: padding to less would not make the sizes they need.
  return None if value % 32 == 0 else f"expected a multiple of 32, got {value}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """`eval`: validation during training and `miml-jax eval` (evaluate.py, predict.py)."""

  batch_size: int = setting(ge=1)
  # 'fixed': `threshold`; 'image_head': the official clamp(1 - p, 0.3, 0.7).
  threshold_policy: str = setting(choices=("fixed", "image_head"))
  threshold: float = probability()
  # 'miml': the official test-time rule (transforms.test_size); 'none': every image as it is.
  resize: str = setting("miml", choices=("none", "miml"))
  num_pictures: int = setting(ge=0)
  # 'all', 'none' / '', or names of evaluate.CONVENTIONS (comma-separated or a list).
  conventions: str | tuple[str, ...] = setting("all", check=_known_conventions)
  # Test images are padded to a multiple of this; 128 or 256 compile fewer shapes.
  pad_multiple: int = setting(32, ge=32, check=_multiple_of_32)
  # A batch holds at most this many padded pixels per device: rows per input shape =
  # min(batch_size, max_batch_pixels // (H x W)). 2**22 = 4 x 1024^2 (16 x 512^2).
  max_batch_pixels: int = setting(2**22, ge=2**16)
  # An image whose padded size alone is over max_batch_pixels (dense tasks): 'tile' predicts
  # it in overlapping tile_size^2 tiles whose logits are blended; 'downscale' resizes it to fit.
  large_image: str = setting("tile", choices=("tile", "downscale"))
  tile_size: int = setting(1024, ge=128, check=_multiple_of_32)
  # Tiles overlap by at least this; a quarter of it at each inner tile edge is never used, the
  # middle half is a linear blend (predict.tile_grid).
  tile_overlap: int = setting(128, ge=0, check=_multiple_of_32)

  def __post_init__(self):
    if self.tile_size**2 > self.max_batch_pixels:
      raise UserInputError(
        f"eval.tile_size: a {self.tile_size}^2 tile is over eval.max_batch_pixels="
        f"{self.max_batch_pixels}; use at most {int(self.max_batch_pixels**0.5) // 32 * 32}"
      )
    if 2 * self.tile_overlap > self.tile_size:
      raise UserInputError(
        f"eval.tile_overlap: expected at most half of eval.tile_size={self.tile_size}, "
        f"got {self.tile_overlap}"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
  """The top level. `model` is the model builders' to check (models/); `loss` is checked
  against the loss_schema `validate` is given (each task has its own)."""

  SECTIONS: ClassVar[dict[str, Section]] = {
    "data": Section(DataConfig, required=True),
    "input": Section(InputConfig, required=True),
    "loss": Section(None, required=True),  # Replaced by validate's loss_schema.
    "optim": Section(OptimConfig, required=True),
    "mesh": Section(MeshConfig),
    "train": Section(TrainConfig, required=True),
    "eval": Section(EvalConfig, required=True),
  }
  seed: int
  # A key of tasks.TASKS; None: the task registered with the model (tasks.task_name), so it
  # is not filled in here: a default would override that.
  task: str | None = setting(None, choices=lazy("miml_jax.tasks:TASKS"))
  model: dict
  # A converted weights file (miml-jax convert) the training starts from; None: fresh init.
  model_init: str | None = None


def validate(config, *, loss_schema: type | None = None) -> ml_collections.ConfigDict:
  """Checks every section of an experiment config; returns a normalised copy.

  Run it before anything is traced or written: an unknown key, a missing required key, a
  wrong type, a value out of range or not among the choices is a one-line UserInputError
  naming the full key (e.g. `loss.ohem_thresh: expected a number, got 'high'`). The copy has
  every optional key that was absent filled with its default (so configs saved by older
  versions load), ints where a float is expected as floats, lists where a tuple is expected
  as tuples, and FieldReferences resolved (apply overrides before validating). `model` is
  copied unchecked.

  loss_schema: the dataclass of the `loss` section (the task's); None: the segmentation
  task's, losses.SegmentationLossConfig (imported here: losses imports this module).
  """
  if loss_schema is None:
    from miml_jax import losses

    loss_schema = losses.SegmentationLossConfig
  sections = {**ExperimentConfig.SECTIONS, "loss": Section(loss_schema, required=True)}
  values, _ = _check_section(ExperimentConfig, _plain(config), "", sections)
  return ml_collections.ConfigDict(values)


def _plain(config):
  """A ConfigDict / mapping as nested plain dicts (FieldReferences resolved)."""
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  if isinstance(config, Mapping):
    return {key: _plain(value) for key, value in config.items()}
  if isinstance(config, ml_collections.FieldReference):
    return _plain(config.get())
  return config


def _check_section(schema: type, values, prefix: str, sections=None):
  """(normalised values with defaults, the dataclass instance of the non-section fields)."""
  sections = getattr(schema, "SECTIONS", {}) if sections is None else sections
  if not isinstance(values, Mapping):
    raise UserInputError(f"{prefix or 'config'}: expected a section (dict), got {_show(values)}")
  fields = {f.name: f for f in dataclasses.fields(schema)}
  for key in values:
    if key not in fields and key not in sections:
      known = ", ".join(sorted([*fields, *sections]))
      raise UserInputError(f"{_join(prefix, key)}: unknown key (known: {known})")
  hints = typing.get_type_hints(schema)
  out = {}
  for name, field in fields.items():
    key = _join(prefix, name)
    if name in values:
      out[name] = _check_type(values[name], hints[name], key)
      _check_constraints(out[name], field.metadata, key)
    elif field.default is not dataclasses.MISSING:
      out[name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      out[name] = field.default_factory()
    else:
      raise UserInputError(f"{key}: missing (required)")
  try:
    instance = schema(**out)  # The settings dataclasses' own checks (__post_init__).
  except UserInputError as e:
    raise UserInputError(_full_key(str(e), prefix)) from e
  for name, section in sections.items():
    key = _join(prefix, name)
    if name not in values and section.required:
      raise UserInputError(f"{key}: missing (a required section)")
    out[name], _ = _check_section(section.resolve(), values.get(name, {}), key)
  return out, instance


def _full_key(message: str, prefix: str) -> str:
  # The settings dataclasses name their own keys from their section's last part
  # ('object_jitter.min_side'); inside a config the full key is 'data.object_jitter.min_side'.
  short = prefix.rpartition(".")[2]
  if short != prefix and message.startswith(short + "."):
    return prefix + message[len(short) :]
  return message


def _join(prefix: str, key) -> str:
  return f"{prefix}.{key}" if prefix else str(key)


def _show(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


_TYPE_NAMES = {
  bool: ("a bool", "bools"),
  int: ("an int", "ints"),
  float: ("a number", "numbers"),
  str: ("a string", "strings"),
  dict: ("a section (dict)", "sections (dicts)"),
}


def _type_name(tp, plural: bool = False) -> str:
  if tp in _TYPE_NAMES:
    return _TYPE_NAMES[tp][plural]
  if tp is type(None):
    return "None"
  args = typing.get_args(tp)
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    return " or ".join(_type_name(arg, plural) for arg in args)
  if typing.get_origin(tp) is tuple:
    if len(args) == 2 and args[1] is Ellipsis:
      return "a list of " + _type_name(args[0], plural=True)
    if len(set(args)) == 1:
      return f"a list of {len(args)} {_type_name(args[0], plural=True)}"
    return f"a list of ({', '.join(_type_name(arg) for arg in args)})"
  return "any value" if tp is Any else str(tp)


def _check_type(value, tp, key: str):
  """`value` as type `tp` (an annotation), or a UserInputError naming `key`."""
  if tp is Any:
    return copy.deepcopy(value)
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    for arm in args:
      if arm is not type(None):
        try:
          return _check_type(value, arm, key)
        except UserInputError:
          pass
  elif origin is tuple:
    if isinstance(value, (list, tuple)):
      if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
      if len(value) == len(args):
        return tuple(
          _check_type(v, arg, f"{key}[{i}]") for i, (v, arg) in enumerate(zip(value, args))
        )
  elif tp is bool:
    if isinstance(value, (bool, np.bool_)):
      return bool(value)
  # bool is an int to Python; a True where a count is expected is a mistake, not a 1.
  elif tp is int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
      return int(value)
  elif tp is float:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_)
    ):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  elif tp is dict:
    if isinstance(value, Mapping):
      return copy.deepcopy(dict(value))
  else:
    raise TypeError(f"{key}: annotation {tp!r} is not one validate knows")
  raise UserInputError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _num(x) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


def _check_constraints(value, metadata, key: str):
  if value is None:
    return
  ge, gt, le, lt = (metadata.get(name) for name in ("ge", "gt", "le", "lt"))
  if not (
    (ge is None or value >= ge)
    and (gt is None or value > gt)
    and (le is None or value <= le)
    and (lt is None or value < lt)
  ):
    low = f"[{_num(ge)}" if ge is not None else f"({_num(gt)}" if gt is not None else None
    high = f"{_num(le)}]" if le is not None else f"{_num(lt)})" if lt is not None else None
    if low and high:
      expected = f"a value in {low}, {high}"
    elif low:
      expected = f">= {_num(ge)}" if ge is not None else f"> {_num(gt)}"
    else:
      expected = f"<= {_num(le)}" if le is not None else f"< {_num(lt)}"
    raise UserInputError(f"{key}: expected {expected}, got {value!r}")
  choices = metadata.get("choices")
  if choices is not None:
    choices = choices() if callable(choices) else choices
    if value not in choices:
      raise UserInputError(
        f"{key}: expected one of {', '.join(map(repr, choices))}, got {_show(value)}"
      )
  check = metadata.get("check")
  if check is not None:
    error = check(value)
    if error:
      raise UserInputError(f"{key}: {error}")
