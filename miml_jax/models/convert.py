"""PyTorch / safetensors / npz state_dicts <-> this package's flax variables, and init files.

The key and layout rule lives in naming.py; this module applies it to whole state_dicts:

* `read_state_dict(path)`: a .pth / .pt / .bin (torch.load with weights_only=True; torch is only
  needed for these), .safetensors (safetensors.numpy, no torch) or .npz file -> {key: ndarray};
  a Keras .h5 / .hdf5 / .hd5 file is read by keras_h5.py and renamed by its model's KerasLayout.
  Checkpoints that wrap the weights (`{'state_dict': ...}`, `{'model': ...}`) are unwrapped.
* `state_dict_to_variables(state_dict, target)`: maps every tensor onto the flax tree of `target`
  (an initialised or `jax.eval_shape`-d variables dict). Prefixes are aligned first: DDP's
  'module.' is stripped, and of the candidate prefixes ('backbone.', 'decode_head.', ... stripped
  or added) the alignment that maps the most keys wins, so an mmseg segmentor checkpoint loads
  into a bare backbone and a FAIR backbone checkpoint into a segmentor's `backbone`. Strict by
  default: a source key that maps nowhere, a target leaf nothing maps to, or a shape mismatch is an
  error listing them. `strict=False` converts what matches and reports the rest.
* `save_init_file` / `load_init_file`: a converted model as one msgpack file (the flax variables,
  the model config they belong to, and where they came from). This is an *init* file, not a
  training checkpoint: `miml-jax train --init` starts from it, `eval` / `predict --init` score it.
"""

from collections.abc import Iterable, Mapping
import dataclasses
import json
import os
from typing import Any

from flax import serialization, traverse_util
import jax
import numpy as np

from miml_jax.errors import UserInputError
from miml_jax.models import naming

INIT_FILE_FORMAT = "miml-jax-init/1"
TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
# Prefixes that wrap a model's own keys in the checkpoints users bring (DDP, mmseg segmentors,
# EMA copies and the like); tried stripped and added when aligning keys.
KNOWN_PREFIXES = ("module.", "model.", "backbone.", "decode_head.", "encoder.")
# Top-level keys under which training checkpoints keep their weights.
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "params", "module")


