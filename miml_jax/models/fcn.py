"""mmseg's FCNHead (used as DASS's auxiliary head), in NHWC.

`num_convs` 3x3 ConvModules (conv without bias -> BatchNorm -> ReLU; padding
(kernel_size // 2) * dilation) `convs_0` ... ; with `concat_input`, the head input is concatenated
with their output and fused by the ConvModule `conv_cat` (padding kernel_size // 2, no dilation,
as mmseg builds it); then mmseg's cls_seg: Dropout2d and the 1x1 classifier `conv_seg` (bias).
With num_convs=0 the convs are the identity and the input must already have `channels` channels.

Parameter names follow the torch state_dict 1:1: `convs.0.conv.weight` -> `convs_0/conv/kernel`,
`convs.0.bn.weight` -> `convs_0/bn/scale` (running stats in batch_stats `convs_0/bn/mean|var`),
`conv_cat.conv.weight` -> `conv_cat/conv/kernel`, `conv_seg.weight` -> `conv_seg/kernel`.
In the MIML DASS model the head sits under `auxiliary_head.` (in_index 2, channels 256,
num_convs 1, concat_input False, dropout 0.1, 2 classes).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import layers
from miml_jax.models.deeplab import cls_seg

Array = jax.Array
Dtype = Any


class FCNHead(nn.Module):
  """mmseg FCNHead; `__call__(inputs, train)` returns logits at the input's resolution.

  Attributes:
    channels: width of the convs.
    num_convs: number of ConvModules before the classifier (>= 0).
    kernel_size: their kernel size.
    concat_input: concatenate the input with the convs' output and fuse with `conv_cat`.
    dilation: dilation of the convs (not of `conv_cat`).
    num_classes: classifier outputs.
    dropout: Dropout2d rate before `conv_seg` (mmseg's dropout_ratio).
    in_index: which feature map to use when `inputs` is a sequence (mmseg's in_index).
  """

  channels: int = 256
  num_convs: int = 2
  kernel_size: int = 3
  concat_input: bool = True
  dilation: int = 1
  num_classes: int = 2
  dropout: float = 0.1
  in_index: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array | Sequence[Array], train: bool) -> Array:
    if self.num_convs < 0 or self.dilation < 1:
      raise UserInputError(
        f"FCNHead: num_convs={self.num_convs} must be >= 0 and dilation={self.dilation} >= 1"
      )
    x = inputs if hasattr(inputs, "ndim") else inputs[self.in_index]
    x = x.astype(self.dtype)
    if self.num_convs == 0 and x.shape[-1] != self.channels:
      raise ValueError(
        f"FCNHead: with num_convs=0 the input needs {self.channels} channels, got {x.shape[-1]}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = x
    for i in range(self.num_convs):
      feats = layers.ConvModule(
        self.channels,
        self.kernel_size,
        padding=(self.kernel_size // 2) * self.dilation,
        dilation=self.dilation,
        name=f"convs_{i}",
        **kw,
      )(feats, train)
    if self.concat_input:
      feats = layers.ConvModule(
        self.channels, self.kernel_size, padding=self.kernel_size // 2, name="conv_cat", **kw
      )(jnp.concatenate([x, feats], axis=-1), train)
    return cls_seg(feats, self.num_classes, self.dropout, train, self.dtype, self.param_dtype)
