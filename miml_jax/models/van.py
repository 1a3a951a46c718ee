"""VAN backbone (Visual Attention Network, Guo et al., 2022) as MIML's DASS annotator uses it, NHWC.

This is the segmentation form of VAN (the mmseg backbone of the VAN-Segmentation code, which the
official MIML `dass.py` copies): BatchNorm (SyncBN) inside the blocks and patch embeddings, a
LayerNorm after every stage, and the four stage outputs (strides 4, 8, 16, 32) returned.

* Stage i (1..4) starts with `patch_embed{i}`: conv `proj` (7x7 stride 4 padding 3 for stage 1,
  3x3 stride 2 padding 1 after) followed by BatchNorm `norm`.
* Each block: x += drop_path(layer_scale_1 * attn(norm1(x))); x += drop_path(layer_scale_2 *
  mlp(norm2(x))), `norm1` / `norm2` BatchNorms, `layer_scale_*` per-channel (dim,) scales
  initialised to 1e-2.
* `attn` (spatial attention): 1x1 conv `proj_1` -> exact GELU -> large-kernel attention
  `spatial_gating_unit` -> 1x1 conv `proj_2`, plus the attention's own input as a shortcut. The
  large-kernel attention multiplies its input by conv1(conv_spatial(conv0(input))): `conv0` a 5x5
  depthwise conv (padding 2), `conv_spatial` a 7x7 depthwise conv with dilation 3 (padding 9),
  `conv1` a 1x1 conv.
* `mlp`: 1x1 conv `fc1` (to dim * mlp_ratio) -> 3x3 depthwise conv `dwconv.dwconv` (bias) ->
  exact GELU -> dropout -> 1x1 conv `fc2` -> dropout.
* After a stage's blocks, LayerNorm `norm{i}` over channels.

LayerNorm epsilon: the segmentation VAN (mmseg's port and MIML's `dass.py`) builds the stage
norms as `nn.LayerNorm(dim)`, i.e. torch's default eps 1e-5, which is the default here; the
classification VAN (VAN-Classification `van_b*`) passes eps=1e-6 (set `ln_eps=1e-6` to load those
weights exactly). BatchNorms use torch's eps 1e-5.

Parameter names follow the torch state_dict 1:1 (numeric ModuleList indices joined with '_'):
`patch_embed1.proj.weight` -> `patch_embed1/proj/kernel`, `patch_embed1.norm.weight` ->
`patch_embed1/norm/scale` (running stats in batch_stats `patch_embed1/norm/mean|var`),
`block3.11.attn.proj_1.weight` -> `block3_11/attn/proj_1/kernel`,
`block3.11.attn.spatial_gating_unit.conv_spatial.weight` ->
`block3_11/attn/spatial_gating_unit/conv_spatial/kernel`, `block3.11.mlp.dwconv.dwconv.bias` ->
`block3_11/mlp/dwconv/dwconv/bias`, `block3.11.layer_scale_1` -> `block3_11/layer_scale_1`,
`norm3.weight` -> `norm3/scale`. All convs are `nn.Conv` (no Dense layers).
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import layers

Array = jax.Array
Dtype = Any

# (embed_dims, depths, mlp_ratios) of the published sizes, from the official VAN-Classification
# `van_b0` ... `van_b6` constructors (the segmentation configs use the same dims and depths).
VAN_PRESETS = {
  "b0": ((32, 64, 160, 256), (3, 3, 5, 2), (8, 8, 4, 4)),
  "b1": ((64, 128, 320, 512), (2, 2, 4, 2), (8, 8, 4, 4)),
  "b2": ((64, 128, 320, 512), (3, 3, 12, 3), (8, 8, 4, 4)),
  "b3": ((64, 128, 320, 512), (3, 5, 27, 3), (8, 8, 4, 4)),
  "b4": ((64, 128, 320, 512), (3, 6, 40, 3), (8, 8, 4, 4)),
  "b5": ((96, 192, 480, 768), (3, 3, 24, 3), (8, 8, 4, 4)),
  "b6": ((96, 192, 384, 768), (6, 6, 90, 6), (8, 8, 4, 4)),
}


def van_conv_init(kernel_size: tuple[int, int], features: int, groups: int):
  """VAN's conv init: N(0, sqrt(2 / fan_out)), fan_out = kh * kw * out_channels / groups."""
  fan_out = kernel_size[0] * kernel_size[1] * features // groups
  return nn.initializers.normal(math.sqrt(2.0 / fan_out))


def _conv(
  features: int,
  kernel_size: int,
  *,
  name: str,
  in_features: int,
  stride: int = 1,
  padding: int = 0,
  dilation: int = 1,
  groups: int = 1,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
) -> nn.Conv:
  """A torch-like conv with bias, initialised as VAN does (normal weights, zero bias)."""
  return layers.conv2d(
    features,
    kernel_size,
    name=name,
    in_features=in_features,
    stride=stride,
    padding=padding,
    dilation=dilation,
    groups=groups,
    kernel_init=van_conv_init((kernel_size, kernel_size), features, groups),
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    param_dtype=param_dtype,
  )


