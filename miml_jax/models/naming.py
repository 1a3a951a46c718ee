"""The one rule that maps PyTorch state_dict keys onto this package's flax variable paths.

Rule (every model in `miml_jax/models/` is written to obey it, so a weight converter is a loop):

* Each torch module path component becomes a flax submodule name, except that purely numeric
  components (nn.Sequential / nn.ModuleList indices) are joined to the previous name with '_':
  `backbone.stages.2.11.dwconv.weight` -> `backbone/stages_2_11/dwconv/kernel`,
  `decode_head.psp_modules.0.1.conv.weight` -> `decode_head/psp_modules_0_1/conv/kernel`.
* Leaves: `weight` of a conv / linear -> `kernel`; `weight` of a norm (LayerNorm, BatchNorm) ->
  `scale`; `bias` -> `bias`; other parameters keep their name (ConvNeXt's `gamma`). All of these
  live in the `params` collection. BatchNorm `running_mean` / `running_var` -> `mean` / `var` in
  the `batch_stats` collection; torch's `num_batches_tracked` has no flax counterpart.
* Layouts: conv weight (O, I/groups, kh, kw) <-> kernel (kh, kw, I/groups, O); linear weight
  (out, in) <-> kernel (in, out); 1-D tensors are unchanged.

`weight` is ambiguous between `kernel` and `scale`; which one depends on whether the owning module
is a norm. `torch_key_to_flax_path` takes the set of norm-module paths (derive it from an
initialised flax tree with `norm_module_paths`: exactly the modules with a `scale` param) and
otherwise falls back on the module-name heuristic `is_norm_module`, which covers the models here.
The inverse direction is unambiguous. The inverse also assumes torch attribute names never end in
'_<digits>', except the few listed in `TORCH_NAMES_WITH_DIGIT_SUFFIX` (VAN's `proj_1` / `proj_2`),
which are kept whole; no model here has a module named like their prefix (`proj`) with such an
index. Leaf names (VAN's `layer_scale_1`) are never split. The tests' round trips check this.
"""

from collections.abc import Collection, Mapping
import re
from typing import Any

from flax import traverse_util
import numpy as np

FlaxPath = tuple[str, ...]

# flax leaf name -> torch leaf name, per collection.
_PARAM_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight"}
_STATS_LEAF_TO_TORCH = {"mean": "running_mean", "var": "running_var"}
_TORCH_STATS_TO_LEAF = {v: k for k, v in _STATS_LEAF_TO_TORCH.items()}

# Torch keys without a flax counterpart.
TORCH_ONLY_LEAVES = ("num_batches_tracked",)

_NORM_NAME = re.compile(r"^(bn|ln|gn|norm\d*|.*_norm)$")
# ConvNeXt's LayerNorms inside nn.Sequential: the stem's index 1, the downsamplers' index 0.
_CONVNEXT_SEQ_NORM = re.compile(r"^downsample_layers_(0_1|[1-9]\d*_0)$")
_NUMERIC_SUFFIX = re.compile(r"^(.*?)((?:_\d+)+)$")
_INDEX_GROUPS = re.compile(r"^\d+(?:_\d+)*$")

# Torch module attribute names that themselves end in '_<digits>' (VAN's SpatialAttention
# `proj_1` / `proj_2`). The inverse mapping keeps them whole; index groups after them still split
# (`proj_1_0` -> `proj_1.0`). Parameter leaves (`layer_scale_1`) never need listing.
TORCH_NAMES_WITH_DIGIT_SUFFIX = ("proj_1", "proj_2")


def is_norm_module(module_path: FlaxPath) -> bool:
  """Name heuristic: is the flax module at `module_path` a LayerNorm / BatchNorm?"""
  if not module_path:
    return False
  name = module_path[-1]
  return bool(_NORM_NAME.match(name) or _CONVNEXT_SEQ_NORM.match(name))


def torch_module_path_to_flax(parts: tuple[str, ...]) -> FlaxPath:
  """Joins numeric torch path components onto the previous one with '_'."""
  out = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out)


def flax_module_path_to_torch(path: FlaxPath) -> tuple[str, ...]:
  """Splits trailing '_<digits>' groups of each flax name back into torch index components."""
  out = []
  for name in path:
    known = _known_digit_suffix_name(name)
    if known is not None:
      out.append(known)
      rest = name[len(known) + 1 :]
      if rest:
        out.extend(rest.split("_"))
      continue
    m = _NUMERIC_SUFFIX.match(name)
    if m and m.group(1):
      out.append(m.group(1))
      out.extend(m.group(2).lstrip("_").split("_"))
    else:
      out.append(name)
  return tuple(out)


