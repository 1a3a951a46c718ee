"""SACM, CAAA's annotator of SDG pairs (an object of the authentic image pasted into another
photo): the official `SAFM_model` of `models for CIML/safm_convb.py` (released as SAFM.pth),
in NHWC, with a configurable backbone size.

Forward (x1 = authentic, x2 = forged, both S x S; the official S is 512):

1. A siamese ConvNeXt + UPerNet (`models`, the official ConvBUPer; one set of weights for both
   images) gives four FPN maps per image, every one resized to stride 8 (the UPerHead of the
   CIML code returns the FPN outputs instead of fusing them): F_0 .. F_3, `channels` wide.
2. Correlations (models/correlation.py): Corr(a, b) = all-pairs dot products / C over cyclic
   shifts, pooled to 16 channels by `poolopt_on_corrmat` (max, mean, learned 1x1 conv over the
   (S/8)^2 shifts). For the official 16 (level l of x1, level m of x2) pairs, in its order
   (PAIRS), image 1 gets [Corr(x1_l, x2_m), Corr(x1_l, x1_l)] and image 2
   [Corr(x2_m, x1_l), Corr(x2_m, x2_m)]: 16 x 32 = 512 channels each.
3. Per image (shared weights): aux logits `seg_out` (1x1, corr -> 2); features
   concat(F_0, F_1, F_2, corr) + softmax(aux)[1] broadcast over channels; the DeepLabV3+ head
   `deeplab` (separable ASPP with dilations 1/12/24/36 on the features, low level F_0), whose
   classifier `conv_seg` is the official Sequential: x2 bilinear (align_corners=True, as
   nn.UpsamplingBilinear2d) -> 3x3 conv 128 -> BN -> ReLU -> x2 -> 3x3 conv 32 -> BN -> ReLU ->
   x2 -> 1x1 conv 2, i.e. logits at the input size; the aux logits are upsampled x8 (bilinear,
   align_corners=False).

`__call__(authentic, forged, train)` -> {'authentic_logits', 'forged_logits': (B, S, S, 2),
'authentic_aux', 'forged_aux': (B, S, S, 2)} (the SDG task's model contract,
tasks/sdg_segmentation.py).

Parameters map 1:1 onto SAFM.pth (after DataParallel's 'module.' is stripped):
`models.backbone.*` (ConvNeXt), `models.decode_head.{lateral_convs,fpn_convs,psp_modules,
bottleneck}.*`, `poolopt_on_corrmat.fc.*`, `seg_out.*`, `deeplab.{image_pool.1,aspp_modules,
bottleneck,c1_bottleneck,sep_bottleneck}.*` and `deeplab.conv_seg.{1,2,5,6,9}.*`. The official
model also holds modules its forward never calls: the UPerHead's classifier
`models.decode_head.conv_seg` and ConvBUPer's FCN `models.auxiliary_head`. They are created
here at initialisation only, so that the tree (and `miml-jax convert SAFM.pth`, strict) match
the file; they get no gradient.

Resolution: the learned pooling conv reads the shift axis as channels, so a model is built for
one input size (`image_size`; the official weights need 512). The backbone's stride-8 map must
be image_size / 8, so image_size is a multiple of 32.

Config (`model` section):

    name = 'sacm'
    dtype = 'float32' | 'bfloat16'
    image_size = 512
    backbone = dict(preset='base' | None, dims=None, depths=None, drop_path_rate=0.4,
                    layer_scale_init_value=1e-6)
    channels = 512         # UPerHead / FPN width (the correlated maps)
    pool_scales = (1, 2, 3, 6)  # the UPerHead's PPM
    aux_channels = 256     # the unused FCN head's width (kept for the key layout)
    num_learned = 14       # learned pooling channels (+ max + mean)
    aspp_channels = 512    # DeepLabV3+ width
    dilations = (1, 12, 24, 36)
    c1_channels = 48
    up_channels = (128, 32)  # widths of the upsampling classifier's two 3x3 convs
    dropout = 0.1          # Dropout2d before the classifier
    joint_batch = False    # True: both images as one batch in training (joint BN statistics)
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import convnext, fcn, layers, upernet
from miml_jax.models.common import as_dict, resolve_dtype
from miml_jax.models.correlation import CorrelationPooling, correlation_volume
from miml_jax.models.deeplab import cls_seg, sep_aspp_decoder

Array = jax.Array
Dtype = Any

# The official (level of x1, level of x2) pairs, in the order their channels are concatenated:
# c1_3, c1_4, c1_5, c1_6, c1_3a, c1_4a, ... of SAFM_model.forward (levels 3..6 there are 0..3).
PAIRS = (
  (0, 0), (1, 1), (2, 2), (3, 3),
  (0, 1), (1, 0), (2, 0), (3, 0),
  (0, 2), (1, 2), (2, 1), (3, 1),
  (0, 3), (1, 3), (2, 3), (3, 2),
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class SACMBackbone:
  """`model.backbone`: the ConvNeXt's size (a preset, or dims and depths) and regularisation."""

  preset: str | None = "base"
  dims: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  drop_path_rate: float = 0.4
  # ConvBUPer's ConvNeXt default (1e-6); a model trained from scratch may prefer 1.0.
  layer_scale_init_value: float = 1e-6

  def dims_depths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Explicit dims / depths need preset=None (convnext_dims_depths names a contradiction).
    return convnext.convnext_dims_depths(self.preset, self.dims, self.depths)


