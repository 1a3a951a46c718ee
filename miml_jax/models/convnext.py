"""ConvNeXt backbone (Liu et al., 2022) as the mmseg backbone used by APSC-Net, in NHWC.

Returns the four stage outputs (strides 4, 8, 16, 32), each after its own `norm{i}` LayerNorm,
like the mmseg `ConvNeXt` of the FAIR semantic-segmentation code: stem conv 4x4/4 + LN;
downsampling LN + conv 2x2/2; blocks dwconv 7x7 (pad 3) -> LN -> Linear 4x -> exact GELU ->
Linear -> layer scale `gamma` -> stochastic depth + residual. LayerNorm eps is 1e-6 throughout.

Parameter names follow the torch state_dict 1:1 (numeric Sequential / ModuleList indices joined
to the previous name with '_'): `downsample_layers.0.0.weight` -> `downsample_layers_0_0/kernel`
(stem conv), `downsample_layers.0.1` is the stem LN, `downsample_layers.{i}.0` / `.1` the LN / conv
of a downsampling layer, `stages.2.11.dwconv.weight` -> `stages_2_11/dwconv/kernel`,
`stages.2.11.gamma` -> `stages_2_11/gamma`, `norm3.weight` -> `norm3/scale`; Linear layers
(`pwconv1`, `pwconv2`) are `nn.Dense`.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import layers

Array = jax.Array
Dtype = Any

# (dims, depths) of the published ConvNeXt sizes.
CONVNEXT_PRESETS = {
  "tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
  "small": ((96, 192, 384, 768), (3, 3, 27, 3)),
  "base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
  "large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
  "xlarge": ((256, 512, 1024, 2048), (3, 3, 27, 3)),
}

# ConvNeXt is trained from scratch with trunc_normal(0.02) weights and zero biases (the FAIR
# init); the mmseg copy leaves torch defaults, but its weights are always loaded from a checkpoint.
_kernel_init = nn.initializers.truncated_normal(stddev=0.02)
_bias_init = nn.initializers.zeros


class Block(nn.Module):
  """ConvNeXt block: dwconv -> LN -> Dense 4x -> GELU -> Dense -> gamma -> drop path + residual."""

  dim: int
  drop_path: float = 0.0
  layer_scale_init_value: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    shortcut = x
    x = layers.conv2d(
      self.dim,
      7,
      padding=3,
      groups=self.dim,
      in_features=self.dim,
      kernel_init=_kernel_init,
      bias_init=_bias_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="dwconv",
    )(x)
    x = layers.layer_norm("norm", 1e-6, self.dtype, self.param_dtype)(x)
    x = nn.Dense(
      4 * self.dim,
      kernel_init=_kernel_init,
      bias_init=_bias_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dot_general=layers.dense_dot_general(self.dtype),
      name="pwconv1",
    )(x)
    # PyTorch's nn.GELU is the exact erf form; flax defaults to the tanh approximation.
    x = nn.gelu(x, approximate=False)
    x = nn.Dense(
      self.dim,
      kernel_init=_kernel_init,
      bias_init=_bias_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dot_general=layers.dense_dot_general(self.dtype),
      name="pwconv2",
    )(x)
    if self.layer_scale_init_value > 0:
      gamma = self.param(
        "gamma",
        nn.initializers.constant(self.layer_scale_init_value),
        (self.dim,),
        self.param_dtype,
      )
      x = x * gamma.astype(x.dtype)
    x = layers.DropPath(self.drop_path)(x, deterministic=not train)
    return shortcut + x


class ConvNeXt(nn.Module):
  """The ConvNeXt backbone; `__call__(x, train)` returns the tuple of `out_indices` features.

  Attributes:
    dims: channels of the four stages.
    depths: blocks per stage.
    in_chans: input channels (3 for RGB; 6 or 9 for stacked inputs).
    drop_path_rate: stochastic-depth rate of the last block (linear from 0 over all blocks).
    layer_scale_init_value: initial `gamma`; <= 0 disables layer scale (no `gamma` param).
    out_indices: stages whose (normalised) output is returned. The torch model builds `norm{i}`
      for all four stages; here a norm exists only for the stages in `out_indices`.
  """

  dims: Sequence[int] = CONVNEXT_PRESETS["tiny"][0]
  depths: Sequence[int] = CONVNEXT_PRESETS["tiny"][1]
  in_chans: int = 3
  drop_path_rate: float = 0.0
  layer_scale_init_value: float = 1.0
  out_indices: Sequence[int] = (0, 1, 2, 3)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> tuple[Array, ...]:
    if len(self.dims) != 4 or len(self.depths) != 4:
      raise UserInputError(
        f"ConvNeXt: dims {tuple(self.dims)} and depths {tuple(self.depths)} "
        "must both have 4 entries"
      )
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise ValueError(f"ConvNeXt: expected (B, H, W, {self.in_chans}) input, got {x.shape}")
    kw = dict(
      kernel_init=_kernel_init, bias_init=_bias_init, dtype=self.dtype, param_dtype=self.param_dtype
    )
    x = x.astype(self.dtype)
    total = sum(self.depths)
    # torch.linspace(0, rate, total): the per-block drop-path rates.
    rates = [self.drop_path_rate * j / (total - 1) if total > 1 else 0.0 for j in range(total)]
    outs = []
    cur = 0
    for i in range(4):
      if i == 0:
        x = layers.conv2d(
          self.dims[0], 4, stride=4, in_features=self.in_chans, name="downsample_layers_0_0", **kw
        )(x)
        x = layers.layer_norm("downsample_layers_0_1", 1e-6, self.dtype, self.param_dtype)(x)
      else:
        x = layers.layer_norm(f"downsample_layers_{i}_0", 1e-6, self.dtype, self.param_dtype)(x)
        x = layers.conv2d(
          self.dims[i],
          2,
          stride=2,
          in_features=self.dims[i - 1],
          name=f"downsample_layers_{i}_1",
          **kw,
        )(x)
      for j in range(self.depths[i]):
        x = Block(
          self.dims[i],
          rates[cur + j],
          self.layer_scale_init_value,
          self.dtype,
          self.param_dtype,
          name=f"stages_{i}_{j}",
        )(x, train)
      cur += self.depths[i]
      if i in self.out_indices:
        outs.append(layers.layer_norm(f"norm{i}", 1e-6, self.dtype, self.param_dtype)(x))
    return tuple(outs)


def convnext_dims_depths(
  preset=None, dims=None, depths=None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Resolves a preset name and/or explicit dims/depths into (dims, depths) tuples."""
  if preset is not None:
    if preset not in CONVNEXT_PRESETS:
      raise UserInputError(
        f"model.backbone.preset: unknown ConvNeXt preset {preset!r}; "
        f"choose one of {sorted(CONVNEXT_PRESETS)}"
      )
    p_dims, p_depths = CONVNEXT_PRESETS[preset]
    for key, given, want in (("dims", dims, p_dims), ("depths", depths, p_depths)):
      if given is not None and tuple(given) != want:
        raise UserInputError(
          f"model.backbone.{key}={tuple(given)} contradicts preset "
          f"{preset!r} ({want}); give one or the other"
        )
    return p_dims, p_depths
  if dims is None or depths is None:
    raise UserInputError("model.backbone: give a preset or both dims and depths")
  return tuple(int(d) for d in dims), tuple(int(d) for d in depths)
