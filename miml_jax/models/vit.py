"""A plain Vision Transformer with the parameter layout of DINO and DINOv2, returning patch-grid
features of chosen blocks (NHWC).

It restates the ViT of facebookresearch/dino (`vision_transformer.py`) and of
facebookresearch/dinov2 (`DinoVisionTransformer` with its `Block`, `Attention`, `Mlp`,
`LayerScale`, `PatchEmbed`), forward pass and state_dict names alike:

* patch embedding: a p x p conv of stride p (`patch_embed.proj`); pixels past the last whole
  patch are dropped, as DINO's conv drops them (DINOv2 asserts that sides are multiples of p;
  Corr-DINO always feeds multiples);
* a `cls_token` in front, then learned position embeddings `pos_embed` (1, 1 + M*M, D) for the
  pretraining grid M = img_size // p, interpolated to the input's grid as both repositories do:
  torch bicubic (a = -0.75, align_corners=False, no antialias) with scale factors
  ((h + offset) / M, (w + offset) / M), offset 0.1 (`interpolate_offset`; 0 interpolates to the
  size (h, w) instead). Like the official code the table is used as is, without interpolation,
  when the grid has M*M tokens and the input is square in pixels;
* pre-norm blocks: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); attention with a fused
  `qkv` Linear (bias), softmax(q k^T / sqrt(d)), `proj`; MLP fc1 -> exact GELU -> fc2;
  LayerNorm eps 1e-6. LayerScale (`ls1.gamma`, `ls2.gamma`) only for DINOv2 (`layer_scale`
  set: its hub models use init value 1.0); DINO v1 has none;
* a final LayerNorm `norm`; DINOv2 also holds a `mask_token` (1, D), used only by its iBOT
  pretraining: it is kept (so a checkpoint converts strictly) and never read.

`__call__(x, train)` returns one (B, H/p, W/p, D) map per index in `layers` (0-based block
indices, in the order given), each after the final `norm` when `norm_outputs` (as the official
`get_intermediate_layers(norm=True)`). Blocks after the last requested one are not computed;
at initialisation every block and `norm` run, so the parameter tree is always the whole
official one.

Names (naming.py's rule, no extra rule needed): `blocks.3.attn.qkv.weight` ->
`blocks_3/attn/qkv/kernel`, `blocks.3.ls1.gamma` -> `blocks_3/ls1/gamma`,
`blocks.3.norm1.weight` -> `blocks_3/norm1/scale`, `pos_embed` -> `pos_embed`. So the official
hub files `dino_vits16_pretrain.pth` and `dinov2_vits14_pretrain.pth` (the backbone only) map
tensor for tensor.
Register tokens (DINOv2's `*_reg4` checkpoints, which also interpolate with antialias) and
DINOv2's SwiGLU FFN (ViT-g) are not implemented.
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax.errors import UserInputError
from miml_jax.models import layers

Array = jax.Array
Dtype = Any

# (embed_dim, depth, num_heads) of the published sizes (both repositories).
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
# What distinguishes the two weight families: the pretraining image size (it fixes the position
# table), LayerScale's init value (None: no LayerScale), whether a mask_token exists, and the
# patch size of the released checkpoints.
FAMILIES = {
  "dino": dict(img_size=224, layer_scale=None, mask_token=False, patch_size=16),
  "dinov2": dict(img_size=518, layer_scale=1.0, mask_token=True, patch_size=14),
}

# Both repositories initialise Linear weights and the position table with trunc_normal(0.02)
# and zero biases; the patch conv keeps torch's default init. The cls token gets DINO's
# trunc_normal(0.02) for both families (DINOv2 draws normal(1e-6)): a random init only matters
# in tests, real weights always come from a checkpoint.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The ViT's architecture; `from_dict` fills it from a config section (see corr_dino.py)."""

  family: str = "dino"
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  patch_size: int = 16
  img_size: int = 224
  layer_scale: float | None = None
  mask_token: bool = False
  interpolate_offset: float = 0.1
  in_chans: int = 3
  drop_path_rate: float = 0.0

  @classmethod
  def from_dict(cls, d, where: str = "model.backbone") -> "ViTConfig":
    """From {family, size, patch_size, img_size, embed_dim, depth, num_heads, mlp_ratio,
    interpolate_offset, drop_path_rate}: family and size give the defaults, the rest override
    them (tests use tiny dims)."""
    d = dict(d or {})
    known = {
      "family",
      "size",
      "patch_size",
      "img_size",
      "embed_dim",
      "depth",
      "num_heads",
      "mlp_ratio",
      "interpolate_offset",
      "drop_path_rate",
    }
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserInputError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    family = d.pop("family", "dino")
    if family not in FAMILIES:
      raise UserInputError(f"{where}.family: {family!r} is not one of {sorted(FAMILIES)}")
    size = d.pop("size", "small")
    if size not in VIT_SIZES:
      raise UserInputError(f"{where}.size: {size!r} is not one of {sorted(VIT_SIZES)}")
    embed_dim, depth, num_heads = VIT_SIZES[size]
    fam = FAMILIES[family]
    out = cls(
      family=family,
      embed_dim=int(d.pop("embed_dim", embed_dim)),
      depth=int(d.pop("depth", depth)),
      num_heads=int(d.pop("num_heads", num_heads)),
      mlp_ratio=float(d.pop("mlp_ratio", 4.0)),
      patch_size=int(d.pop("patch_size", fam["patch_size"])),
      img_size=int(d.pop("img_size", fam["img_size"])),
      layer_scale=fam["layer_scale"],
      mask_token=fam["mask_token"],
      interpolate_offset=float(d.pop("interpolate_offset", 0.1)),
      drop_path_rate=float(d.pop("drop_path_rate", 0.0)),
    )
    out.check(where)
    return out

  def check(self, where: str = "model.backbone") -> None:
    if self.embed_dim % self.num_heads:
      raise UserInputError(
        f"{where}: embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}"
      )
    if min(self.patch_size, self.depth, self.img_size // self.patch_size) < 1:
      raise UserInputError(
        f"{where}: need patch_size >= 1, depth >= 1 and img_size >= patch_size, got "
        f"patch_size {self.patch_size}, depth {self.depth}, img_size {self.img_size}"
      )
    if not 0 <= self.interpolate_offset < 1:
      raise UserInputError(f"{where}.interpolate_offset: must be in [0, 1)")

  @property
  def native_grid(self) -> int:
    return self.img_size // self.patch_size


# ----------------------------------------------------------------------------------------------
# torch's bicubic interpolation (F.interpolate(mode='bicubic', align_corners=False)).


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """The four tap weights of ATen's cubic convolution at fractional offsets t, (n, 4)."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
  """(out_size, in_size) matrix of torch's 1-D bicubic resampling (align_corners=False).

  ATen's arithmetic in float32: the coordinate scale is 1 / scale_factor when the caller gave
  one, else in / out; the source coordinate (dst + 0.5) * scale - 0.5 is not clamped (cubic),
  its floor is capped at in - 1 and the fraction kept in [0, 1]; the four taps floor - 1 ..
  floor + 2 are clamped to the border (border values repeat).
  """
  f32 = np.float32
  scale = f32(1.0 / scale_factor) if scale_factor else f32(in_size) / f32(out_size)
  src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
  index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  frac = np.clip(src - index.astype(f32), 0.0, 1.0).astype(np.float64)
  weights = _cubic_weights(frac)
  matrix = np.zeros((out_size, in_size), np.float64)
  for k in range(4):
    taps = np.clip(index - 1 + k, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), taps), weights[:, k])
  return matrix.astype(np.float32)


def interpolate_grid(table: Array, grid: int, out_hw: tuple[int, int], offset: float) -> Array:
  """A (grid, grid, D) table resized to out_hw as DINO / DINOv2 resize position embeddings:
  bicubic with scale factors (h + offset) / grid, (w + offset) / grid (offset 0: to the size)."""
  h, w = out_hw
  if offset:
    rows = bicubic_matrix(grid, h, (h + offset) / grid)
    cols = bicubic_matrix(grid, w, (w + offset) / grid)
    # torch's output size is floor(grid * scale): the offset exists to make that h, not h - 1.
    if (
      math.floor(grid * ((h + offset) / grid)) != h or math.floor(grid * ((w + offset) / grid)) != w
    ):
      raise UserInputError(
        f"model.backbone.interpolate_offset={offset}: torch would resize the {grid}x{grid} "
        f"position table to another size than {h}x{w}"
      )
  else:
    rows, cols = bicubic_matrix(grid, h), bicubic_matrix(grid, w)
  rows = jnp.asarray(rows, table.dtype)
  cols = jnp.asarray(cols, table.dtype)
  return jnp.einsum("hi,wj,ijd->hwd", rows, cols, table, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# Modules.


class Attention(nn.Module):
  """Multi-head self-attention with a fused `qkv` Linear and an output `proj`."""

  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, c = x.shape
    dense = dict(
      kernel_init=_trunc_normal,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dot_general=layers.dense_dot_general(self.dtype),
    )
    qkv = nn.Dense(3 * self.dim, name="qkv", **dense)(x)
    # torch's reshape (B, N, 3, heads, head_dim): q, k, v are the thirds of the output, each
    # split into heads in order.
    qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = (c // self.num_heads) ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
    return nn.Dense(self.dim, name="proj", **dense)(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""

  dim: int
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = dict(
      kernel_init=_trunc_normal,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dot_general=layers.dense_dot_general(self.dtype),
    )
    x = nn.Dense(self.hidden, name="fc1", **dense)(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.dim, name="fc2", **dense)(x)


class LayerScale(nn.Module):
  """x * gamma (DINOv2's LayerScale), gamma initialised to `init_value`."""

  dim: int
  init_value: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param(
      "gamma", nn.initializers.constant(self.init_value), (self.dim,), self.param_dtype
    )
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block (children norm1, attn, [ls1], norm2, mlp, [ls2])."""

  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale: float | None = None
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def scaled(y, name):
      if self.layer_scale is None:
        return y
      return LayerScale(self.dim, self.layer_scale, self.param_dtype, name=name)(y)

    drop = layers.DropPath(self.drop_path)
    y = Attention(self.dim, self.num_heads, **kw, name="attn")(layers.layer_norm("norm1", **kw)(x))
    x = x + drop(scaled(y, "ls1"), deterministic=not train)
    hidden = int(self.dim * self.mlp_ratio)
    y = Mlp(self.dim, hidden, **kw, name="mlp")(layers.layer_norm("norm2", **kw)(x))
    return x + drop(scaled(y, "ls2"), deterministic=not train)


class PatchEmbed(nn.Module):
  """A p x p conv of stride p (`proj`)."""

  embed_dim: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return layers.conv2d(
      self.embed_dim,
      self.patch_size,
      stride=self.patch_size,
      name="proj",
      in_features=x.shape[-1],
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)


class VisionTransformer(nn.Module):
  """The DINO / DINOv2 ViT; see the module docstring. Returns a list of (B, h, w, D) maps."""

  config: ViTConfig = ViTConfig()
  layers: Sequence[int] = (11,)
  norm_outputs: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> list[Array]:
    cfg = self.config
    p = cfg.patch_size
    if x.ndim != 4 or x.shape[-1] != cfg.in_chans or min(x.shape[1:3]) < p:
      raise UserInputError(
        f"vit: expected (B, H, W, {cfg.in_chans}) inputs of at least the patch size {p}, got "
        f"{tuple(x.shape)}"
      )
    bad = [i for i in self.layers if not 0 <= i < cfg.depth]
    if bad or not self.layers:
      raise UserInputError(
        f"model.layers: block indices must lie in 0..{cfg.depth - 1} (depth {cfg.depth}), "
        f"got {tuple(self.layers)}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, m = cfg.embed_dim, cfg.native_grid
    tokens = PatchEmbed(d, p, **kw, name="patch_embed")(x.astype(self.dtype))
    b, h, w, _ = tokens.shape
    tokens = tokens.reshape(b, h * w, d)

    cls = self.param("cls_token", _trunc_normal, (1, 1, d), self.param_dtype)
    pos = self.param("pos_embed", _trunc_normal, (1, 1 + m * m, d), self.param_dtype)
    if cfg.mask_token:
      # DINOv2's masked-token embedding (iBOT pretraining): held so checkpoints convert 1:1.
      self.param("mask_token", nn.initializers.zeros, (1, d), self.param_dtype)
    # The official shortcut compares the token count and the input's pixel sides, so a square
    # input of the native grid uses the table as is, and only then.
    if h * w == m * m and x.shape[1] == x.shape[2]:
      patch_pos = pos[0, 1:]
    else:
      table = pos[0, 1:].astype(jnp.float32).reshape(m, m, d)
      patch_pos = interpolate_grid(table, m, (h, w), cfg.interpolate_offset).reshape(h * w, d)
    pos = jnp.concatenate([pos[0, :1].astype(jnp.float32), patch_pos.astype(jnp.float32)], 0)
    tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), tokens], 1)
    tokens = tokens + pos.astype(self.dtype)[None]

    # Every block exists in the parameter tree (init runs them all); apply stops after the last
    # requested one.
    last = cfg.depth - 1 if self.is_initializing() else max(self.layers)
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth).tolist()
    norm = layers.layer_norm("norm", **kw)
    kept = {}
    for i in range(last + 1):
      tokens = Block(
        d, cfg.num_heads, cfg.mlp_ratio, cfg.layer_scale, rates[i], **kw, name=f"blocks_{i}"
      )(tokens, train)
      if i in self.layers:
        kept[i] = tokens
    if self.is_initializing() and not self.norm_outputs:
      norm(tokens)  # Create `norm`'s parameters: the official tree has them.
    outs = []
    for i in self.layers:
      t = norm(kept[i]) if self.norm_outputs else kept[i]
      outs.append(t[:, 1:].reshape(b, h, w, d))
    return outs