def _uper_features(
  feats: Sequence[Array],
  channels: int,
  pool_scales: Sequence[int],
  train: bool,
  dtype: Dtype,
  param_dtype: Dtype,
) -> list[Array]:
  """The CIML UPerHead's forward, in the calling module's scope: laterals + PSP, top-down sum,
  fpn convs, and every level resized to level 1's size (stride 8, align_corners=False)."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  n = len(feats)
  laterals = [
    layers.ConvModule(channels, 1, name=f"lateral_convs_{i}", **kw)(feats[i], train)
    for i in range(n - 1)
  ]
  laterals.append(upernet.psp_forward(feats[-1], pool_scales, channels, train, **kw))
  laterals = upernet.sum_fusion(laterals)
  outs = [
    layers.ConvModule(channels, 3, padding=1, name=f"fpn_convs_{i}", **kw)(laterals[i], train)
    for i in range(n - 1)
  ] + [laterals[-1]]
  size = outs[1].shape[1:3]
  return [layers.resize_bilinear(o, size, align_corners=False) for o in outs]


class UPerFeatureHead(nn.Module):
  """The CIML UPerHead (`models.decode_head`): the four FPN maps at stride 8, no fusion.

  Its `conv_seg` (channels -> 2), which the official forward never calls, is created at
  initialisation only (the key layout of SAFM.pth).
  """

  channels: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[Array], train: bool) -> list[Array]:
    feats = [f.astype(self.dtype) for f in feats]
    outs = _uper_features(
      feats, self.channels, self.pool_scales, train, self.dtype, self.param_dtype
    )
    if self.is_initializing():
      cls_seg(outs[0], 2, 0.0, False, self.dtype, self.param_dtype)
    return outs


class ConvBUPer(nn.Module):
  """The official ConvBUPer (`models`): ConvNeXt `backbone` + `decode_head` (UPerFeatureHead),
  and the never-called FCN `auxiliary_head` (in_index 2), created at initialisation only."""

  dims: Sequence[int]
  depths: Sequence[int]
  drop_path_rate: float = 0.4
  layer_scale_init_value: float = 1e-6
  channels: int = 512
  aux_channels: int = 256
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> list[Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = convnext.ConvNeXt(
      dims=tuple(self.dims),
      depths=tuple(self.depths),
      in_chans=3,
      drop_path_rate=self.drop_path_rate,
      layer_scale_init_value=self.layer_scale_init_value,
      name="backbone",
      **kw,
    )(x, train)
    if self.is_initializing():
      fcn.FCNHead(
        channels=self.aux_channels,
        num_convs=1,
        concat_input=False,
        num_classes=2,
        dropout=0.0,
        in_index=2,
        name="auxiliary_head",
        **kw,
      )(feats, False)
    return UPerFeatureHead(
      channels=self.channels, pool_scales=self.pool_scales, name="decode_head", **kw
    )(feats, train)


class SACMDeepLabHead(nn.Module):
  """`deeplab`: mmseg's DepthwiseSeparableASPPHead (as in deeplab.py: separable ASPP on x, low
  level c1 through `c1_bottleneck`, two separable convs `sep_bottleneck_{0,1}`, Dropout2d) with
  SACM's upsampling classifier `conv_seg_{1,2,5,6,9}` in place of the 1x1 `conv_seg` (the
  indices of the official Sequential). Returns logits at 8x c1's size.

  The body is deeplab.sep_aspp_decoder, called in this module's scope, so the parameter names
  are the official ones.
  """

  channels: int = 512
  dilations: Sequence[int] = (1, 12, 24, 36)
  c1_channels: int = 48
  up_channels: Sequence[int] = (128, 32)
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c1: Array, x: Array, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out, _ = sep_aspp_decoder(
      c1, x, train, self.channels, self.dilations, self.c1_channels, self.dtype, self.param_dtype
    )
    if self.dropout > 0:
      out = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(out, deterministic=not train)
    # The official Sequential: [0] up, [1] conv, [2] BN, [3] ReLU, [4] up, [5] conv, [6] BN,
    # [7] ReLU, [8] up, [9] conv. Its convs are plain nn.Conv2d (bias, torch's default init).
    for index, width in zip((1, 5), self.up_channels):
      out = _upsample2(out)
      out = layers.conv2d(
        width, 3, padding=1, in_features=out.shape[-1], name=f"conv_seg_{index}", **kw
      )(out)
      out = layers.BatchNorm(name=f"conv_seg_{index + 1}", **kw)(out, train)
      out = nn.relu(out)
    out = _upsample2(out)
    return layers.conv2d(2, 1, in_features=out.shape[-1], name="conv_seg_9", **kw)(out)


def pair_correlations(f1: Sequence[Array], f2: Sequence[Array], pool) -> tuple[Array, Array]:
  """The official corr_fun over PAIRS: (c1, c2), each (B, h, w, 32 * pooled channels).

  For pair (i, j), c1 gets [pool(Corr(f1[i], f2[j])), pool(Corr(f1[i], f1[i]))] and c2
  [pool(Corr(f2[j], f1[i])), pool(Corr(f2[j], f2[j]))]. Every map has one shape, so the 16 + 16
  cross and the 8 distinct self correlations (the official code recomputes each self
  correlation four times) are computed as one stacked batch: one correlation and one pooling
  op in the graph instead of 40, which keeps compile time down; the numbers are the same.
  """
  n = len(f1)
  firsts = [f1[i] for i, _ in PAIRS] + [f2[j] for _, j in PAIRS] + list(f1) + list(f2)
  seconds = [f2[j] for _, j in PAIRS] + [f1[i] for i, _ in PAIRS] + list(f1) + list(f2)
  batch = f1[0].shape[0]
  pooled = pool(correlation_volume(jnp.concatenate(firsts), jnp.concatenate(seconds)))
  pooled = pooled.reshape((len(firsts), batch) + pooled.shape[1:])
  cross12, cross21 = pooled[: len(PAIRS)], pooled[len(PAIRS) : 2 * len(PAIRS)]
  self1, self2 = pooled[2 * len(PAIRS) : 2 * len(PAIRS) + n], pooled[2 * len(PAIRS) + n :]
  c1 = jnp.concatenate(
    [t for k, (i, _) in enumerate(PAIRS) for t in (cross12[k], self1[i])], axis=-1
  )
  c2 = jnp.concatenate(
    [t for k, (_, j) in enumerate(PAIRS) for t in (cross21[k], self2[j])], axis=-1
  )
  return c1, c2


def _upsample2(x: Array) -> Array:
  """nn.UpsamplingBilinear2d(scale_factor=2): align_corners=True, size floor(2 * in)."""
  return layers.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)


class SACM(nn.Module):
  """The official SAFM_model; see the module docstring."""

  image_size: int = 512
  backbone: SACMBackbone = SACMBackbone()
  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  aux_channels: int = 256
  num_learned: int = 14
  aspp_channels: int = 512
  dilations: tuple[int, ...] = (1, 12, 24, 36)
  c1_channels: int = 48
  up_channels: tuple[int, ...] = (128, 32)
  dropout: float = 0.1
  # Training only (eval is one pass either way, with the same numbers): True runs both images
  # through the shared encoder and head as one batch, so BatchNorm normalises them with joint
  # statistics (one running-stat update) and the step compiles about twice as fast; False is
  # the official two passes, each image's batch with its own statistics.
  joint_batch: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, model_config) -> "SACM":
    from miml_jax import config as config_lib

    cfg = as_dict(model_config)
    cfg.pop("name", None)
    dtype = resolve_dtype(cfg.pop("dtype", "float32"))
    backbone = config_lib.settings_from_config(
      SACMBackbone, as_dict(cfg.pop("backbone", None)), "model.backbone"
    )
    known = {f.name for f in dataclasses.fields(cls)} - {"backbone", "dtype", "param_dtype"}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise UserInputError(f"model: unknown key(s) {unknown} for sacm; known: {sorted(known)}")
    model = cls(backbone=backbone, dtype=dtype, **{k: _plain(v) for k, v in cfg.items()})
    model.check()
    return model

  def check(self):
    """One-line errors for settings no network can be built from."""
    self.backbone.dims_depths()
    if self.image_size < 32 or self.image_size % 32:
      raise UserInputError(
        f"model.image_size: {self.image_size} must be a positive multiple of 32 (the backbone's "
        "stride); the official SACM weights need 512"
      )
    if len(self.up_channels) != 2:
      raise UserInputError(f"model.up_channels: expected two widths, got {self.up_channels!r}")
    if any(d < 1 for d in self.dilations) or not self.dilations:
      raise UserInputError(f"model.dilations: expected positive ints, got {self.dilations!r}")
    for name in ("channels", "aux_channels", "num_learned", "aspp_channels", "c1_channels"):
      if getattr(self, name) < 1:
        raise UserInputError(f"model.{name}: expected a positive int, got {getattr(self, name)}")
    if not 0.0 <= self.dropout < 1.0:
      raise UserInputError(f"model.dropout: expected a value in [0, 1), got {self.dropout}")

  def example_inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (1, self.image_size, self.image_size, 3)
    return {
      "authentic": jax.ShapeDtypeStruct(shape, jnp.float32),
      "forged": jax.ShapeDtypeStruct(shape, jnp.float32),
    }

  @nn.compact
  def __call__(self, authentic: Array, forged: Array, train: bool) -> dict:
    size = self.image_size
    for key, x in (("authentic", authentic), ("forged", forged)):
      if x.ndim != 4 or tuple(x.shape[1:]) != (size, size, 3):
        raise UserInputError(
          f"sacm: '{key}' must be (B, {size}, {size}, 3) (model.image_size; the correlation's "
          f"learned pooling is built for one size), got {tuple(x.shape)}"
        )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dims, depths = self.backbone.dims_depths()
    encoder = ConvBUPer(
      dims=dims,
      depths=depths,
      drop_path_rate=self.backbone.drop_path_rate,
      layer_scale_init_value=self.backbone.layer_scale_init_value,
      channels=self.channels,
      aux_channels=self.aux_channels,
      pool_scales=self.pool_scales,
      name="models",
      **kw,
    )
    joint = self.joint_batch or not train
    batch = authentic.shape[0]
    if joint:
      both = encoder(jnp.concatenate([authentic, forged]), train)
      f1, f2 = [f[:batch] for f in both], [f[batch:] for f in both]
    else:
      f1, f2 = encoder(authentic, train), encoder(forged, train)
    c1, c2 = pair_correlations(
      f1, f2, CorrelationPooling(self.num_learned, name="poolopt_on_corrmat", **kw)
    )
    c1, c2 = c1.astype(self.dtype), c2.astype(self.dtype)
    seg_out = layers.conv2d(2, 1, in_features=c1.shape[-1], name="seg_out", **kw)
    head = SACMDeepLabHead(
      channels=self.aspp_channels,
      dilations=self.dilations,
      c1_channels=self.c1_channels,
      up_channels=self.up_channels,
      dropout=self.dropout,
      name="deeplab",
      **kw,
    )

    def decode(feats, c):
      aux = seg_out(c)
      attention = jax.nn.softmax(aux.astype(jnp.float32), axis=-1)[..., 1:2].astype(self.dtype)
      x = jnp.concatenate([feats[0], feats[1], feats[2], c], axis=-1) + attention
      aux = layers.resize_bilinear(aux.astype(jnp.float32), scale_factor=8.0, align_corners=False)
      return head(feats[0], x, train).astype(jnp.float32), aux

    if joint:
      logits, aux = decode(
        [jnp.concatenate([a, b]) for a, b in zip(f1, f2, strict=True)], jnp.concatenate([c1, c2])
      )
      pairs = {"authentic": (logits[:batch], aux[:batch]), "forged": (logits[batch:], aux[batch:])}
    else:
      pairs = {"authentic": decode(f1, c1), "forged": decode(f2, c2)}
    outputs = {}
    for role, (logits, aux) in pairs.items():
      outputs[f"{role}_logits"], outputs[f"{role}_aux"] = logits, aux
    return outputs


def _plain(value):
  return tuple(value) if isinstance(value, list) else value
