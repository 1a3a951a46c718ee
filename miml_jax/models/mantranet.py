"""ManTra-Net (Wu, AbdAlmageed, Natarajan, CVPR 2019) in flax, restated from the official Keras
source (ISICV/ManTraNet, src/modelCore.py: `create_model` and `create_featex_vgg16_base` are the
authority) with its parameters named as the released .h5 files name them.

Fully convolutional at full resolution: every conv is stride 1, and the Featex convs pad
symmetrically (numpy/TF 'symmetric': the edge pixel repeated) and then convolve 'valid', as the
official Conv2DSymPadding does; the 1x1 `outlierTrans`, the ConvLSTM and the `pred` conv pad
with zeros ('same'), as their Keras layers do. Input: any H x W; the task's ImageNet-normalised
image is mapped back to RGB in [-1, 1] (the official demo's rgb / 255 * 2 - 1).

* `Featex` (the manipulation-trace feature extractor), `featex_type` 0..3 as the official
  `type`: block 1 is a combined 5x5 conv (`b1c1`, ReLU, no bias) of F filters, F = 32 for
  types 0/1 and 16 for 2/3: F - 12 regular kernels, the 9 fixed SRM kernels (3 kernels x one
  input channel each) and 3 Bayar-constrained kernels, concatenated in that order; then
  `b1c2` 3x3 x base; block 2: 2 x (3x3, 2 base); block 3: 3 x (3x3, 4 base); block 4:
  3 x (3x3, 8 base); block 5: 2 x (3x3, 8 base); all ReLU with bias; `transform` 3x3 x 8 base
  (tanh for type 0, linear otherwise); L2 normalisation over channels. base = 32 officially.
* The anomaly detector: `outlierTrans` 1x1 conv -> `features` (64) without bias, its filters
  kept at unit norm; `bnorm` BatchNorm without centre or scale (Keras' eps 1e-3, momentum
  0.99; running statistics at eval); Z-pooling: for each window of `windows` (7/15/31 for
  Ptrain4, 7/15/31/63 for Ptrain0-3) the local mean over the window's in-image pixels (the
  official integral image divides by the in-image count), then the global mean; each deviation
  (mean - x) divided by the per-sample, per-channel global std floored at 1e-6 + `glbStd`'s
  learnable `min_std` (init 1e-5, kept >= 0), absolute value: a sequence of len(windows) + 1
  maps; `cLSTM`, a ConvLSTM (8 filters, 7x7, tanh, hard-sigmoid gates; Keras' fused kernel
  layout and gate order i, f, c, o) over it, keeping its last hidden state; `pred` 7x7 conv
  -> 1. The official output is sigmoid(pred); here the model returns the logit (see below).

The Keras constraints (Bayar's on `bayar_kernel`, unit_norm on `outlierTrans`, non_neg on
`min_std`) are applied after every optimiser update, as Keras applies constraints, through
`project` (registered as the model's projection, reached by the task's `Task.project`); like
Keras, the initial weights are not projected.

Output: {'logits': (B, H, W, 2) = [0, z]} where z is `pred`'s logit: the segmentation task
expects two-class logits, and softmax([0, z])[1] = sigmoid(z), so its CE is exactly the binary
cross-entropy on z, computed from log-softmax (numerically stable), and its prediction
(logit_1 - logit_0) is z. There is no image head.

Parameter count (Ptrain4: type 2, windows 7/15/31): 3,675,181 in Featex and 3,805,078 in all,
the published Keras count, which includes `bnorm`'s 128 moving statistics (flax keeps them in
`batch_stats`, not `params`); the SRM kernels are constants, not parameters, as in Keras.
Converting the released weights: `miml-jax convert ManTraNet_Ptrain4.h5 --config
experiments/mantranet.py --out mantranet.msgpack` (KERAS_LAYOUT below, keras_h5.py).
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.models import keras_h5, noise
from miml_jax.models.common import as_dict, resolve_dtype

# GlobalStd2D: std floor = min_std_val / 10 + min_std, min_std initialised to min_std_val.
MIN_STD_VALUE = 1e-5
_FEATEX_BLOCKS = (  # (layer name, multiple of base) after b1c1, in order.
  ("b1c2", 1),
  ("b2c1", 2),
  ("b2c2", 2),
  ("b3c1", 4),
  ("b3c2", 4),
  ("b3c3", 4),
  ("b4c1", 8),
  ("b4c2", 8),
  ("b4c3", 8),
  ("b5c1", 8),
  ("b5c2", 8),
)


def _odd_windows(value) -> str | None:
  if not value or any(int(w) != w or w < 1 or w % 2 == 0 for w in value):
    # The official integral-image indexing only lines up for an odd largest window; all odd
    # keeps every window centred on its pixel.
    return f"expected one or more odd window sizes >= 1, got {value!r}"
  return None


@dataclasses.dataclass(frozen=True)
class ManTraNetConfig:
  """The `model` section of ManTra-Net (besides name and dtype); defaults are Ptrain4's."""

  # The official Featex `type`: 0 (32 first-block filters, tanh transform), 1 (32, linear),
  # 2 and 3 (16, linear). Ptrain0 / 1 / 2 / 3 / 4 use types 0 / 1 / 2 / 3 / 2.
  featex_type: int = config_lib.setting(2, choices=(0, 1, 2, 3))
  # Z-pooling windows (odd): Ptrain4 (7, 15, 31); Ptrain0-3 (7, 15, 31, 63).
  windows: tuple[int, ...] = config_lib.setting((7, 15, 31), check=_odd_windows)
  # Featex width: block k has base * (1, 2, 4, 8, 8)[k - 1] filters (official 32).
  base: int = config_lib.setting(32, ge=1)
  # outlierTrans filters (official 64) and ConvLSTM filters (official 8).
  features: int = config_lib.setting(64, ge=1)
  lstm_filters: int = config_lib.setting(8, ge=1)


