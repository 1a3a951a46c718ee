"""An mmseg-style encoder-decoder: a ConvNeXt or VAN backbone, the UPerHead decoder and an
optional FCN auxiliary head, with any number of input channels.

This is the segmentor the constrained (pair) tasks build on: with 9 input channels (authentic,
forged, their difference) it is the ConvNeXt-B UPerNet of the official DASS training script, or,
with a VAN backbone, the backbone of the released DASS (whose UPerLab decoder comes with the
CAAA models). Parameter names follow mmseg's EncoderDecoder state_dict (`backbone.*`,
`decode_head.*`, `auxiliary_head.*`), so UPerNet checkpoints convert with `miml-jax convert`.

Config (`model` section):

    name = 'upernet'
    dtype = 'float32' | 'bfloat16'
    backbone = dict(name='convnext' | 'van', preset=None | 'tiny' | 'base' | 'b0' ... 'b6',
                    dims / embed_dims=None, depths=None, mlp_ratios=None (VAN), in_chans=3,
                    drop_path_rate=0.0)
    head = dict(channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1, num_classes=2)
    aux = dict(channels=256, num_convs=1, in_index=2, dropout=0.1) or None (no auxiliary head)

`__call__(x, train)` -> {'logits': (B, H/4, W/4, num_classes), 'aux': [FCN logits at stride
16] or [], 'image_logits': None}.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import convnext, fcn, upernet, van
from miml_jax.models.common import as_dict, resolve_dtype


@dataclasses.dataclass(frozen=True)
class SegmentorBackbone:
  name: str = "convnext"
  dims: tuple[int, ...] = convnext.CONVNEXT_PRESETS["tiny"][0]
  depths: tuple[int, ...] = convnext.CONVNEXT_PRESETS["tiny"][1]
  mlp_ratios: tuple[float, ...] = (8, 8, 4, 4)  # VAN only
  in_chans: int = 3
  drop_path_rate: float = 0.0

  @classmethod
  def from_dict(cls, d) -> "SegmentorBackbone":
    d = dict(d or {})
    known = {
      "name",
      "preset",
      "dims",
      "embed_dims",
      "depths",
      "mlp_ratios",
      "in_chans",
      "drop_path_rate",
    }
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserInputError(f"model.backbone: unknown key(s) {unknown}; known: {sorted(known)}")
    name = d.pop("name", "convnext")
    preset = d.pop("preset", None)
    dims = d.pop("dims", None) or d.pop("embed_dims", None)
    d.pop("embed_dims", None)
    depths = d.pop("depths", None)
    if name == "convnext":
      if d.pop("mlp_ratios", None) is not None:
        raise UserInputError("model.backbone.mlp_ratios: only for name='van'")
      dims, depths = convnext.convnext_dims_depths(
        preset or (None if dims else "tiny"), dims, depths
      )
      return cls(name=name, dims=tuple(dims), depths=tuple(depths), **d)
    if name == "van":
      p_dims, p_depths, p_ratios = van.van_preset(preset or "b0")
      ratios = d.pop("mlp_ratios", None) or p_ratios
      return cls(
        name=name,
        dims=tuple(dims or p_dims),
        depths=tuple(depths or p_depths),
        mlp_ratios=tuple(ratios),
        **d,
      )
    raise UserInputError(f"model.backbone.name: {name!r} is not 'convnext' or 'van'")


@dataclasses.dataclass(frozen=True)
class SegmentorHead:
  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout: float = 0.1
  num_classes: int = 2


@dataclasses.dataclass(frozen=True)
class SegmentorAux:
  channels: int = 256
  num_convs: int = 1
  in_index: int = 2
  dropout: float = 0.1


class Segmentor(nn.Module):
  """Backbone + UPerHead (+ FCN auxiliary head); see the module docstring."""

  backbone: SegmentorBackbone = SegmentorBackbone()
  head: SegmentorHead = SegmentorHead()
  aux: SegmentorAux | None = SegmentorAux()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, model_config) -> "Segmentor":
    cfg = as_dict(model_config)
    known = {"name", "dtype", "backbone", "head", "aux"}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise UserInputError(f"model: unknown key(s) {unknown} for upernet; known: {sorted(known)}")
    aux = cfg.get("aux", {})
    return cls(
      backbone=SegmentorBackbone.from_dict(as_dict(cfg.get("backbone"))),
      head=_settings(SegmentorHead, cfg.get("head"), "model.head"),
      aux=None if aux is None else _settings(SegmentorAux, aux, "model.aux"),
      dtype=resolve_dtype(cfg.get("dtype", "float32")),
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict:
    bb = self.backbone
    if x.ndim != 4 or x.shape[-1] != bb.in_chans:
      raise UserInputError(
        f"upernet: expected (B, H, W, {bb.in_chans}) inputs "
        f"(model.backbone.in_chans), got {tuple(x.shape)}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if bb.name == "convnext":
      feats = convnext.ConvNeXt(
        dims=bb.dims,
        depths=bb.depths,
        in_chans=bb.in_chans,
        drop_path_rate=bb.drop_path_rate,
        name="backbone",
        **kw,
      )(x, train)
    else:
      feats = van.VAN(
        embed_dims=bb.dims,
        depths=bb.depths,
        mlp_ratios=bb.mlp_ratios,
        in_chans=bb.in_chans,
        drop_path_rate=bb.drop_path_rate,
        name="backbone",
        **kw,
      )(x, train)
    head = self.head
    logits = upernet.UPerHead(
      channels=head.channels,
      pool_scales=head.pool_scales,
      num_classes=head.num_classes,
      dropout=head.dropout,
      name="decode_head",
      **kw,
    )(feats, train)
    aux = []
    if self.aux is not None:
      aux.append(
        fcn.FCNHead(
          channels=self.aux.channels,
          num_convs=self.aux.num_convs,
          concat_input=False,
          num_classes=head.num_classes,
          dropout=self.aux.dropout,
          in_index=self.aux.in_index,
          name="auxiliary_head",
          **kw,
        )(feats, train).astype(jnp.float32)
      )
    return {"logits": logits, "aux": aux, "image_logits": None}


def _settings(cls, values, prefix):
  from miml_jax import config as config_lib

  return config_lib.settings_from_config(cls, as_dict(values), prefix)
