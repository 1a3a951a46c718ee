"""Shared layers for the IML models: mmcv-style conv blocks, PyTorch-exact resizes and pools.

Everything here is NHWC and reproduces the PyTorch operator the official models use, so that
weights imported from a PyTorch checkpoint give the same numbers:

* `ConvModule` is mmcv's conv -> BatchNorm -> ReLU; `DepthwiseSeparableConvModule` is mmcv's
  depthwise ConvModule followed by a pointwise ConvModule.
* `BatchNorm` follows `torch.nn.BatchNorm2d` (eps 1e-5, running statistics updated with
  momentum 0.1 in torch terms, i.e. 0.9 in flax terms, and with the *unbiased* batch variance).
* `resize_bilinear` follows `F.interpolate(mode='bilinear')` for both values of `align_corners`
  and for both `size=` and `scale_factor=` calls (they use different source-coordinate scales).
* `conv2d` builds torch-like convs; stride-1 depthwise and dense convs get a formulation chosen
  per backend (`DepthwiseConv2d`, `TapConv2d`: shifted multiply-adds / per-tap gradients on CPU,
  where XLA's own grouped conv and conv gradients are slow; `lax.conv` on GPU / TPU;
  $MIML_JAX_DEPTHWISE=shift|lax overrides), with the variables of the `nn.Conv` they replace.
* `compiler_options()` is the XLA option set the library's jits compile with: on CPU, dense convs
  on XLA's Eigen kernels instead of YNNPACK's ($MIML_JAX_CPU_CONV=ynnpack restores the default).
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
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax.errors import UserInputError

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
) -> nn.Module:
  """An `nn.Conv` configured like `torch.nn.Conv2d` (explicit symmetric padding, never 'SAME').

  The default initialisers are torch's; `in_features` is only needed for the bias bound.
  A stride-1 depthwise conv (groups == in_features == features) is a `DepthwiseConv2d`, and a
  stride-1 ungrouped conv (1x1 included) a `TapConv2d`: the same variables,
  computed by the backend's fast formulation (see `depthwise_conv2d`, `conv2d_tap_grads`).
  """
  kh, kw = _pair(kernel_size)
  ph, pw = _pair(padding)
  fan_in = (in_features // groups) * kh * kw
  common = dict(
    features=features,
    kernel_size=(kh, kw),
    padding=((ph, ph), (pw, pw)),
    kernel_dilation=_pair(dilation),
    use_bias=use_bias,
    kernel_init=kernel_init or torch_default_kernel_init,
    bias_init=bias_init or torch_default_bias_init(fan_in),
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )
  if _pair(stride) == (1, 1) and groups > 1 and groups == in_features == features:
    return DepthwiseConv2d(**common)
  if _pair(stride) == (1, 1) and groups == 1:
    return TapConv2d(**common)
  return nn.Conv(strides=_pair(stride), feature_group_count=groups, **common)


# ----------------------------------------------------------------------------------------------
# Which library runs XLA:CPU's dense convs.
#
# XLA:CPU hands each dot, convolution and large reduction to YNNPACK ("individual" fusions) and
# runs everything else with its own loops. For the dense 3x3 / 1x1 convs of these heads, XLA's
# Eigen conv is faster than YNNPACK's: UPerNet / APSC-Net's 3x3 2560 -> 512 on 2x32x32 forward
# 220 ms against 146 ms (PyTorch's oneDNN 139 ms), the APSC-Net train step at 256 px 10.3 s
# against 8.9 s, inference 1.19 s against 0.93 s (Intel Xeon, 2 cores; benchmarks/README.md).
# Dots and reductions stay with YNNPACK (without its reductions APSC-Net's BatchNorms take 3 s).
# The choice is a per-compilation XLA option (`jax.jit(..., compiler_options=...)`), so it binds
# only the jits of this library (the trainer's step, Predictor, annotate, bench), never a user's.

CPU_CONV_ENV = "MIML_JAX_CPU_CONV"  # 'eigen' (the default) or 'ynnpack' (XLA's own default).
CPU_CONV_IMPLS = ("eigen", "ynnpack")
_YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_EIGEN_CONV_OPTIONS = {
  _YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


def compiler_options() -> dict[str, str]:
  """XLA options for this library's jits on the default backend: {} except on CPU, where the
  dense convs run on Eigen (see above). Empty when $MIML_JAX_CPU_CONV=ynnpack, when $XLA_FLAGS
  sets the YNNPACK fusion types itself (the user's choice wins), or when this XLA does not know
  the option (other jaxlib versions)."""
  impl = os.environ.get(CPU_CONV_ENV, "") or "eigen"
  if impl not in CPU_CONV_IMPLS:
    raise UserInputError(f"${CPU_CONV_ENV}={impl!r}: choose one of {CPU_CONV_IMPLS}")
  if impl == "ynnpack" or jax.default_backend() != "cpu":
    return {}
  if _YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
    return {}
  return dict(_EIGEN_CONV_OPTIONS) if _xla_accepts_eigen_conv_options() else {}


@functools.cache
def _xla_accepts_eigen_conv_options() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=_EIGEN_CONV_OPTIONS).lower(jnp.zeros(2)).compile()
  except Exception:  # An XLA that rejects the option: run without it.
    return False
  return True


# ----------------------------------------------------------------------------------------------
# Depthwise convolution.
#
# XLA:CPU lowers a grouped conv_general_dilated with one channel per group to a slow generic
# loop (a 7x7 depthwise conv on 4x64x64x96 takes ~0.15 s forward and ~0.6 s forward + backward,
# against ~6 ms / ~45 ms in PyTorch). The same conv written as kh * kw shifted multiply-adds is
# one fused elementwise loop on CPU. On GPU (cuDNN) and TPU the library conv is the fast one.
# So the formulation is chosen per backend, and both compute the same sums (to float rounding).

DEPTHWISE_IMPLS = ("auto", "shift", "lax")
# Overrides the per-backend choice everywhere (benchmarks, A/B checks): 'shift' or 'lax'.
DEPTHWISE_ENV = "MIML_JAX_DEPTHWISE"


# 'auto' on CPU keeps the library conv only for maps that are both narrow (under
# SHIFT_MIN_CHANNELS channels) and small (under SHIFT_MIN_ELEMENTS values per example, H x W x C):
# the toy widths of tests, where the unrolled taps of the shifted forms would cost more compile
# time (about 0.5 s per conv) than they save. XLA:CPU's grouped conv costs grow with the number of
# groups, so any real width gains: a 7x7 depthwise conv on 4x4x4x768 (ConvNeXt-T's last stage at
# 128 px) takes 20 ms forward / 160 ms with its gradients as a grouped conv, 0.4 / 3 ms shifted.
SHIFT_MIN_ELEMENTS = 1 << 16
SHIFT_MIN_CHANNELS = 64


def depthwise_impl(impl: str = "auto", shape: Sequence[int] | None = None) -> str:
  """The formulation the convs use: 'shift' or 'lax' ('auto': per backend and, with `shape`
  (H, W, C) of one example, per size; $MIML_JAX_DEPTHWISE overrides both)."""
  if impl == "auto":
    impl = os.environ.get(DEPTHWISE_ENV, "") or "auto"
  if impl not in DEPTHWISE_IMPLS:
    raise UserInputError(
      f"depthwise conv formulation {impl!r} (${DEPTHWISE_ENV} or impl=): "
      f"choose one of {DEPTHWISE_IMPLS}"
    )
  if impl == "auto":
    toy = (
      shape is not None and shape[-1] < SHIFT_MIN_CHANNELS and math.prod(shape) < SHIFT_MIN_ELEMENTS
    )
    return "shift" if jax.default_backend() == "cpu" and not toy else "lax"
  return impl


def _pad_hw(x: Array, padding) -> Array:
  """x (B, H, W, C) padded with zeros by ((top, bottom), (left, right)); negative entries crop."""
  (t, b), (lft, r) = padding
  return jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (t, b, 0), (lft, r, 0), (0, 0, 0)))


def _tap_windows(x: Array, kh: int, kw: int, padding, dilation) -> list[Array]:
  """The windows of the padded x that the kh x kw taps of a stride-1 conv read, row by row:
  window (p, q) is xp[:, p*dh : p*dh + Ho, q*dw : q*dw + Wo] (each of the output's size)."""
  dh, dw = dilation
  xp = _pad_hw(x, padding)
  ho = xp.shape[1] - (kh - 1) * dh
  wo = xp.shape[2] - (kw - 1) * dw
  return [
    xp[:, p * dh : p * dh + ho, q * dw : q * dw + wo, :] for p in range(kh) for q in range(kw)
  ]


def _shift_conv(x: Array, kernel: Array, padding, dilation) -> Array:
  """Depthwise cross-correlation as kh * kw shifted multiply-adds, accumulated in float32.

  x: (B, H, W, C); kernel: (kh, kw, C). padding: ((lo, hi), (lo, hi)), negative entries crop.
  """
  kh, kw, c = kernel.shape
  taps = kernel.astype(jnp.float32).reshape(kh * kw, c)
  acc = None
  for window, k in zip(_tap_windows(x, kh, kw, padding, dilation), taps):
    term = window.astype(jnp.float32) * k
    acc = term if acc is None else acc + term
  return acc


# Rows of the output per step of the kernel-gradient loop: a block of x rows and of dy rows that
# stays in cache while all kh * kw products are summed (~100 KB of dy per block).
_DW_BLOCK_BYTES = 1 << 17


def _shift_kernel_grad(xp: Array, dy: Array, kh: int, kw: int, dilation) -> Array:
  """d(loss)/d(kernel) of `_shift_conv`: kernel[p, q, c] = sum xp[b, i + p dh, j + q dw, c] dy.

  One pass over the whole tensors per tap (kh * kw passes) is memory-bound and slow; instead a
  loop over blocks of output rows sums all taps of a block while it is in cache. The kernel rows
  are an inner loop (its columns unrolled): unrolling all kh * kw taps compiles 4x slower for
  no faster code.
  """
  dh, dw = dilation
  bsz, ho, wo, c = dy.shape
  rows = max(1, min(ho, _DW_BLOCK_BYTES // max(1, wo * c * 4)))
  nblk = -(-ho // rows)
  extra = nblk * rows - ho
  # Zero rows of dy (and matching x rows) round the height up to whole blocks; they add 0.
  dy = jnp.pad(dy.astype(jnp.float32), ((0, 0), (0, extra), (0, 0), (0, 0)))
  xp = jnp.pad(xp.astype(jnp.float32), ((0, 0), (0, extra), (0, 0), (0, 0)))

  def block(acc, t):
    b, i0 = t // nblk, (t % nblk) * rows
    ds = jax.lax.dynamic_slice(dy, (b, i0, 0, 0), (1, rows, wo, c))[0]

    def kernel_row(p, acc):
      # Only the rows kernel row p reads: with a large dilation (APSC-Net's ASPP, 36) one
      # slice spanning all kernel rows would copy ~(kh - 1) * dh rows per block.
      xr = jax.lax.dynamic_slice(xp, (b, i0 + p * dh, 0, 0), (1, rows, xp.shape[2], c))[0]
      taps = [jnp.sum(xr[:, q * dw : q * dw + wo] * ds, axis=(0, 1)) for q in range(kw)]
      return acc.at[p].add(jnp.stack(taps))

    return jax.lax.fori_loop(0, kh, kernel_row, acc), None

  acc, _ = jax.lax.scan(block, jnp.zeros((kh, kw, c), jnp.float32), jnp.arange(bsz * nblk))
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shift_depthwise(x: Array, kernel: Array, padding, dilation) -> Array:
  return _shift_conv(x, kernel, padding, dilation)


def _shift_depthwise_fwd(x, kernel, padding, dilation):
  return _shift_conv(x, kernel, padding, dilation), (x, kernel)


def _shift_depthwise_bwd(padding, dilation, residuals, dy):
  x, kernel = residuals
  kh, kw, _ = kernel.shape
  dh, dw = dilation
  (t, b), (lft, r) = padding
  # d/dx is the same conv of dy with the flipped kernel, padded so that the output has x's size:
  # (k - 1) * d - pad on each side (negative values crop).
  pad_t = ((kh - 1) * dh - t, (kh - 1) * dh - b), ((kw - 1) * dw - lft, (kw - 1) * dw - r)
  dx = _shift_conv(dy, kernel[::-1, ::-1], pad_t, dilation).astype(x.dtype)
  dk = _shift_kernel_grad(_pad_hw(x, padding), dy, kh, kw, dilation).astype(kernel.dtype)
  return dx, dk


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


def depthwise_conv2d(
  x: Array,
  kernel: Array,
  padding: Sequence[tuple[int, int]],
  dilation: int | Sequence[int] = 1,
  impl: str = "auto",
) -> Array:
  """Stride-1 depthwise conv, NHWC, kernel HWIO (kh, kw, 1, C) as flax / `conv2d` stores it.

  Equals `lax.conv_general_dilated(..., feature_group_count=C)` (torch's Conv2d with
  groups=C) with explicit `padding` ((top, bottom), (left, right)) and `dilation`. `impl`:
  'shift' (shifted multiply-adds with a custom VJP, float32 accumulation; the fast one on
  CPU), 'lax' (the library conv; fast on GPU / TPU), or 'auto' (the backend's fast one, the
  library conv for toy maps (see SHIFT_MIN_CHANNELS), or $MIML_JAX_DEPTHWISE). The output
  has x's dtype.
  """
  if x.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f"depthwise_conv2d: x {x.shape} and kernel {kernel.shape} do not match")
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  dilation = _pair(dilation)
  if depthwise_impl(impl, x.shape[1:]) == "lax":
    return jax.lax.conv_general_dilated(
      x,
      kernel.astype(x.dtype),
      window_strides=(1, 1),
      padding=padding,
      rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
    )
  return _shift_depthwise(x, kernel[:, :, 0, :], padding, dilation).astype(x.dtype)


class _StrideOneConv(nn.Module):
  """What `DepthwiseConv2d` and `TapConv2d` share: the fields and variables of the `nn.Conv`
  they stand for (`kernel`, then `bias`, created with the same initialisers in the same order,
  so parameter trees, their initial values and checkpoints are unchanged), leading batch dims
  folded into one as nn.Conv does; subclasses give the kernel's shape and the convolution."""

  features: int
  kernel_size: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  kernel_dilation: tuple[int, int] = (1, 1)
  use_bias: bool = True
  kernel_init: Initializer = torch_default_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "auto"

  def kernel_shape(self, in_features: int) -> tuple[int, ...]:
    raise NotImplementedError

  def convolve(self, x: Array, kernel: Array) -> Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = self.kernel_shape(x.shape[-1])
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    lead = x.shape[:-3]
    x = x.astype(self.dtype).reshape((-1,) + x.shape[-3:])
    y = self.convolve(x, kernel.astype(self.dtype))
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y.reshape(lead + y.shape[1:])


class DepthwiseConv2d(_StrideOneConv):
  """A stride-1 depthwise `nn.Conv` (feature_group_count = channels) through `depthwise_conv2d`,
  with its variables (`kernel` (kh, kw, 1, C), `bias` (C,))."""

  def kernel_shape(self, in_features):
    if in_features != self.features:
      raise ValueError(f"DepthwiseConv2d: {in_features} input channels, {self.features} groups")
    return (*self.kernel_size, 1, self.features)

  def convolve(self, x, kernel):
    return depthwise_conv2d(x, kernel, self.padding, self.kernel_dilation, self.impl)


def _lax_conv(x: Array, kernel: Array, padding, dilation) -> Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1, 1),
    padding=padding,
    rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def _is_low_precision(dtype) -> bool:
  return jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(dtype, jnp.floating)


def _copied_transpose(x: Array, axes: Sequence[int]) -> Array:
  """`jnp.transpose(x, axes)` as a copy that XLA keeps, for an operand of a bfloat16 matmul.

  XLA folds a plain transpose into the dot that reads it (a dot contracting other dims), and
  XLA:CPU runs such a bfloat16 dot as a float32 one: (256, 4096) @ (4096, 1024) with the left
  side transposed takes 13 ms, 3 ms with it copied (Intel Xeon with AMX). Through a unit axis
  the transpose is not folded."""
  return jnp.transpose(x[None], (0, *(a + 1 for a in axes)))[0]


def _taps_conv(x: Array, kernel: Array, padding, dilation) -> Array:
  """A stride-1 dense conv as one matmul per tap (the tap's window of x, a (B*H*W, C_in)
  matrix, times kernel[p, q]), accumulated in float32, returned in x's dtype.

  For bfloat16 on CPU: XLA:CPU runs a bfloat16 conv as a float32 one (Eigen or YNNPACK alike),
  but YNNPACK's bfloat16 matmul with float32 output uses the CPU's bfloat16 units. UPerHead's
  3x3 1024 -> 256 conv on 4x32x32: 79 ms as a conv, 43 ms as taps (Intel Xeon with AMX).
  """
  kh, kw, c_in, c_out = kernel.shape
  windows = _tap_windows(x, kh, kw, padding, dilation)
  acc = None
  for window, k in zip(windows, kernel.reshape(kh * kw, c_in, c_out)):
    term = jnp.matmul(window.reshape(-1, c_in), k, preferred_element_type=jnp.float32)
    acc = term if acc is None else acc + term
  return acc.reshape(windows[0].shape[:3] + (c_out,)).astype(x.dtype)


def _cpu_dense_conv(x: Array, kernel: Array, padding, dilation) -> Array:
  # float32: the library conv (on Eigen, see compiler_options); narrower: per-tap matmuls.
  if _is_low_precision(x.dtype):
    return _taps_conv(x, kernel, padding, dilation)
  return _lax_conv(x, kernel, padding, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_grads(x: Array, kernel: Array, padding, dilation) -> Array:
  return _cpu_dense_conv(x, kernel, padding, dilation)


def _conv_tap_grads_fwd(x, kernel, padding, dilation):
  return _cpu_dense_conv(x, kernel, padding, dilation), (x, kernel)


def _conv_tap_grads_bwd(padding, dilation, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  dh, dw = dilation
  (t, b), (lft, r) = padding
  # d/dx: a forward conv of dy with the flipped kernel, its in / out swapped, padded so that the
  # output has x's size ((k - 1) * d - pad each side; lax.pad crops where that is negative).
  grow = ((kh - 1) * dh - t, (kh - 1) * dh - b), ((kw - 1) * dw - lft, (kw - 1) * dw - r)
  dyp = _pad_hw(dy, grow)
  flipped = _copied_transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  dx = _cpu_dense_conv(dyp, flipped, ((0, 0), (0, 0)), dilation).astype(x.dtype)
  # d/dkernel: one matmul per tap, dy^T (made once) times the tap's window of x as a (B*H*W, C)
  # matrix. Written as window^T dy, XLA:CPU would copy every window transposed (2.2x slower).
  c_in, c_out = kernel.shape[2:]
  dy_t = _copied_transpose(dy.reshape(-1, c_out), (1, 0))
  taps = [
    jnp.matmul(dy_t, window.reshape(-1, c_in), preferred_element_type=jnp.float32)
    for window in _tap_windows(x, kh, kw, padding, dilation)
  ]
  dk = jnp.stack(taps).transpose(0, 2, 1).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dk


_conv_tap_grads.defvjp(_conv_tap_grads_fwd, _conv_tap_grads_bwd)


def conv2d_tap_grads(
  x: Array, kernel: Array, padding: Sequence[tuple[int, int]], dilation: int | Sequence[int] = 1
) -> Array:
  """A stride-1 dense conv (NHWC, HWIO kernel) whose gradients XLA:CPU runs fast.

  The forward is `lax.conv_general_dilated` with explicit padding and rhs dilation (in
  bfloat16 / float16: one matmul per tap summed in float32, `_taps_conv`). The gradients are
  written out (a custom VJP): the input gradient as a forward conv of the cotangent with the
  flipped kernel, the kernel gradient as one matmul per tap. XLA:CPU runs its own
  kernel-gradient conv slowly: for UPerHead's 3x3 1024 -> 256 on 4x32x32, 333 ms against
  124 ms as taps.
  """
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_tap_grads(x, kernel, padding, _pair(dilation))


class TapConv2d(_StrideOneConv):
  """A stride-1, ungrouped `nn.Conv` (1x1 included), with its variables (`kernel` (kh, kw, in,
  out), `bias` (out,)), whose CPU formulation is `conv2d_tap_grads`. On other backends, or
  with $MIML_JAX_DEPTHWISE=lax (the same switch as the depthwise convs), it is `lax.conv`."""

  def kernel_shape(self, in_features):
    return (*self.kernel_size, in_features, self.features)

  def convolve(self, x, kernel):
    if depthwise_impl(self.impl, x.shape[1:]) == "shift":
      return conv2d_tap_grads(x, kernel, self.padding, self.kernel_dilation)
    return _lax_conv(x, kernel, self.padding, self.kernel_dilation)


@jax.custom_vjp
def _matmul_float32_sums(x: Array, w: Array) -> Array:
  """x (..., K) @ w (K, N) summed in float32, returned in x's dtype; its gradients alike.

  Autodiff of the float32-output matmul and its cast would hand the backward matmuls a float32
  cotangent, i.e. float32 matmuls, off the bfloat16 units; the gradients written out keep the
  cotangent in x's dtype."""
  return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_float32_sums_fwd(x, w):
  return _matmul_float32_sums(x, w), (x, w)


def _matmul_float32_sums_bwd(residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  # The transposed operands copied (see _copied_transpose). Not (dy^T x)^T: XLA folds that
  # transpose into the dot too, and XLA:CPU then fails at run time ("Unsupported element type
  # for DotThunk::Execute: BF16 x BF16 = F32").
  dx = jnp.matmul(dy, _copied_transpose(w, (1, 0)), preferred_element_type=jnp.float32)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dw = jnp.matmul(_copied_transpose(x2, (1, 0)), dy2, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_float32_sums.defvjp(_matmul_float32_sums_fwd, _matmul_float32_sums_bwd)


def _float32_accumulating_dot_general(
  lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
):
  dense_form = (((lhs.ndim - 1,), (0,)), ((), ()))
  plain = precision is None and not kwargs and lhs.dtype == rhs.dtype
  if plain and dimension_numbers == dense_form and rhs.ndim == 2:  # what nn.Dense asks for
    return _matmul_float32_sums(lhs, rhs).astype(preferred_element_type or lhs.dtype)
  return jax.lax.dot_general(  # anything else: flax's default
    lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
  )


def dense_dot_general(dtype: Dtype):
  """The `dot_general` an `nn.Dense` computing in `dtype` should use (None: flax's default).

  On CPU, in bfloat16 / float16: accumulate in float32 and cast the result. XLA:CPU runs a
  bfloat16 matmul with bfloat16 output as a float32 one (a 4096^3 matmul: 223 GFLOP/s), but
  with float32 output on the CPU's bfloat16 units (943 GFLOP/s, Intel Xeon with AMX). It is
  also what GPUs and TPUs compute (float32 accumulation), so CPU numerics come closer to
  theirs. Elsewhere, and with $MIML_JAX_DEPTHWISE=lax (the library formulation everywhere),
  flax's default.
  """
  if _is_low_precision(dtype) and depthwise_impl() == "shift":
    return _float32_accumulating_dot_general
  return None


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
    dot_general=dense_dot_general(dtype),
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

  # Forward: two gathers (not a dense interpolation matrix): exact, and O(out) instead of
  # O(in * out). Backward: the gathers' transpose is a scatter-add, which XLA:CPU runs as a
  # serial loop (~2x slower than the whole forward and backward of the matmul form on UPerNet's
  # 32 -> 64 resizes), so the gradient is the transposed interpolation matrix times dy.
  @jax.custom_vjp
  def interpolate(x):
    w = jnp.asarray(w1.reshape(bshape), x.dtype)
    return (
      jnp.take(x, i0, axis=axis) * (jnp.asarray(1.0, x.dtype) - w) + jnp.take(x, i1, axis=axis) * w
    )

  def interpolate_fwd(x):
    return interpolate(x), jnp.zeros((0,), x.dtype)  # only the dtype is needed

  def interpolate_bwd(like, dy):
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    dx = jnp.tensordot(
      dy,
      jnp.asarray(m, dy.dtype),
      axes=([axis], [0]),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
    )
    return (jnp.moveaxis(dx, -1, axis).astype(like.dtype),)

  interpolate.defvjp(interpolate_fwd, interpolate_bwd)
  return interpolate(x)


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
