"""UPerNet: mmseg's `UPerHead`, and its pyramid pieces that the APSC-Net head reuses (PPM,
bottleneck, top-down fusion).

Two top-down fusions are provided, selected by the head's `fusion` switch:

* `se_gated_fusion` ('se', APSC-Net): going from coarse to fine, level i-1 becomes a weighted sum
  of itself and of all coarser levels (resized to its size), with per-sample weights from a
  squeeze-excitation MLP `SE{k}` (1x1 conv -> ReLU -> 1x1 conv -> sigmoid) on the globally
  pooled levels i-1 .. n-1. Levels already updated in earlier steps are the ones used, as in the
  reference.
* `sum_fusion` ('sum', plain UPerNet): level i-1 += resize(level i).

These are functions, not modules, on purpose: in the torch model the PPM convs, the SE MLPs and
the lateral / fpn convs are direct children of the decode head (`decode_head.psp_modules.0.1`,
`decode_head.SE1.0`, ...), so their flax submodules must be created in the head's own scope to
keep the parameter tree 1:1 with the state_dict (`decode_head/psp_modules_0_1/conv/kernel`,
`decode_head/SE1_0/kernel`; numeric Sequential / ModuleList indices are joined to the previous
name with '_'). Call them from inside the head's `nn.compact` method.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.models import deeplab, layers

Array = jax.Array
Dtype = Any


def pyramid_pooling(
  x: Array,
  pool_scales: Sequence[int],
  channels: int,
  train: bool,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  prefix: str = "psp_modules",
) -> list[Array]:
  """mmseg PPM: per scale, adaptive avg pool -> 1x1 ConvModule -> bilinear back to x's size.

  torch nests each branch as Sequential(AdaptiveAvgPool2d, ConvModule), so the ConvModule of
  branch k is `{prefix}_{k}_1`.
  """
  outs = []
  for k, scale in enumerate(pool_scales):
    y = layers.adaptive_avg_pool(x, scale)
    y = layers.ConvModule(
      channels, 1, dtype=dtype, param_dtype=param_dtype, name=f"{prefix}_{k}_1"
    )(y, train)
    outs.append(layers.resize_bilinear(y, x.shape[1:3], align_corners=False))
  return outs


def psp_forward(
  x: Array,
  pool_scales: Sequence[int],
  channels: int,
  train: bool,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
) -> Array:
  """UPerNet's top level: concat(x, PPM(x)) -> 3x3 ConvModule `bottleneck`."""
  y = jnp.concatenate(
    [x.astype(dtype)] + pyramid_pooling(x, pool_scales, channels, train, dtype, param_dtype),
    axis=-1,
  )
  return layers.ConvModule(
    channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, name="bottleneck"
  )(y, train)


def _global_avg(x: Array) -> Array:
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)


def se_gated_fusion(
  laterals: Sequence[Array],
  reduction: int = 8,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  prefix: str = "SE",
) -> list[Array]:
  """APSC-Net's SE-gated top-down fusion; returns the updated list of laterals.

  For i = n-1 .. 1 (step k = n - i, MLP `{prefix}{k}`): the pooled levels i-1 .. n-1
  (channel-concatenated, (k+1)*C channels) go through 1x1 conv ((k+1)*C -> (k+1)*C // reduction,
  child index 0) -> ReLU -> 1x1 conv (-> k+1, child index 2) -> sigmoid, and
  L[i-1] = sum_j w_j * resize(L[i-1+j]) over j = 0..k.
  """
  laterals = list(laterals)
  n = len(laterals)
  for i in range(n - 1, 0, -1):
    k = n - i
    group = laterals[i - 1 :]
    pooled = jnp.concatenate([_global_avg(t) for t in group], axis=-1).astype(dtype)
    cin = pooled.shape[-1]
    hidden = cin // reduction
    w = layers.conv2d(
      hidden, 1, in_features=cin, dtype=dtype, param_dtype=param_dtype, name=f"{prefix}{k}_0"
    )(pooled)
    w = jax.nn.relu(w)
    w = layers.conv2d(
      k + 1, 1, in_features=hidden, dtype=dtype, param_dtype=param_dtype, name=f"{prefix}{k}_2"
    )(w)
    w = jax.nn.sigmoid(w)  # (B, 1, 1, k + 1)
    size = laterals[i - 1].shape[1:3]
    fused = w[..., 0:1] * laterals[i - 1]
    for j in range(1, k + 1):
      fused = fused + w[..., j : j + 1] * layers.resize_bilinear(
        laterals[i - 1 + j], size, align_corners=False
      )
    laterals[i - 1] = fused
  return laterals


def sum_fusion(laterals: Sequence[Array]) -> list[Array]:
  """Plain UPerNet top-down path: L[i-1] += resize(L[i]) for i = n-1 .. 1."""
  laterals = list(laterals)
  for i in range(len(laterals) - 1, 0, -1):
    laterals[i - 1] = laterals[i - 1] + layers.resize_bilinear(
      laterals[i], laterals[i - 1].shape[1:3], align_corners=False
    )
  return laterals


class UPerHead(nn.Module):
  """mmseg's UPerHead (the decode head of the FAIR UPerNet-ConvNeXt ADE20k checkpoints).

  Laterals `lateral_convs_{i}` (1x1 ConvModule) on all levels but the last; PPM + `bottleneck`
  on the last; top-down sum; `fpn_convs_{i}` (3x3) on all but the last; every level resized to
  level 0's size (align_corners=False) and concatenated; `fpn_bottleneck` (3x3); Dropout2d and
  the 1x1 classifier `conv_seg`. Returns logits at level 0's resolution (stride 4).
  Keys: `decode_head.lateral_convs.0.conv.weight` -> `lateral_convs_0/conv/kernel`, etc.
  """

  channels: int = 512
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  num_classes: int = 150
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[Array], train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inputs = [t.astype(self.dtype) for t in inputs]
    n = len(inputs)
    laterals = [
      layers.ConvModule(self.channels, 1, name=f"lateral_convs_{i}", **kw)(inputs[i], train)
      for i in range(n - 1)
    ]
    laterals.append(psp_forward(inputs[-1], self.pool_scales, self.channels, train, **kw))
    laterals = sum_fusion(laterals)
    outs = [
      layers.ConvModule(self.channels, 3, padding=1, name=f"fpn_convs_{i}", **kw)(
        laterals[i], train
      )
      for i in range(n - 1)
    ] + [laterals[-1]]
    size = outs[0].shape[1:3]
    fused = jnp.concatenate(
      [outs[0]] + [layers.resize_bilinear(o, size, align_corners=False) for o in outs[1:]], axis=-1
    )
    fused = layers.ConvModule(self.channels, 3, padding=1, name="fpn_bottleneck", **kw)(
      fused, train
    )
    return deeplab.cls_seg(fused, self.num_classes, self.dropout, train, **kw).astype(jnp.float32)
