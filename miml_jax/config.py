"""Experiment configs: Python files in `experiments/` whose `get_config(arg)` returns a ConfigDict.

`--config experiments/quickstart.py[:arg]` loads the file (the part after ':' is passed to
`get_config`, as in big_vision), and `--config.a.b=v` overrides a field. Overrides are parsed to
the type of the existing field; a key that does not exist is an error that names it (typos must
not silently train something else).
"""

import ast
import dataclasses
import importlib.util
import json
import os

import ml_collections

from miml_jax.errors import UserInputError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserInputError(f"{path}: config file not found")
  module_spec = importlib.util.spec_from_file_location(
      "miml_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # A broken config file is the user's, report it as such.
    raise UserInputError(f"{path}: cannot load config: {type(e).__name__}: {e}") from e
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
        raise UserInputError(
            f"--config.{key}: no config key '{'.'.join(parts[:depth + 1])}'")
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
  ConfigDict. An unknown key is an error naming it, since a typo would silently do nothing;
  lists (ConfigDicts hold tuples as lists) become tuples."""
  fields = {f.name for f in dataclasses.fields(cls)}
  values = dict(config)
  for key in values:
    if key not in fields:
      raise UserInputError(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(fields))})")
  return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})