def srm_kernel() -> np.ndarray:
  """The 9 fixed SRM kernels (noise.SRM_KERNELS) as one (5, 5, 3, 9) HWIO kernel: kernel k of
  (K1, K2, K3) on input channel c is output k * 3 + c (the official order)."""
  out = np.zeros((5, 5, 3, 9), np.float32)
  for k, kernel in enumerate(noise.SRM_KERNELS):
    for c in range(3):
      out[:, :, c, k * 3 + c] = kernel
  return out


def unit_norm(w: jax.Array, axis: int = -2) -> jax.Array:
  """Keras' unit_norm constraint: w / (K.epsilon() + ||w|| over `axis`)."""
  return w / (noise.KERAS_EPSILON + jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True)))


def project(model_config: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """The Keras constraints, applied after every optimiser update (ModelSpec.project)."""
  del model_config  # The same three constraints for every configuration.
  params = dict(params)
  featex = dict(params["Featex"])
  b1c1 = dict(featex["b1c1"])
  b1c1["bayar_kernel"] = noise.bayar_project(b1c1["bayar_kernel"])
  featex["b1c1"] = b1c1
  params["Featex"] = featex
  params["outlierTrans"] = {"kernel": unit_norm(params["outlierTrans"]["kernel"])}
  # Keras' non_neg multiplies by (w >= 0): the same as max(w, 0).
  params["glbStd"] = {"min_std": jnp.maximum(params["glbStd"]["min_std"], 0)}
  return params


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """Keras' hard_sigmoid (the TF backend's): clip(0.2 x + 0.5, 0, 1)."""
  return jnp.clip(0.2 * x + 0.5, 0.0, 1.0)


def _conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _symmetric_pad(x: jax.Array, size: int) -> jax.Array:
  half = size // 2
  return jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)), mode="symmetric")


class SymConv(nn.Module):
  """Conv2DSymPadding: symmetric padding by kernel // 2, then a 'valid' stride-1 conv."""

  features: int
  size: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.size
    # Keras' default initialisers: glorot_uniform kernel, zero bias.
    kernel = self.param(
      "kernel", nn.initializers.glorot_uniform(), (k, k, x.shape[-1], self.features)
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x = _symmetric_pad(x.astype(self.dtype), k)
    return _conv(x, kernel.astype(self.dtype), "VALID") + bias.astype(self.dtype)


class CombinedConv(nn.Module):
  """b1c1: [regular (filters - 12), SRM (9, fixed), Bayar (3)] 5x5 kernels, no bias."""

  filters: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.glorot_uniform()
    in_chans = x.shape[-1]
    if in_chans != 3:
      raise UserInputError(f"mantranet: b1c1's SRM kernels need RGB input, got {in_chans}")
    kernels = []
    if self.filters - 12 >= 1:
      kernels.append(self.param("regular_kernel", init, (5, 5, in_chans, self.filters - 12)))
    kernels.append(jnp.asarray(srm_kernel()))
    kernels.append(self.param("bayar_kernel", init, (5, 5, in_chans, 3)))
    kernel = jnp.concatenate([k.astype(self.dtype) for k in kernels], axis=-1)
    return _conv(_symmetric_pad(x.astype(self.dtype), 5), kernel, "VALID")


class Featex(nn.Module):
  """The manipulation-trace feature extractor: (B, H, W, 3) in [-1, 1] -> L2-normalised
  (B, H, W, 8 base) features."""

  featex_type: int = 2
  base: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    first = 32 if self.featex_type in (0, 1) else 16
    x = nn.relu(CombinedConv(first, dtype=self.dtype, name="b1c1")(x))
    for name, multiple in _FEATEX_BLOCKS:
      x = nn.relu(SymConv(self.base * multiple, dtype=self.dtype, name=name)(x))
    x = SymConv(self.base * 8, dtype=self.dtype, name="transform")(x)
    if self.featex_type == 0:
      x = jnp.tanh(x)
    x = x.astype(jnp.float32)
    # K.l2_normalize: x / sqrt(max(sum x^2, 1e-12)).
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))