class DWConv(nn.Module):
  """The MLP's 3x3 depthwise conv, wrapped as torch's `DWConv` (child conv also `dwconv`)."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    return _conv(
      c,
      3,
      padding=1,
      groups=c,
      in_features=c,
      name="dwconv",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)


class Mlp(nn.Module):
  """Conv MLP: `fc1` 1x1 -> `dwconv` 3x3 depthwise -> GELU -> dropout -> `fc2` 1x1 -> dropout."""

  hidden_features: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(self.hidden_features, 1, in_features=c, name="fc1", **kw)(x)
    x = DWConv(name="dwconv", **kw)(x)
    x = nn.gelu(x, approximate=False)  # torch nn.GELU is the exact erf form.
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    x = _conv(c, 1, in_features=self.hidden_features, name="fc2", **kw)(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class LKA(nn.Module):
  """Large-kernel attention (`spatial_gating_unit`): x * conv1(conv_spatial(conv0(x)))."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kw = dict(in_features=c, dtype=self.dtype, param_dtype=self.param_dtype)
    attn = _conv(c, 5, padding=2, groups=c, name="conv0", **kw)(x)
    attn = _conv(c, 7, padding=9, dilation=3, groups=c, name="conv_spatial", **kw)(attn)
    attn = _conv(c, 1, name="conv1", **kw)(attn)
    return x * attn


class SpatialAttention(nn.Module):
  """`attn`: proj_1 -> GELU -> LKA -> proj_2, plus its input as shortcut."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = _conv(c, 1, in_features=c, name="proj_1", **kw)(x)
    y = nn.gelu(y, approximate=False)
    y = LKA(name="spatial_gating_unit", **kw)(y)
    y = _conv(c, 1, in_features=c, name="proj_2", **kw)(y)
    return y + x


class Block(nn.Module):
  """VAN block (BatchNorm variant) with per-channel layer scales and stochastic depth."""

  dim: int
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  drop_path: float = 0.0
  layer_scale_init_value: float = 1e-2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    scale_init = nn.initializers.constant(self.layer_scale_init_value)
    ls1 = self.param("layer_scale_1", scale_init, (self.dim,), self.param_dtype)
    ls2 = self.param("layer_scale_2", scale_init, (self.dim,), self.param_dtype)
    y = layers.BatchNorm(name="norm1", **kw)(x, train)
    y = SpatialAttention(name="attn", **kw)(y)
    x = x + layers.DropPath(self.drop_path)(ls1.astype(y.dtype) * y, deterministic=not train)
    y = layers.BatchNorm(name="norm2", **kw)(x, train)
    y = Mlp(int(self.dim * self.mlp_ratio), self.drop_rate, name="mlp", **kw)(y, train)
    return x + layers.DropPath(self.drop_path)(ls2.astype(y.dtype) * y, deterministic=not train)


class OverlapPatchEmbed(nn.Module):
  """`patch_embed{i}`: strided conv `proj` (padding kernel // 2) -> BatchNorm `norm`."""

  embed_dim: int
  patch_size: int = 7
  stride: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = _conv(
      self.embed_dim,
      self.patch_size,
      stride=self.stride,
      padding=self.patch_size // 2,
      in_features=x.shape[-1],
      name="proj",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)
    return layers.BatchNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x, train)


class VAN(nn.Module):
  """The VAN backbone; `__call__(x, train)` returns the four LayerNorm-ed stage outputs.

  Attributes:
    embed_dims: channels of the four stages.
    depths: blocks per stage.
    mlp_ratios: MLP hidden width / dim per stage.
    in_chans: input channels (3 for RGB, 9 for DASS's stacked inputs).
    drop_rate: dropout inside the MLPs (0 in every published config).
    drop_path_rate: stochastic-depth rate of the last block (linear from 0 over all blocks, as
      torch.linspace(0, rate, sum(depths))).
    ln_eps: epsilon of the stage LayerNorms `norm{i}` (1e-5: segmentation VAN / MIML; the
      classification VAN uses 1e-6).
  """

  embed_dims: Sequence[int] = VAN_PRESETS["b5"][0]
  depths: Sequence[int] = VAN_PRESETS["b5"][1]
  mlp_ratios: Sequence[float] = VAN_PRESETS["b5"][2]
  in_chans: int = 3
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> tuple[Array, ...]:
    if not len(self.embed_dims) == len(self.depths) == len(self.mlp_ratios) == 4:
      raise UserInputError(
        f"VAN: embed_dims {tuple(self.embed_dims)}, depths "
        f"{tuple(self.depths)} and mlp_ratios {tuple(self.mlp_ratios)} must "
        "all have 4 entries"
      )
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise ValueError(f"VAN: expected (B, H, W, {self.in_chans}) input, got {x.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    total = sum(self.depths)
    rates = [self.drop_path_rate * j / (total - 1) if total > 1 else 0.0 for j in range(total)]
    outs = []
    cur = 0
    for i in range(4):
      first = i == 0
      x = OverlapPatchEmbed(
        self.embed_dims[i], 7 if first else 3, 4 if first else 2, name=f"patch_embed{i + 1}", **kw
      )(x, train)
      for j in range(self.depths[i]):
        x = Block(
          self.embed_dims[i],
          self.mlp_ratios[i],
          self.drop_rate,
          rates[cur + j],
          name=f"block{i + 1}_{j}",
          **kw,
        )(x, train)
      cur += self.depths[i]
      x = layers.layer_norm(f"norm{i + 1}", self.ln_eps, self.dtype, self.param_dtype)(x)
      outs.append(x)
    return tuple(outs)


def van_preset(name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
  """(embed_dims, depths, mlp_ratios) of a published size ('b0' ... 'b6')."""
  if name not in VAN_PRESETS:
    raise UserInputError(f"unknown VAN preset {name!r}; choose one of {sorted(VAN_PRESETS)}")
  return VAN_PRESETS[name]