def _known_digit_suffix_name(name: str) -> str | None:
  """The listed torch name `name` starts with (followed by nothing or by index groups), or None."""
  for known in sorted(TORCH_NAMES_WITH_DIGIT_SUFFIX, key=len, reverse=True):
    if name == known or (
      name.startswith(known + "_") and _INDEX_GROUPS.match(name[len(known) + 1 :])
    ):
      return known
  return None


def torch_key_to_flax_path(
  key: str, norm_modules: Collection[FlaxPath] | None = None
) -> tuple[str, FlaxPath] | None:
  """torch state_dict key -> (collection, flax path), or None for torch-only buffers.

  Args:
    key: e.g. 'decode_head.lateral_convs.0.conv.weight'.
    norm_modules: flax module paths of the norm layers (from `norm_module_paths(variables)`);
      when None, `is_norm_module` decides from the module name.

  Returns:
    ('params', ('decode_head', 'lateral_convs_0', 'conv', 'kernel')) for the example, or None
    for `num_batches_tracked`.
  """
  parts = key.split(".")
  leaf = parts[-1]
  module = torch_module_path_to_flax(tuple(parts[:-1]))
  if leaf in TORCH_ONLY_LEAVES:
    return None
  if leaf in _TORCH_STATS_TO_LEAF:
    return "batch_stats", module + (_TORCH_STATS_TO_LEAF[leaf],)
  if leaf == "weight":
    norm = (module in norm_modules) if norm_modules is not None else is_norm_module(module)
    return "params", module + ("scale" if norm else "kernel",)
  return "params", module + (leaf,)


def flax_path_to_torch_key(collection: str, path: FlaxPath) -> str:
  """(collection, flax path) -> torch state_dict key (the exact inverse of the above)."""
  leaf = path[-1]
  if collection == "params":
    leaf = _PARAM_LEAF_TO_TORCH.get(leaf, leaf)
  elif collection == "batch_stats":
    if leaf not in _STATS_LEAF_TO_TORCH:
      raise ValueError(f"unknown batch_stats leaf {'/'.join(path)}")
    leaf = _STATS_LEAF_TO_TORCH[leaf]
  else:
    raise ValueError(f"collection {collection!r} has no torch counterpart")
  return ".".join(flax_module_path_to_torch(tuple(path[:-1])) + (leaf,))


def norm_module_paths(variables: Mapping[str, Any]) -> frozenset:
  """Flax paths of the norm modules of an initialised tree: those holding a `scale` param."""
  flat = traverse_util.flatten_dict(_unfreeze(variables.get("params", {})))
  return frozenset(p[:-1] for p in flat if p[-1] == "scale")


def torch_shape(path: FlaxPath, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the torch tensor for a flax leaf of `shape`."""
  if path[-1] == "kernel":
    if len(shape) == 4:  # (kh, kw, i, o) -> (o, i, kh, kw)
      return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:  # (in, out) -> (out, in)
      return (shape[1], shape[0])
  return tuple(shape)


def from_torch_layout(path: FlaxPath, x: np.ndarray) -> np.ndarray:
  """A torch tensor (as numpy) in the layout of the flax leaf at `path`."""
  if path[-1] == "kernel" and x.ndim == 4:
    return np.transpose(x, (2, 3, 1, 0))
  if path[-1] == "kernel" and x.ndim == 2:
    return np.transpose(x)
  return x


def flax_tree_to_torch_keys(
  variables: Mapping[str, Any],
) -> dict[str, tuple[str, FlaxPath, tuple[int, ...]]]:
  """Every params / batch_stats leaf of `variables` by its torch key.

  Works on arrays or on `jax.eval_shape` results. Returns
  {torch_key: (collection, flax_path, torch_shape)}; torch-only buffers
  (`num_batches_tracked`) are not listed.
  """
  out = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(_unfreeze(variables.get(collection, {})))
    for path, leaf in flat.items():
      key = flax_path_to_torch_key(collection, path)
      if key in out:
        raise ValueError(f"two flax leaves map to torch key {key}")
      out[key] = (collection, path, torch_shape(path, tuple(leaf.shape)))
  return out


def _unfreeze(tree: Any) -> Any:
  return tree.unfreeze() if hasattr(tree, "unfreeze") else tree