def _box_sum(x: jax.Array, size: int, axis: int) -> tuple[jax.Array, np.ndarray]:
  """Sum over the centred window of `size` along `axis`, counting in-image entries only, and
  the count per position: differences of a cumulative sum (the official integral image)."""
  n, half = x.shape[axis], size // 2
  zeros = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
  prefix = jnp.concatenate([zeros, jnp.cumsum(x, axis=axis)], axis=axis)  # P[0..n]
  # Q[k] = P[clip(k - half, 0, n)]: the window of pixel i sums to Q[i + size] - Q[i], and
  # slices (unlike a gather) keep the backward pass cheap.
  widths = [(0, 0)] * x.ndim
  widths[axis] = (half, size - half)
  padded = jnp.pad(prefix, widths, mode="edge")
  high = jax.lax.slice_in_dim(padded, size, size + n, axis=axis)
  total = high - jax.lax.slice_in_dim(padded, 0, n, axis=axis)
  index = np.arange(n)
  count = np.clip(index - half + size, 0, n) - np.clip(index - half, 0, n)
  return total, count.astype(np.float32)


def window_means(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> the mean over each pixel's size x size window of in-image pixels."""
  rows, row_count = _box_sum(x, size, axis=1)
  sums, col_count = _box_sum(rows, size, axis=2)
  count = row_count[:, None] * col_count[None, :]
  return sums / jnp.asarray(count)[None, :, :, None]


def z_pool(x: jax.Array, windows, min_std: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (T, B, H, W, C): |window mean - x| / floored global std for each window,
  then the same for the global mean (T = len(windows) + 1)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  # Deviations do not change when a constant is subtracted, and the cumulative sums of the
  # centred maps stay small, so float32 keeps the window sums of large images accurate.
  centred = x - mean
  variance = jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True)
  floor = MIN_STD_VALUE / 10 + min_std.astype(jnp.float32)
  # max(std, floor) as sqrt(max(var, floor^2)): the same values (floor > 0), and a finite
  # gradient where the variance is 0 (sqrt's is not).
  std = jnp.sqrt(jnp.maximum(variance, jnp.square(floor)))
  deviations = [window_means(centred, w) - centred for w in windows] + [-centred]
  return jnp.stack([jnp.abs(d / std) for d in deviations])


class ConvLSTM(nn.Module):
  """Keras' ConvLSTM2D (return_sequences=False): 'same' convs, tanh, hard-sigmoid gates; the
  kernel (kh, kw, in, 4 f) and recurrent kernel (kh, kw, f, 4 f) hold the gates i, f, c, o in
  that order; the bias (4 f) starts at 1 for the forget gate (unit_forget_bias)."""

  filters: int = 8
  size: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, sequence):  # (T, B, H, W, C) -> (B, H, W, filters)
    f, k = self.filters, self.size
    kernel = self.param(
      "kernel", nn.initializers.glorot_uniform(), (k, k, sequence.shape[-1], 4 * f)
    )
    recurrent = self.param("recurrent_kernel", _keras_orthogonal, (k, k, f, 4 * f))
    bias = self.param("bias", lambda _, s: jnp.zeros(s).at[f : 2 * f].set(1.0), (4 * f,))
    kernel, recurrent = kernel.astype(self.dtype), recurrent.astype(self.dtype)
    steps, batch, height, width, _ = sequence.shape
    # The input convs of every step at once (they do not depend on the state).
    inputs = _conv(
      sequence.reshape(steps * batch, height, width, -1).astype(self.dtype), kernel, "SAME"
    )
    inputs = inputs.reshape(steps, batch, height, width, 4 * f).astype(jnp.float32) + bias
    h = jnp.zeros((batch, height, width, f), jnp.float32)
    c = h
    for t in range(steps):
      z = inputs[t] + _conv(h.astype(self.dtype), recurrent, "SAME").astype(jnp.float32)
      i, g_f, g_c, o = jnp.split(z, 4, axis=-1)
      c = hard_sigmoid(g_f) * c + hard_sigmoid(i) * jnp.tanh(g_c)
      h = hard_sigmoid(o) * jnp.tanh(c)
    return h


