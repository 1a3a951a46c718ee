"""The CAAA pair classifier's architecture: a ConvNeXt over the channel-stacked pair and a
linear head of 8 outputs.

The input is (authentic, forged) each resized to one size on its own, normalised and stacked on
channels (6 channels, authentic first). The released classifier is a ConvNeXt with XL widths
(dims 256/512/1024/2048, depths 3/3/27/3, drop path 0.8); its head is LayerNorm -> dropout ->
global average pool -> Linear(dims[-1] -> 8). The released convxl.pth names them differently
from this tree (`norm` is our backbone's output norm `backbone.norm3`, `fc.3` our `head`, the
stages have no `backbone.` prefix): `official_key` maps its keys, and `miml-jax convert` applies
it. The 8 outputs read [0:2] same source (two-class logits), [2:4] aligned / not cropped (two-
class logits), [4:8] the crop box (x0, y0, x1, y1) in the larger image's normalised coordinates;
tasks/pair_classification.py says what they mean.

Config (`model` section):

    name = 'pair_classifier'
    dtype = 'float32' | 'bfloat16'
    backbone = dict(preset='xlarge' | ... | None, dims=None, depths=None, in_chans=6,
                    drop_path_rate=0.8)
    head = dict(dropout=0.3, num_outputs=8)
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import convnext
from miml_jax.models.common import as_dict, resolve_dtype


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
  dropout: float = 0.3
  num_outputs: int = 8


class PairClassifier(nn.Module):
  dims: tuple[int, ...] = convnext.CONVNEXT_PRESETS["xlarge"][0]
  depths: tuple[int, ...] = convnext.CONVNEXT_PRESETS["xlarge"][1]
  in_chans: int = 6
  drop_path_rate: float = 0.8
  head: ClassifierHead = ClassifierHead()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, model_config) -> "PairClassifier":
    from miml_jax import config as config_lib

    cfg = as_dict(model_config)
    known = {"name", "dtype", "backbone", "head"}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise UserInputError(
        f"model: unknown key(s) {unknown} for pair_classifier; known: {sorted(known)}"
      )
    bb = as_dict(cfg.get("backbone"))
    known_bb = {"name", "preset", "dims", "depths", "in_chans", "drop_path_rate"}
    unknown = sorted(set(bb) - known_bb)
    if unknown or bb.get("name", "convnext") != "convnext":
      raise UserInputError(
        f"model.backbone: a ConvNeXt with keys {sorted(known_bb)}; got {sorted(bb)}"
      )
    preset = bb.get("preset")
    dims, depths = bb.get("dims"), bb.get("depths")
    dims, depths = convnext.convnext_dims_depths(
      preset if preset or dims or depths else "xlarge", dims, depths
    )
    return cls(
      dims=tuple(dims),
      depths=tuple(depths),
      in_chans=int(bb.get("in_chans", 6)),
      drop_path_rate=float(bb.get("drop_path_rate", 0.8)),
      head=config_lib.settings_from_config(ClassifierHead, as_dict(cfg.get("head")), "model.head"),
      dtype=resolve_dtype(cfg.get("dtype", "float32")),
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict:
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise UserInputError(
        f"pair_classifier: expected (B, H, W, {self.in_chans}) inputs, got {tuple(x.shape)}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    (feats,) = convnext.ConvNeXt(
      dims=self.dims,
      depths=self.depths,
      in_chans=self.in_chans,
      drop_path_rate=self.drop_path_rate,
      out_indices=(3,),
      name="backbone",
      **kw,
    )(x, train)
    # The backbone's output LayerNorm (norm3) is the official model's `norm`; then its
    # fc = (Dropout, global average pool, Flatten, Linear).
    feats = nn.Dropout(self.head.dropout, deterministic=not train)(feats)
    pooled = jnp.mean(feats.astype(jnp.float32), axis=(1, 2))
    out = nn.Dense(self.head.num_outputs, name="head", **kw)(pooled)
    return {"logits": out.astype(jnp.float32)}


def official_key(key: str) -> str:
  """A key of the released convxl.pth (classify_convxl.py's ConvNeXt, DataParallel's 'module.'
  included) -> the torch-style key of this module's tree; other keys pass unchanged."""
  key = key.removeprefix("module.")
  if key.startswith(("downsample_layers.", "stages.")):
    return "backbone." + key
  if key.startswith("norm."):
    return "backbone.norm3." + key.removeprefix("norm.")
  if key.startswith("fc.3."):
    return "head." + key.removeprefix("fc.3.")
  return key
