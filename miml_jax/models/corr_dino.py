"""Corr-DINO, the SDG annotator of CAAAv2 (Web-IML, arXiv 2508.20987): a reconstruction.

No code of it is public. The paper describes frozen DINO-family ViT features of both images,
their correlation as a prior, and a light trainable decoder that "denoises" the prior into the
mask of the forged image. Here that is built from this package's parts; every choice below not
fixed by that description is ours, is a config key, and is listed in docs/caaa.md:

1. Both images are resized (bilinear, align_corners=False) to `image_size` x `image_size` when
   they are not already (the learned correlation pooling is tied to one patch grid, as SACM's
   is; `image_size` must be a multiple of the patch size), and go through one ViT `backbone`
   (vit.py: DINO or DINOv2 layout, weights user-supplied through `miml-jax convert`).
2. The outputs of blocks `layers` (after the ViT's final LayerNorm when `norm_features`) are
   the features; with `frozen_backbone` the ViT runs in inference mode and its outputs pass
   `stop_gradient` (no backward pass through it; freeze its parameters in the optimiser with
   `optim.frozen=('backbone/*',)` too, or weight decay would still shrink them).
3. With `corr_channels` > 0 each layer's features first go through a trainable 1x1 projection
   `corr_proj_<k>` (shared by both images); 0 correlates the ViT features themselves.
4. The prior of each image is SACM's correlation (models/correlation.py): per layer, the
   all-pairs dot products / C against the other image's features over cyclic shifts, pooled by
   one shared `CorrelationPooling` (`pool`: max, mean, `num_learned` learned channels) and,
   with `self_correlation`, the image against itself (SACM pairs each cross correlation with a
   self correlation, which shows repeated structure); concatenated over layers.
5. With `context_channels` > 0 a 1x1 projection `context` of the last layer's features is
   concatenated to the prior (appearance, not only matching); 0 leaves the decoder the prior.
6. The decoder `decoder` (shared by both images): a 3x3 conv-BN-ReLU of `decoder_channels[0]`
   at the patch grid, then per further width an x2 bilinear upsampling and a 3x3 conv-BN-ReLU,
   then a 1x1 conv `conv_seg` to 2 classes; the logits are resized bilinearly to the input
   size. With `aux` a 1x1 conv `aux_head` on the prior gives auxiliary logits (as SACM's
   `seg_out`), resized to the input size.
7. With `donor` the authentic image's prior goes through the same decoder: the mask of the
   donor region the paste came from (`authentic_logits`); without it `authentic_logits` are
   zeros (the authentic loss term then teaches nothing; set its weight to 0).

`__call__(authentic, forged, train)` -> {'forged_logits', 'authentic_logits': (B, H, W, 2)
at the inputs' size, and with `aux` 'forged_aux', 'authentic_aux'} (the SDG task's contract,
tasks/sdg_segmentation.py). Inputs are the normalised images (ImageNet statistics, as DINO's).

Config (`model` section):

    name = 'corr_dino'
    dtype = 'float32' | 'bfloat16'
    image_size = 448                 # the ViT's input side (a multiple of the patch size)
    backbone = dict(family='dino' | 'dinov2', size='small' | 'base' | 'tiny',
                    patch_size=16 (dino) | 14 (dinov2), img_size=224 | 518 (the pretraining
                    size: the position table's grid), interpolate_offset=0.1, ...)  (vit.py)
    layers = (11,)                   # 0-based ViT blocks whose outputs are correlated
    norm_features = True             # the ViT's final LayerNorm on them
    frozen_backbone = True           # inference mode + stop_gradient
    corr_channels = 0                # trainable projection before correlating (0: none)
    self_correlation = True
    num_learned = 14                 # learned pooling channels (+ max + mean)
    context_channels = 0
    decoder_channels = (128, 64, 32) # widths; one x2 upsampling between consecutive ones
    aux = True
    donor = True

Parameters: `backbone/*` maps onto the official DINO / DINOv2 checkpoints' keys with the
'backbone.' prefix, which `miml-jax convert --partial` adds itself (convert.py aligns
prefixes), so a hub checkpoint fills the whole ViT and nothing else.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError
from miml_jax.models import layers, vit
from miml_jax.models.common import as_dict, resolve_dtype
from miml_jax.models.correlation import CorrelationPooling, correlation_volume

Array = jax.Array
Dtype = Any


def _positive_widths(widths) -> str | None:
  if not widths or any(int(w) < 1 for w in widths):
    return f"expected one or more positive widths, got {widths!r}"
  return None


def _block_indices(indices) -> str | None:
  if not indices or any(int(i) < 0 for i in indices) or len(set(indices)) != len(indices):
    return f"expected distinct 0-based block indices, got {indices!r}"
  return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorrDINOSettings:
  """The `model` keys of Corr-DINO other than name, dtype and backbone (module docstring)."""

  image_size: int = config_lib.setting(448, ge=1)
  layers: tuple[int, ...] = config_lib.setting((11,), check=_block_indices)
  norm_features: bool = True
  frozen_backbone: bool = True
  corr_channels: int = config_lib.setting(0, ge=0)
  self_correlation: bool = True
  num_learned: int = config_lib.setting(14, ge=1)
  context_channels: int = config_lib.setting(0, ge=0)
  decoder_channels: tuple[int, ...] = config_lib.setting((128, 64, 32), check=_positive_widths)
  aux: bool = True
  donor: bool = True


class Decoder(nn.Module):
  """conv-BN-ReLU at the grid, then (x2 bilinear, conv-BN-ReLU) per further width, 1x1 to 2."""

  channels: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i, width in enumerate(self.channels):
      if i:
        x = layers.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
      x = layers.ConvModule(width, 3, padding=1, name=f"convs_{i}", **kw)(x, train)
    return layers.conv2d(2, 1, in_features=x.shape[-1], name="conv_seg", **kw)(x)


class CorrDINO(nn.Module):
  """Frozen ViT features -> SACM correlation prior -> light decoder; see the module docstring."""

  backbone: vit.ViTConfig = vit.ViTConfig()
  settings: CorrDINOSettings = CorrDINOSettings()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, model_config) -> "CorrDINO":
    cfg = as_dict(model_config)
    cfg.pop("name", None)
    dtype = resolve_dtype(cfg.pop("dtype", "float32"))
    backbone = vit.ViTConfig.from_dict(as_dict(cfg.pop("backbone", None)))
    settings = config_lib.settings_from_config(CorrDINOSettings, cfg, "model")
    model = cls(backbone=backbone, settings=settings, dtype=dtype)
    model.check()
    return model

  def check(self):
    s, p = self.settings, self.backbone.patch_size
    if s.image_size % p:
      raise UserInputError(
        f"model.image_size: {s.image_size} is not a multiple of the ViT's patch size {p}"
      )
    bad = [i for i in s.layers if i >= self.backbone.depth]
    if bad:
      raise UserInputError(
        f"model.layers: {bad} past the ViT's last block {self.backbone.depth - 1}"
      )

  def example_inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (1, self.settings.image_size, self.settings.image_size, 3)
    return {
      "authentic": jax.ShapeDtypeStruct(shape, jnp.float32),
      "forged": jax.ShapeDtypeStruct(shape, jnp.float32),
    }

  @nn.compact
  def __call__(self, authentic: Array, forged: Array, train: bool) -> dict:
    s = self.settings
    for key, x in (("authentic", authentic), ("forged", forged)):
      if x.ndim != 4 or x.shape[-1] != 3 or x.shape != forged.shape:
        raise UserInputError(
          f"corr_dino: 'authentic' and 'forged' must be (B, H, W, 3) of one shape, got "
          f"'{key}' {tuple(x.shape)} and 'forged' {tuple(forged.shape)}"
        )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out_hw = forged.shape[1:3]
    size = (s.image_size, s.image_size)

    def fit(x):
      x = x.astype(self.dtype)
      return x if x.shape[1:3] == size else layers.resize_bilinear(x, size)

    encoder = vit.VisionTransformer(
      self.backbone, layers=s.layers, norm_outputs=s.norm_features, name="backbone", **kw
    )
    # One ViT pass over both images (a batch of 2B): half the dispatches of two passes.
    both = encoder(
      jnp.concatenate([fit(authentic), fit(forged)], 0), train and not s.frozen_backbone
    )
    if s.frozen_backbone:
      both = [jax.lax.stop_gradient(f) for f in both]
    if s.corr_channels:
      both = [
        layers.dense(s.corr_channels, in_features=f.shape[-1], name=f"corr_proj_{k}", **kw)(f)
        for k, f in enumerate(both)
      ]
    b = forged.shape[0]
    feats = {"authentic": [f[:b] for f in both], "forged": [f[b:] for f in both]}
    pool = CorrelationPooling(s.num_learned, name="pool", **kw)
    context = (
      layers.dense(s.context_channels, in_features=both[-1].shape[-1], name="context", **kw)
      if s.context_channels
      else None
    )
    decoder = Decoder(tuple(s.decoder_channels), name="decoder", **kw)
    aux_head = None
    roles = ("forged", "authentic") if s.donor else ("forged",)
    outputs = {}
    for role in roles:
      other = "authentic" if role == "forged" else "forged"
      prior = []
      for mine, theirs in zip(feats[role], feats[other]):
        prior.append(pool(correlation_volume(mine, theirs)))
        if s.self_correlation:
          prior.append(pool(correlation_volume(mine, mine)))
      x = jnp.concatenate(prior, axis=-1).astype(self.dtype)
      if s.aux:
        if aux_head is None:
          aux_head = layers.conv2d(2, 1, in_features=x.shape[-1], name="aux_head", **kw)
        aux = aux_head(x).astype(jnp.float32)
        outputs[f"{role}_aux"] = layers.resize_bilinear(aux, out_hw)
      if context is not None:
        x = jnp.concatenate([x, context(feats[role][-1]).astype(self.dtype)], axis=-1)
      logits = decoder(x, train).astype(jnp.float32)
      outputs[f"{role}_logits"] = layers.resize_bilinear(logits, out_hw)
    if not s.donor:
      outputs["authentic_logits"] = jnp.zeros_like(outputs["forged_logits"])
      if s.aux:
        outputs["authentic_aux"] = jnp.zeros_like(outputs["forged_aux"])
    return outputs
