"""Shared layers for the IML models: mmcv-style conv blocks, PyTorch-exact resizes and pools.

Everything here is NHWC and reproduces the PyTorch operator the official models use, so that
weights imported from a PyTorch checkpoint give the same numbers:

* `ConvModule` is mmcv's conv -> BatchNorm -> ReLU; `DepthwiseSeparableConvModule` is mmcv's
  depthwise ConvModule followed by a pointwise ConvModule.
* `BatchNorm` follows `torch.nn.BatchNorm2d` (eps 1e-5, running statistics updated with
  momentum 0.1 in torch terms, i.e. 0.9 in flax terms, and with the *unbiased* batch variance).
* `resize_bilinear` follows `F.interpolate(mode='bilinear')` for both values of `align_corners`
  and for both `size=` and `scale_factor=` calls (they use different source-coordinate scales).
* `adaptive_avg_pool` / `adaptive_max_pool` use PyTorch's bin rule
  start = floor(i * H / o), end = ceil((i + 1) * H / o), which also covers non-divisible sizes and
  output sizes larger than the input.

Parameter naming rule (shared by every file in `miml_jax/models/`): each PyTorch module path
component becomes a flax submodule name, and purely numeric components (nn.Sequential /
nn.ModuleList indices) are joined to the previous name with '_'. So torch
`decode_head.lateral_convs.0.conv.weight` is flax `params/decode_head/lateral_convs_0/conv/kernel`.
Leaves: conv/linear `weight` -> `kernel`, norm `weight` -> `scale`, `bias` -> `bias`, BatchNorm
`running_mean` / `running_var` -> `batch_stats` `mean` / `var`. The modules here therefore always
name their children as mmcv does: `conv` and `bn` in a ConvModule, `depthwise_conv` and
`pointwise_conv` in a DepthwiseSeparableConvModule. See `naming.py` for the mapping functions.
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

BN_EPS = 1e-5
# flax convention: running = momentum * running + (1 - momentum) * batch (torch momentum 0.1).
BN_MOMENTUM = 0.9

# mmcv's ConvModule.init_weights: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_module_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default for nn.Conv2d / nn.Linear weights: kaiming_uniform_(a=sqrt(5)), which is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
  """torch's default bias init for conv / linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  return tuple(v)  # type: ignore[return-value]


