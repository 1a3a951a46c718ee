"""The inverse of miml_jax.models.convert, which the tests use to make official-style PyTorch
state_dicts from flax variables: torch key names (naming.py's rule), torch layouts and torch's
`num_batches_tracked` buffers. The library itself only converts the other way."""

from flax import traverse_util
import numpy as np

from miml_jax.models import naming


def to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """A flax leaf array in torch layout (the inverse of `naming.from_torch_layout`)."""
  if path[-1] == "kernel" and x.ndim == 4:
    return np.transpose(x, (3, 2, 0, 1))
  if path[-1] == "kernel" and x.ndim == 2:
    return np.transpose(x)
  return x


def variables_to_state_dict(variables, *, num_batches_tracked: bool = True) -> dict:
  """The torch state_dict of `variables` (official key names and layouts).

  With num_batches_tracked, every BatchNorm (a module with running stats) also gets torch's
  int64 `num_batches_tracked` buffer (0), so the key set equals a torch model's.
  """
  out = {}
  for key, (collection, path, _) in naming.flax_tree_to_torch_keys(variables).items():
    tree = variables[collection]
    tree = tree.unfreeze() if hasattr(tree, "unfreeze") else tree
    leaf = traverse_util.flatten_dict(tree)[path]
    out[key] = np.ascontiguousarray(to_torch_layout(path, np.asarray(leaf)))
    if num_batches_tracked and collection == "batch_stats" and path[-1] == "mean":
      out[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.zeros((), np.int64)
  return out
