"""Keras HDF5 weight files (Keras 2 / tf.keras `.h5`), read with h5py alone (no TensorFlow).

`read_keras_weights(path)` -> {'layer/weight:0': ndarray}, keyed by each weight's name exactly as
the file stores it (the entries of every layer group's `weight_names` attribute, e.g.
'b1c2/kernel:0'). Both layouts Keras writes are read:

* a full model (`model.save`): the weights live under the `model_weights` group;
* weights only (`model.save_weights`): the layer groups sit at the root.

Either way the weights group names its layers in the `layer_names` attribute, and each layer
group lists its weights in `weight_names`, which are paths inside that group (h5py creates a
subgroup per '/'). A nested model (a `Model` used as a layer, e.g. ManTraNet's `Featex`) is one
layer group whose `weight_names` are its inner layers' weights ('b1c1/regular_kernel:0'), so it
needs no special case. A weight name without a '/' (no layer part) is keyed 'layer/name'. Two
weights with one name, a file that is not HDF5, or a group without those attributes is a
one-line UserInputError naming the file.

Keras conv kernels are HWIO and dense kernels (in, out): the flax layouts. A model whose
official weights are Keras registers a `KerasLayout` (`register_layout`): its map from Keras
weight names to flax paths. `keras_state_dict(path)` reads a file, picks the registered layout
that names the most of its weights, and returns a torch-keyed state_dict (naming.py's rule,
torch layouts) that `convert.state_dict_to_variables` maps onto the model as it does any other
file, strictly: a weight the layout does not name, or a named weight the file lacks, is an
error naming the file and the weight. Layer names match exactly, except that a trailing '_<n>'
on a layer name (Keras uniquifies names when a model is built twice in one session, and its
own `load_weights` matches by order, not name) is dropped when the bare name is the layout's
and the suffixed one is not.
"""

from collections.abc import Callable, Mapping
import dataclasses
import os
import re

import numpy as np

from miml_jax.errors import UserInputError
from miml_jax.models import naming

KERAS_EXTENSIONS = (".h5", ".hdf5", ".hd5")
_COPY_SUFFIX = re.compile(r"^(.*)_\d+$")


def read_keras_weights(path: str) -> dict[str, np.ndarray]:
  """{weight name as stored (e.g. 'b1c1/kernel:0'): ndarray} of a Keras HDF5 weights file."""
  try:
    import h5py
  except ImportError:  # A declared dependency; only a broken install lacks it.
    raise UserInputError(f"{path}: reading Keras .h5 files needs h5py (pip install h5py)") from None
  if not os.path.isfile(path):
    raise UserInputError(f"{path}: no such file")
  try:
    handle = h5py.File(path, "r")
  except OSError as e:
    raise UserInputError(f"{path}: not a readable HDF5 file ({e})") from None
  with handle:
    group = handle
    if "layer_names" not in group.attrs and "model_weights" in group:
      group = group["model_weights"]
    if "layer_names" not in group.attrs:
      raise UserInputError(
        f"{path}: not a Keras HDF5 weights file (no 'layer_names' attribute at the root or "
        "in 'model_weights'); Keras 3 '.weights.h5' and SavedModel folders are not read"
      )
    weights: dict[str, np.ndarray] = {}
    for layer in _strings(group.attrs["layer_names"]):
      if layer not in group:
        raise UserInputError(f"{path}: layer {layer!r} is listed but has no group")
      layer_group = group[layer]
      if "weight_names" not in layer_group.attrs:
        raise UserInputError(f"{path}: layer {layer!r} has no 'weight_names' attribute")
      for name in _strings(layer_group.attrs["weight_names"]):
        if name not in layer_group:
          raise UserInputError(f"{path}: weight {layer}/{name} is listed but not stored")
        key = name if "/" in name else f"{layer}/{name}"
        if key in weights:
          raise UserInputError(f"{path}: two weights are named {key}")
        weights[key] = np.asarray(layer_group[name][()])
  if not weights:
    raise UserInputError(f"{path}: holds no weights")
  return weights