def conv2d(
  features: int,
  kernel_size: int | Sequence[int],
  *,
  name: str,
  in_features: int,
  stride: int | Sequence[int] = 1,
  padding: int | Sequence[int] = 0,
  dilation: int | Sequence[int] = 1,
  groups: int = 1,
  use_bias: bool = True,
  kernel_init: Initializer | None = None,
  bias_init: Initializer | None = None,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
) -> nn.Conv:
  """An `nn.Conv` configured like `torch.nn.Conv2d` (explicit symmetric padding, never 'SAME').

  The default initialisers are torch's; `in_features` is only needed for the bias bound.
  """
  kh, kw = _pair(kernel_size)
  ph, pw = _pair(padding)
  fan_in = (in_features // groups) * kh * kw
  return nn.Conv(
    features=features,
    kernel_size=(kh, kw),
    strides=_pair(stride),
    padding=((ph, ph), (pw, pw)),
    kernel_dilation=_pair(dilation),
    feature_group_count=groups,
    use_bias=use_bias,
    kernel_init=kernel_init or torch_default_kernel_init,
    bias_init=bias_init or torch_default_bias_init(fan_in),
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def dense(
  features: int,
  *,
  name: str,
  in_features: int,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  kernel_init: Initializer | None = None,
  bias_init: Initializer | None = None,
) -> nn.Dense:
  """An `nn.Dense` with torch.nn.Linear's default initialisation."""
  return nn.Dense(
    features,
    kernel_init=kernel_init or torch_default_kernel_init,
    bias_init=bias_init or torch_default_bias_init(in_features),
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def layer_norm(
  name: str, eps: float = 1e-6, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> nn.LayerNorm:
  """LayerNorm over the channel (last) axis, computed like torch (two-pass variance)."""
  # use_fast_variance=False: E[(x - mean)^2] as torch computes it, not E[x^2] - E[x]^2.
  return nn.LayerNorm(
    epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
  )


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d (and SyncBN under jit) over all but the channel axis.

  Training normalises with the biased batch variance and updates the running variance with the
  unbiased one, as torch does. Statistics are computed in float32 whatever the compute dtype.
  Under jit with a data-sharded batch the batch mean is global, i.e. this is SyncBN.

  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (torch `weight`, `bias`,
  `running_mean`, `running_var`; torch's `num_batches_tracked` has no counterpart).
  """

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class ConvModule(nn.Module):
  """mmcv ConvModule: conv (children `conv`) -> BatchNorm (`bn`) -> ReLU.

  Attributes mirror mmcv: `use_bias=None` is mmcv's bias='auto' (a bias only without a norm).
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  groups: int = 1
  with_norm: bool = True
  with_act: bool = True
  use_bias: bool | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    use_bias = (not self.with_norm) if self.use_bias is None else self.use_bias
    x = conv2d(
      self.features,
      self.kernel_size,
      name="conv",
      in_features=x.shape[-1],
      stride=self.stride,
      padding=self.padding,
      dilation=self.dilation,
      groups=self.groups,
      use_bias=use_bias,
      kernel_init=conv_module_kernel_init,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)
    if self.with_norm:
      x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x, train)
    if self.with_act:
      x = nn.relu(x)
    return x


class DepthwiseSeparableConvModule(nn.Module):
  """mmcv DepthwiseSeparableConvModule: `depthwise_conv` then 1x1 `pointwise_conv`.

  Both are full ConvModules (conv + BN + ReLU), as mmcv builds them when a norm is configured.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    x = ConvModule(
      c,
      self.kernel_size,
      stride=self.stride,
      padding=self.padding,
      dilation=self.dilation,
      groups=c,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="depthwise_conv",
    )(x, train)
    return ConvModule(
      self.features, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="pointwise_conv"
    )(x, train)


class DropPath(nn.Module):
  """Per-sample stochastic depth (timm's DropPath, scaled by 1 / keep_prob); 'dropout' RNG."""

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# Resizing.


def _linear_taps(
  in_size: int, out_size: int, align_corners: bool, scale_factor: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of PyTorch's 1-D linear interpolation.

  Mirrors ATen's area_pixel_compute_scale / area_pixel_compute_source_index, in float32 as ATen
  computes them for float inputs: with align_corners the scale is (in - 1) / (out - 1); without,
  it is 1 / scale_factor when the caller passed a scale factor and in / out otherwise, the source
  coordinate is (dst + 0.5) * scale - 0.5 clamped at 0, and the upper tap is clamped to in - 1.
  """
  f32 = np.float32
  dst = np.arange(out_size, dtype=f32)
  if align_corners:
    scale = f32((in_size - 1) / (out_size - 1)) if out_size > 1 else f32(0.0)
    src = scale * dst
  else:
    scale = f32(1.0 / scale_factor) if scale_factor else f32(in_size) / f32(out_size)
    src = np.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(f32)).astype(f32)
  return i0, i1, w1


def _resize_axis(
  x: Array, axis: int, out_size: int, align_corners: bool, scale_factor: float | None
) -> Array:
  in_size = x.shape[axis]
  if in_size == out_size and (align_corners or not scale_factor or scale_factor == 1.0):
    # PyTorch's formulas reduce to the identity here (weight 1 on the same index).
    return x
  i0, i1, w1 = _linear_taps(in_size, out_size, align_corners, scale_factor)
  bshape = [1] * x.ndim
  bshape[axis] = out_size
  w1 = jnp.asarray(w1.reshape(bshape), x.dtype)
  w0 = jnp.asarray(1.0, x.dtype) - w1
  # Two gathers (not a dense interpolation matrix): exact, and O(out) instead of O(in * out).
  return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(
  x: Array,
  size: tuple[int, int] | None = None,
  align_corners: bool = False,
  scale_factor: float | None = None,
) -> Array:
  """PyTorch `F.interpolate(x, size | scale_factor, mode='bilinear', align_corners)` on NHWC.

  Pass `size` for `F.interpolate(size=...)` / mmseg's `resize` (align_corners=False) and for
  `nn.UpsamplingBilinear2d(size=...)` (align_corners=True). Pass `scale_factor` to reproduce a
  `scale_factor=` call: the output size is floor(in * scale_factor) and, when align_corners is
  False, PyTorch maps coordinates with 1 / scale_factor rather than in / out.
  """
  if (size is None) == (scale_factor is None):
    raise ValueError("resize_bilinear: give exactly one of size and scale_factor")
  if size is None:
    size = (int(math.floor(x.shape[1] * scale_factor)), int(math.floor(x.shape[2] * scale_factor)))
  # jax.image.resize has no align_corners=True mode and differs from PyTorch for scale_factor
  # calls, so both are done by hand with PyTorch's own index arithmetic.
  x = _resize_axis(x, 1, size[0], align_corners, scale_factor)
  return _resize_axis(x, 2, size[1], align_corners, scale_factor)


# ----------------------------------------------------------------------------------------------
# Adaptive pooling.


def adaptive_bins(in_size: int, out_size: int) -> list:
  """PyTorch's adaptive pooling bins: [floor(i * in / out), ceil((i + 1) * in / out))."""
  return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)) for i in range(out_size)]


def _avg_matrix(in_size: int, out_size: int) -> np.ndarray:
  m = np.zeros((out_size, in_size), np.float32)
  for i, (s, e) in enumerate(adaptive_bins(in_size, out_size)):
    m[i, s:e] = 1.0 / (e - s)
  return m


def adaptive_avg_pool(x: Array, output_size: int | tuple[int, int]) -> Array:
  """`nn.AdaptiveAvgPool2d(output_size)` on NHWC, computed in float32."""
  oh, ow = _pair(output_size)
  xf = x.astype(jnp.float32)
  if (oh, ow) == (1, 1):
    return jnp.mean(xf, axis=(1, 2), keepdims=True).astype(x.dtype)
  mh = jnp.asarray(_avg_matrix(x.shape[1], oh))
  mw = jnp.asarray(_avg_matrix(x.shape[2], ow))
  # Bins overlap for non-divisible sizes, so pooling is a (separable) averaging matrix.
  y = jnp.einsum("bhwc,oh,pw->bopc", xf, mh, mw, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def adaptive_max_pool(x: Array, output_size: int | tuple[int, int]) -> Array:
  """`nn.AdaptiveMaxPool2d(output_size)` on NHWC."""
  oh, ow = _pair(output_size)
  if (oh, ow) == (1, 1):
    return jnp.max(x, axis=(1, 2), keepdims=True)
  rows = []
  for hs, he in adaptive_bins(x.shape[1], oh):
    cols = [jnp.max(x[:, hs:he, ws:we], axis=(1, 2)) for ws, we in adaptive_bins(x.shape[2], ow)]
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


def max_pool_2x2(x: Array) -> Array:
  """`nn.MaxPool2d(2, 2)` (floor mode, no padding) on NHWC."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