def _keras_orthogonal(key, shape, dtype=jnp.float32):
  """Keras' orthogonal initialiser of a conv kernel: rows = prod(shape[:-1])."""
  flat = nn.initializers.orthogonal()(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
  return flat.reshape(shape)


class ManTraNet(nn.Module):
  featex_type: int = 2
  windows: tuple[int, ...] = (7, 15, 31)
  base: int = 32
  features: int = 64
  lstm_filters: int = 8
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, model_config) -> "ManTraNet":
    cfg = as_dict(model_config)
    settings = {k: v for k, v in cfg.items() if k not in ("name", "dtype")}
    parsed = config_lib.settings_from_config(ManTraNetConfig, settings, "model")
    return cls(
      featex_type=parsed.featex_type,
      windows=tuple(int(w) for w in parsed.windows),
      base=parsed.base,
      features=parsed.features,
      lstm_filters=parsed.lstm_filters,
      dtype=resolve_dtype(cfg.get("dtype", "float32")),
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise UserInputError(f"mantranet: expected (B, H, W, 3) images, got {tuple(x.shape)}")
    # The task's ImageNet normalisation undone, then the official rgb / 255 * 2 - 1.
    rgb = transforms.denormalize(x) / 255 * 2 - 1
    features = Featex(self.featex_type, self.base, self.dtype, name="Featex")(rgb)
    features = nn.Conv(
      self.features,
      (1, 1),
      use_bias=False,
      kernel_init=nn.initializers.glorot_uniform(),
      dtype=self.dtype,
      name="outlierTrans",
    )(features)
    normed = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.99,
      epsilon=1e-3,
      use_bias=False,
      use_scale=False,
      dtype=jnp.float32,
      name="bnorm",
    )(features.astype(jnp.float32))
    min_std = GlobalStd(name="glbStd")(normed)
    sequence = z_pool(normed, self.windows, min_std)
    state = ConvLSTM(self.lstm_filters, dtype=self.dtype, name="cLSTM")(sequence)
    logit = nn.Conv(
      1, (7, 7), padding="SAME", kernel_init=nn.initializers.glorot_uniform(), name="pred"
    )(state)
    logit = logit.astype(jnp.float32)
    return {"logits": jnp.concatenate([jnp.zeros_like(logit), logit], axis=-1)}


class GlobalStd(nn.Module):
  """GlobalStd2D's weight: the learnable part of the std floor, (1, 1, 1, C), init 1e-5."""

  @nn.compact
  def __call__(self, x):
    return self.param("min_std", nn.initializers.constant(MIN_STD_VALUE), (1, 1, 1, x.shape[-1]))


# The released .h5 files' weight names (Keras 2.2, TF 1.8; the Featex model is one layer whose
# weights are named by its inner layers) -> flax paths. Every Featex type and window list has
# these names (type 0/1 only differ in shapes).
_KERAS_NAMES = {
  "b1c1/regular_kernel": "params/Featex/b1c1/regular_kernel",
  "b1c1/bayar_kernel": "params/Featex/b1c1/bayar_kernel",
  **{
    f"{layer}/{leaf}": f"params/Featex/{layer}/{leaf}"
    for layer in [name for name, _ in _FEATEX_BLOCKS] + ["transform"]
    for leaf in ("kernel", "bias")
  },
  "outlierTrans/kernel": "params/outlierTrans/kernel",
  "bnorm/moving_mean": "batch_stats/bnorm/mean",
  "bnorm/moving_variance": "batch_stats/bnorm/var",
  "glbStd/min_std": "params/glbStd/min_std",
  "cLSTM/kernel": "params/cLSTM/kernel",
  "cLSTM/recurrent_kernel": "params/cLSTM/recurrent_kernel",
  "cLSTM/bias": "params/cLSTM/bias",
  "pred/kernel": "params/pred/kernel",
  "pred/bias": "params/pred/bias",
}
KERAS_LAYOUT = keras_h5.KerasLayout("mantranet", _KERAS_NAMES)
keras_h5.register_layout(KERAS_LAYOUT)