def _strings(values) -> list[str]:
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in np.atleast_1d(values)]


# ---- Per-model layouts -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KerasLayout:
  """How one model's Keras weights map onto its flax variables.

  names: Keras weight name without the ':0' suffix ('b1c1/regular_kernel') -> flax path
  '<collection>/<module>/.../<leaf>' ('params/Featex/b1c1/regular_kernel'). The array is
  taken as is (Keras layouts are the flax ones); `transforms` may name a function for a key
  whose layout differs (e.g. gates stored in another order).
  """

  model: str
  names: Mapping[str, str]
  transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]] = dataclasses.field(
    default_factory=dict
  )


LAYOUTS: dict[str, KerasLayout] = {}


def register_layout(layout: KerasLayout) -> None:
  """Makes `keras_state_dict` know a model's Keras names (called by the model's module)."""
  LAYOUTS[layout.model] = layout


def _bare(key: str) -> str:
  return key[: -len(":0")] if key.endswith(":0") else key


def _match(key: str, names: Mapping[str, str]) -> str | None:
  """The layout's name for a file's weight name, or None."""
  bare = _bare(key)
  if bare in names:
    return bare
  layer, _, rest = bare.partition("/")
  m = _COPY_SUFFIX.match(layer)
  if m and f"{m.group(1)}/{rest}" in names:
    return f"{m.group(1)}/{rest}"
  return None


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """The inverse of naming.from_torch_layout: a flax-layout array as the torch key holds it."""
  if path[-1] == "kernel" and x.ndim == 4:
    return np.transpose(x, (3, 2, 0, 1))
  if path[-1] == "kernel" and x.ndim == 2:
    return np.transpose(x)
  return x


def to_state_dict(
  weights: Mapping[str, np.ndarray], layout: KerasLayout, source: str
) -> dict[str, np.ndarray]:
  """Keras-named weights -> {torch key: torch-layout array} of the model's flax tree; strict."""
  out, seen, unknown = {}, {}, []
  for key, value in weights.items():
    name = _match(key, layout.names)
    if name is None:
      unknown.append(key)
      continue
    if name in seen:
      raise UserInputError(f"{source}: {seen[name]} and {key} both map to {name}")
    seen[name] = key
    collection, *path = layout.names[name].split("/")
    value = layout.transforms.get(name, lambda x: x)(np.asarray(value))
    torch_key = naming.flax_path_to_torch_key(collection, tuple(path))
    out[torch_key] = _to_torch_layout(tuple(path), value)
  missing = sorted(set(layout.names) - set(seen))
  if unknown or missing:
    parts = []
    if unknown:
      parts.append(f"{len(unknown)} weight(s) {layout.model} has no layer for ({_few(unknown)})")
    if missing:
      parts.append(f"{len(missing)} of its weights missing ({_few(missing)})")
    raise UserInputError(f"{source}: not {layout.model}'s Keras weights: {'; '.join(parts)}")
  return out


def _few(items: list[str], count: int = 4) -> str:
  shown = ", ".join(items[:count])
  return shown + (f", ... {len(items) - count} more" if len(items) > count else "")


def keras_state_dict(path: str) -> dict[str, np.ndarray]:
  """A Keras .h5 file as a torch-keyed state_dict, through the layout that fits it best."""
  weights = read_keras_weights(path)
  if not LAYOUTS:
    raise UserInputError(f"{path}: no model here reads Keras weights")
  hits = {
    name: sum(_match(k, layout.names) is not None for k in weights)
    for name, layout in LAYOUTS.items()
  }
  best = max(hits, key=hits.get)
  if hits[best] == 0:
    raise UserInputError(
      f"{path}: its Keras weights ({_few(sorted(weights))}) are none of the known models' "
      f"({', '.join(sorted(LAYOUTS))})"
    )
  return to_state_dict(weights, LAYOUTS[best], path)