# ---- Reading ----------------------------------------------------------------------------------
def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float/int ndarray} from a .pth/.pt/.bin/.ckpt, .safetensors or .npz file."""
  if not os.path.isfile(path):
    raise UserInputError(f"{path}: no such file")
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext in TORCH_EXTENSIONS:
      obj = _read_torch(path)
    elif ext == ".safetensors":
      from safetensors.numpy import load_file

      obj = load_file(path)
    elif ext in (".h5", ".hdf5", ".hd5"):  # Keras weights, by the model's KerasLayout.
      from miml_jax.models import keras_h5

      obj = keras_h5.keras_state_dict(path)
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as data:
        obj = {k: data[k] for k in data.files}
    else:
      raise UserInputError(
        f"{path}: unknown weight format {ext!r}; expected one of "
        f"{', '.join(TORCH_EXTENSIONS + ('.safetensors', '.npz', '.h5'))}"
      )
  except UserInputError:
    raise
  except Exception as e:  # Corrupt or truncated files surface as many exception types.
    raise UserInputError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
  state_dict = _unwrap(obj, path)
  if not state_dict:
    raise UserInputError(f"{path}: holds no tensors")
  return state_dict


def _read_torch(path: str):
  try:
    import torch
  except ImportError:
    raise UserInputError(
      f"{path}: reading PyTorch files needs torch (pip install torch); "
      "or convert it to .safetensors / .npz first"
    ) from None
  obj = torch.load(path, map_location="cpu", weights_only=True)

  def to_numpy(x):
    if isinstance(x, torch.Tensor):
      x = x.detach()
      # numpy has no bfloat16; float32 holds every bf16 / fp16 value exactly.
      if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
      return x.numpy()
    if isinstance(x, Mapping):
      return {k: to_numpy(v) for k, v in x.items()}
    return x

  return to_numpy(obj)


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
  """The flat {key: array} inside a checkpoint, descending through wrapper keys."""
  while isinstance(obj, Mapping):
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if arrays:
      return {str(k): np.asarray(v) for k, v in arrays.items()}
    inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if not inner:
      break
    obj = obj[inner[0]]
  raise UserInputError(
    f"{path}: no state_dict found (expected a mapping of tensors, possibly "
    f"under one of {list(_WRAPPER_KEYS)})"
  )


# ---- Mapping ----------------------------------------------------------------------------------
@dataclasses.dataclass
class ConversionReport:
  """What a conversion did: counts and the keys that did not take part."""

  converted: int
  prefix: str  # e.g. "strip 'module.', add 'backbone.'" or 'none'.
  unmapped: list[str]  # Source keys with no target leaf.
  missing: list[str]  # Target torch keys no source key provided.
  mismatched: list[str]  # 'key: source shape vs target shape'.
  ignored: int  # Torch-only buffers (num_batches_tracked).

  def summary(self) -> str:
    parts = [f"{self.converted} tensors converted", f"prefix: {self.prefix}"]
    for name in ("unmapped", "missing", "mismatched"):
      items = getattr(self, name)
      if items:
        parts.append(f"{len(items)} {name} ({_preview(items)})")
    return "; ".join(parts)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _preview(items: list[str], count: int = 5) -> str:
  shown = ", ".join(items[:count])
  return shown + (f", ... {len(items) - count} more" if len(items) > count else "")


def _strip_module(key: str) -> str:
  return key[len("module.") :] if key.startswith("module.") else key


def _alignments(source_keys: Iterable[str], target_keys: set) -> list[tuple[str, Any]]:
  """Candidate key rewrites: (description, function), identity first."""
  source_keys = list(source_keys)
  tops = sorted({k.split(".", 1)[0] + "." for k in target_keys})
  out = [("none", lambda k: k)]
  for p in KNOWN_PREFIXES:
    if any(k.startswith(p) for k in source_keys):
      out.append((f"strip {p!r}", lambda k, p=p: k[len(p) :] if k.startswith(p) else k))
  for p in tops:
    if p in KNOWN_PREFIXES:
      out.append((f"add {p!r}", lambda k, p=p: p + k))
  # DDP's 'module.' combined with either of the above.
  if any(k.startswith("module.") for k in source_keys):
    out += [
      (f"strip 'module.', {d}", lambda k, f=f: f(_strip_module(k)))
      for d, f in out[1:]
      if d != "strip 'module.'"
    ]
  return out


def state_dict_to_variables(
  state_dict: Mapping[str, np.ndarray],
  target: Mapping[str, Any],
  *,
  strict: bool = True,
  source: str = "state_dict",
) -> tuple[dict[str, Any], ConversionReport]:
  """Maps a torch-keyed state_dict onto the flax tree `target` (arrays or ShapeDtypeStructs).

  Returns (variables, report): variables holds {'params', 'batch_stats'} with exactly the
  converted leaves, in `target`'s dtypes. With strict=True (default) any unmapped source key,
  missing target leaf or shape mismatch raises a UserInputError naming them and `source`.
  """
  wanted = naming.flax_tree_to_torch_keys(target)
  norm_modules = naming.norm_module_paths(target)
  dtypes = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(_plain(target.get(collection, {})))
    dtypes.update({(collection, p): leaf.dtype for p, leaf in flat.items()})

  def count_hits(rewrite):
    return sum(rewrite(k) in wanted for k in state_dict)

  description, rewrite = max(_alignments(state_dict, set(wanted)), key=lambda a: count_hits(a[1]))
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  unmapped, mismatched, seen, clashed = [], [], set(), set()
  ignored = 0
  for key, value in state_dict.items():
    new_key = rewrite(key)
    if new_key.rsplit(".", 1)[-1] in naming.TORCH_ONLY_LEAVES:
      ignored += 1
      continue
    if new_key not in wanted:
      unmapped.append(key)
      continue
    if new_key in seen or new_key in clashed:
      raise UserInputError(
        f"{source}: two tensors map to {new_key} after aligning prefixes "
        f"({description}); remove one of them"
      )
    collection, path, torch_shape = wanted[new_key]
    # The rule's own mapping must agree with the target tree (norm vs conv `weight`).
    mapped = naming.torch_key_to_flax_path(new_key, norm_modules)
    if mapped != (collection, path):
      raise ValueError(f"naming rule is inconsistent for {new_key}: {mapped} vs {path}")
    value = np.asarray(value)
    if tuple(value.shape) != tuple(torch_shape):
      mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(torch_shape)}")
      clashed.add(new_key)
      continue
    leaf = naming.from_torch_layout(path, value).astype(dtypes[(collection, path)])
    out[collection][path] = leaf
    seen.add(new_key)
  missing = sorted(k for k in wanted if k not in seen and k not in clashed)
  report = ConversionReport(
    converted=len(seen),
    prefix=description,
    unmapped=sorted(unmapped),
    missing=missing,
    mismatched=mismatched,
    ignored=ignored,
  )
  if strict and (report.unmapped or report.missing or report.mismatched):
    raise UserInputError(
      f"{source}: does not match the model exactly: {report.summary()}. "
      "Pass --partial (strict=False) to convert only what matches"
    )
  if not seen:
    raise UserInputError(f"{source}: no tensor matches the model ({report.summary()})")
  variables = {c: traverse_util.unflatten_dict(v) for c, v in out.items()}
  return variables, report


def merge_variables(
  base: Mapping[str, Any], loaded: Mapping[str, Any], source: str = "init weights"
) -> tuple[dict[str, Any], list[str]]:
  """(`base` with every leaf of `loaded` put in, the base leaves `loaded` lacks).

  `base` holds arrays or ShapeDtypeStructs; every leaf of `loaded` must exist in it with the
  same shape, and takes its dtype.
  """
  out, missing = {}, []
  for collection, tree in base.items():
    flat = dict(traverse_util.flatten_dict(_plain(tree)))
    new = traverse_util.flatten_dict(_plain(loaded.get(collection, {})))
    for path, leaf in new.items():
      name = f"{collection}/{'/'.join(path)}"
      if path not in flat:
        raise UserInputError(f"{source}: {name} does not exist in the model")
      if tuple(flat[path].shape) != tuple(np.shape(leaf)):
        raise UserInputError(
          f"{source}: {name} has shape {tuple(np.shape(leaf))}, the model {tuple(flat[path].shape)}"
        )
      flat[path] = np.asarray(leaf).astype(flat[path].dtype)
    missing += [f"{collection}/{'/'.join(p)}" for p in flat if p not in new]
    out[collection] = traverse_util.unflatten_dict(flat)
  extra = sorted(set(loaded) - set(base))
  if extra:
    raise UserInputError(f"{source}: collections {extra} do not exist in the model")
  return out, missing


# ---- Init files -------------------------------------------------------------------------------
def save_init_file(
  path: str,
  variables: Mapping[str, Any],
  model_config: Mapping[str, Any],
  source: str = "",
  report: ConversionReport | None = None,
) -> None:
  """Writes variables + the model config (+ provenance) as one msgpack file."""
  metadata = {
    "format": INIT_FILE_FORMAT,
    "model": _plain_config(model_config),
    "source": source,
    "report": report.to_dict() if report else None,
  }
  payload = {
    "metadata": json.dumps(metadata),
    "variables": jax.tree_util.tree_map(np.asarray, _plain(dict(variables))),
  }
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(payload))
  os.replace(tmp, path)


def load_init_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, metadata) of a file written by `save_init_file` (or `miml-jax convert`)."""
  if not os.path.isfile(path):
    raise UserInputError(f"{path}: no such init file")
  try:
    with open(path, "rb") as f:
      payload = serialization.msgpack_restore(f.read())
    metadata = json.loads(payload["metadata"])
    variables = payload["variables"]
  except Exception:  # Not msgpack, or msgpack of something else.
    raise UserInputError(
      f"{path}: not a miml-jax init file (write one with `miml-jax convert`)"
    ) from None
  if metadata.get("format") != INIT_FILE_FORMAT:
    raise UserInputError(f"{path}: unsupported init file format {metadata.get('format')!r}")
  return dict(variables), metadata


def check_same_model(
  path: str, metadata: Mapping[str, Any], model_config: Mapping[str, Any]
) -> None:
  """Raises unless the init file was made for this model architecture (name and shapes)."""
  theirs, ours = metadata.get("model", {}), _plain_config(model_config)
  if theirs.get("name") != ours.get("name"):
    raise UserInputError(
      f"{path}: weights of model {theirs.get('name')!r}, but the config builds {ours.get('name')!r}"
    )


def _plain_config(c: Any) -> dict[str, Any]:
  if hasattr(c, "to_dict"):
    c = c.to_dict()
  return json.loads(json.dumps(dict(c), default=list))


def _plain(tree: Any) -> Any:
  return tree.unfreeze() if hasattr(tree, "unfreeze") else tree
