"""DeepLabV3+ head with depthwise-separable ASPP, as APSC-Net's `MSDEC` (mmseg's
DepthwiseSeparableASPPHead2 of the official code), in NHWC.

Given (c1, x): ASPP on x = [global avg pool -> 1x1 ConvModule `image_pool_1`, upsampled] +
`aspp_modules_{i}` (dilation 1: 1x1 ConvModule; otherwise a DepthwiseSeparableConvModule with 3x3
depthwise conv of that dilation and padding) -> concat -> 3x3 ConvModule `bottleneck` = Y. Then
Y is resized to c1's size and concatenated with the 1x1 ConvModule `c1_bottleneck(c1)`, goes
through two DepthwiseSeparableConvModules `sep_bottleneck_0` / `sep_bottleneck_1`, channel
dropout (Dropout2d) and the 1x1 classifier `conv_seg`. Returns (logits at c1's resolution, Y at
x's resolution).

Parameter names follow the torch state_dict 1:1 with numeric indices joined by '_':
`MSDEC.image_pool.1.conv.weight` -> `MSDEC/image_pool_1/conv/kernel`,
`MSDEC.aspp_modules.1.depthwise_conv.conv.weight` ->
`MSDEC/aspp_modules_1/depthwise_conv/conv/kernel`,
`MSDEC.conv_seg.weight` -> `MSDEC/conv_seg/kernel`.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.models import layers

Array = jax.Array
Dtype = Any


def cls_seg(
  feat: Array,
  num_classes: int,
  dropout: float,
  train: bool,
  dtype: Dtype,
  param_dtype: Dtype,
  name: str = "conv_seg",
) -> Array:
  """mmseg BaseDecodeHead.cls_seg: Dropout2d (whole channels per sample) -> 1x1 conv with bias.

  Creates `conv_seg` in the calling module's scope; initialised N(0, 0.01), bias 0, as mmseg does.
  """
  if dropout > 0:
    # Dropout2d: one keep/drop decision per (sample, channel), broadcast over H and W.
    feat = nn.Dropout(dropout, broadcast_dims=(1, 2))(feat, deterministic=not train)
  return layers.conv2d(
    num_classes,
    1,
    in_features=feat.shape[-1],
    kernel_init=nn.initializers.normal(0.01),
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )(feat)


class DepthwiseSeparableASPPHead(nn.Module):
  """mmseg DepthwiseSeparableASPPHead2 (DeepLabV3+ decoder), see the module docstring.

  Attributes:
    channels: ASPP / decoder width (512 in APSC-Net).
    dilations: ASPP dilations; 1 means a plain 1x1 branch.
    c1_channels: width of the low-level projection `c1_bottleneck` (48).
    dropout: Dropout2d rate before `conv_seg`.
    num_classes: classifier outputs.
  """

  channels: int = 512
  dilations: Sequence[int] = (1, 12, 24, 36)
  c1_channels: int = 48
  dropout: float = 0.1
  num_classes: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c1: Array, x: Array, train: bool) -> tuple[Array, Array]:
    out, y = sep_aspp_decoder(
      c1, x, train, self.channels, self.dilations, self.c1_channels, self.dtype, self.param_dtype
    )
    logits = cls_seg(out, self.num_classes, self.dropout, train, self.dtype, self.param_dtype)
    return logits, y


def sep_aspp_decoder(
  c1: Array,
  x: Array,
  train: bool,
  channels: int,
  dilations: Sequence[int],
  c1_channels: int,
  dtype: Dtype,
  param_dtype: Dtype,
) -> tuple[Array, Array]:
  """DepthwiseSeparableASPPHead's body up to its classifier: (decoder features at c1's size,
  the ASPP bottleneck output). Call it inside a compact module: its layers (`image_pool_1`,
  `aspp_modules_*`, `bottleneck`, `c1_bottleneck`, `sep_bottleneck_*`) become that module's
  children, so a head with another classifier (SACM's) keeps the official names."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  pooled = layers.adaptive_avg_pool(x, 1)
  pooled = layers.ConvModule(channels, 1, name="image_pool_1", **kw)(pooled, train)
  outs = [layers.resize_bilinear(pooled, x.shape[1:3], align_corners=False)]
  for i, d in enumerate(dilations):
    if d == 1:
      branch = layers.ConvModule(channels, 1, name=f"aspp_modules_{i}", **kw)
    else:
      branch = layers.DepthwiseSeparableConvModule(
        channels, 3, dilation=d, padding=d, name=f"aspp_modules_{i}", **kw
      )
    outs.append(branch(x, train))
  y = layers.ConvModule(channels, 3, padding=1, name="bottleneck", **kw)(
    jnp.concatenate(outs, axis=-1), train
  )
  c1 = layers.ConvModule(c1_channels, 1, name="c1_bottleneck", **kw)(c1, train)
  out = jnp.concatenate([layers.resize_bilinear(y, c1.shape[1:3], align_corners=False), c1], -1)
  for j in range(2):
    out = layers.DepthwiseSeparableConvModule(
      channels, 3, padding=1, name=f"sep_bottleneck_{j}", **kw
    )(out, train)
  return out, y
