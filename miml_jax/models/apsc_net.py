"""APSC-Net (the MIML paper's IML model): its decode head `APSCHead` and the full `APSCNet`.

`APSCHead` is the official `TestRFB1HA1CLab` head, NHWC, parameterised by `APSCHeadConfig` so
the same code builds the published head (the defaults) and small test-sized ones. Forward, for
backbone features C0..C3 (strides 4..32):

1. Laterals `lateral_convs_{i}` (1x1 ConvModule) on C0..C2; PPM (`psp_modules_{k}_1`) +
   3x3 `bottleneck` on C3.
2. Top-down fusion: SE-gated (`SE1..SE3`, fusion='se', official) or a plain UPerNet sum
   (fusion='sum').
3. F_i = `fpn_convs_{i}`(L_i) for i < 3, F3 = L3. aux0 = the head's own `conv_seg` (after
   Dropout2d) on F0 (stride 4). feat0 = `convert`(F0) (1x1 conv with bias). X = concat of F0..F3
   resized to F1's size (stride 8).
4. Self-correction, `rectify_passes` passes. Each: pos = softmax(last aux logits)[..., 1]
   resized with scale 0.5 (align_corners=False); X <- X * `ha`(pos), where `ha` (HeadAttn)
   generates a per-sample KxK kernel from pos, convolves pos with it, min-max normalises per
   sample and takes the max with pos; (logits, Y) = `MSDEC`(feat0, X) (DeepLabV3+). For every
   pass but the last, logits join the aux list and X <- `CE`(concat(X, Y)) (SCSEModule).
   rectify_passes=0 is our ablation switch (not in the reference): no self-correction, the
   prediction comes from one MSDEC pass on the fused X without attention, and neither `ha` nor
   `CE` exists.
5. Optional image-level head (`image_head`) on the stop-gradient of the interleaved stack
   (Y, the four C-wide slices of X, the ds(prob) map) -> `cls_head_{0,2,4,7}` -> (B, 2).

Output: dict(logits=(B, H/4, W/4, num_classes) float32, aux=tuple of float32 logits at stride 4
(1 + max(rectify_passes - 1, 0) entries), image_logits=(B, num_classes) float32 or None).

Parameter naming: the flax tree maps 1:1 onto the torch state_dict; each torch module path
component is a flax submodule name with numeric Sequential / ModuleList indices joined to the
previous name by '_' (`decode_head.ha.kg.1.conv.weight` -> `decode_head/ha/kg_1/conv/kernel`,
`decode_head.SE1.0.weight` -> `decode_head/SE1_0/kernel`, `decode_head.CE.cSE.1.weight` ->
`decode_head/CE/cSE_1/kernel`, `decode_head.cls_head.7.weight` ->
`decode_head/cls_head_7/kernel`); see naming.py.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import common, convnext, deeplab, layers, upernet

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class APSCHeadConfig:
  """Configuration of `APSCHead`; the defaults are the official APSC-Net head.

  Attributes:
    channels: decoder width C (512). X has 4C channels, the CE input 5C.
    pool_scales: PPM scales (1, 2, 3, 6).
    fusion: 'se' (APSC-Net's SE-gated top-down fusion) or 'sum' (plain UPerNet).
    se_reduction: SE MLP reduction of the fusion (8).
    feat0_channels: width of `convert`, the 1x1 conv giving MSDEC's low-level input (256).
    c1_channels: MSDEC's low-level projection width (48).
    aspp_dilations: MSDEC's ASPP dilations (1, 12, 24, 36).
    rectify_passes: self-correction passes (3); 0 disables self-correction (see module doc).
    kernel_size: size K of the generated dynamic kernel (31, odd); padding (K - 1) / 2.
    kernel_gen_size: side the attention map is resized to (align_corners=True) before the
      kernel generator (64).
    kernel_gen_dims: kernel-generator ConvModule widths (32, 64, 128, 256, 512); all but the last
      are 5x5 stride 2, the last 3x3 stride 2; then global avg pool, dropout, Linear -> K*K.
    cse_reduction: channel-SE reduction in the CE module (8).
    dropout: rate of the Dropout2d before each `conv_seg` and of the kernel generator's dropout
      (0.1).
    image_head: build the image-level classification head (True).
    image_head_dims: widths of its three ConvModules (512, 256, 256).
    image_head_dropout: dropout before its final 1x1 conv (0.2).
    image_head_detach: the image head reads the stop-gradient of its inputs, as the reference
      does, so its loss never trains the backbone or the decoder (True); False lets it (our
      switch, for models trained from scratch, where detection has no features of its own).
    num_classes: 2 (authentic / tampered); the tampered probability is class 1.
  """

  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  fusion: str = "se"
  se_reduction: int = 8
  feat0_channels: int = 256
  c1_channels: int = 48
  aspp_dilations: tuple[int, ...] = (1, 12, 24, 36)
  rectify_passes: int = 3
  kernel_size: int = 31
  kernel_gen_size: int = 64
  kernel_gen_dims: tuple[int, ...] = (32, 64, 128, 256, 512)
  cse_reduction: int = 8
  dropout: float = 0.1
  image_head: bool = True
  image_head_dims: tuple[int, int, int] = (512, 256, 256)
  image_head_dropout: float = 0.2
  image_head_detach: bool = True
  num_classes: int = 2

  def __post_init__(self):
    if self.fusion not in ("se", "sum"):
      raise UserInputError(f"model.head.fusion: {self.fusion!r} is not 'se' or 'sum'")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise UserInputError(f"model.head.kernel_size: {self.kernel_size} must be odd and > 0")
    if self.rectify_passes < 0:
      raise UserInputError(f"model.head.rectify_passes: {self.rectify_passes} must be >= 0")
    if not self.kernel_gen_dims:
      raise UserInputError("model.head.kernel_gen_dims: must not be empty")
    if len(self.image_head_dims) != 3:
      raise UserInputError(f"model.head.image_head_dims: {self.image_head_dims} needs 3 widths")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "APSCHeadConfig":
    """Builds a config from a dict / ConfigDict; lists become tuples, unknown keys are errors."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserInputError(f"model.head: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})


def min_max_norm(x: Array, eps: float = 1e-8) -> Array:
  """Per sample and channel: (x - min) / (max - min + eps) over H and W (reference min_max_norm)."""
  lo = jnp.min(x, axis=(1, 2), keepdims=True)
  hi = jnp.max(x, axis=(1, 2), keepdims=True)
  return (x - lo) / (hi - lo + eps)


def dynamic_conv(x: Array, kernels: Array) -> Array:
  """Convolves each sample's 1-channel map with its own KxK kernel, all in one conv.

  x: (B, H, W, 1); kernels: (B, K, K) with kernels[b, i, j] the weight at row i, column j (torch's
  reshape(b, 1, K, K) of the generator output). Cross-correlation with zero padding (K - 1) / 2,
  as torch's F.conv2d. The batch goes to the channel axis and the conv is grouped by sample
  (feature_group_count=B), which replaces the reference's Python loop over the batch.
  """
  b, _, _, c = x.shape
  if c != 1:
    raise ValueError(f"dynamic_conv: expected a 1-channel map, got {x.shape}")
  k = kernels.shape[-1]
  pad = (k - 1) // 2
  lhs = jnp.transpose(x, (3, 1, 2, 0))  # (1, H, W, B)
  rhs = jnp.transpose(kernels, (1, 2, 0))[:, :, None, :]  # (K, K, 1, B): HWIO, one group each
  out = jax.lax.conv_general_dilated(
    lhs,
    rhs.astype(lhs.dtype),
    window_strides=(1, 1),
    padding=((pad, pad), (pad, pad)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=b,
  )
  return jnp.transpose(out, (3, 1, 2, 0))


def interleave_channels(tensors: Sequence[Array]) -> Array:
  """NHWC equivalent of torch.stack(tensors, dim=2).reshape(b, c * n, h, w) on NCHW tensors.

  Output channel c * n + k is channel c of tensors[k]: the n maps are interleaved per channel.
  """
  stacked = jnp.stack(tensors, axis=-1)  # (B, H, W, C, n)
  return stacked.reshape(stacked.shape[:3] + (-1,))


class HeadAttn(nn.Module):
  """The reference HeadAttn: a dynamic-kernel spatial attention generated from a probability map.

  torch's `kg` is Sequential(UpsamplingBilinear2d, ConvModule x n, AdaptiveAvgPool2d, Flatten,
  Dropout, Linear), so the ConvModules are `kg_1..kg_n` and the Linear is `kg_{n+4}` (`kg_9`).
  """

  kernel_size: int = 31
  gen_size: int = 64
  gen_dims: Sequence[int] = (32, 64, 128, 256, 512)
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, attn: Array, train: bool) -> Array:
    b = attn.shape[0]
    # nn.UpsamplingBilinear2d is align_corners=True.
    y = layers.resize_bilinear(attn, (self.gen_size, self.gen_size), align_corners=True)
    n = len(self.gen_dims)
    for i, d in enumerate(self.gen_dims):
      last = i == n - 1
      y = layers.ConvModule(
        d,
        3 if last else 5,
        stride=2,
        padding=1 if last else 2,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"kg_{i + 1}",
      )(y, train)
    y = jnp.mean(y.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    k = self.kernel_size
    y = layers.dense(
      k * k,
      in_features=self.gen_dims[-1],
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=f"kg_{n + 4}",
    )(y)
    a2 = dynamic_conv(attn, y.reshape(b, k, k))
    # The normalisation divides by a range that can be tiny: do it in float32.
    a2 = min_max_norm(a2.astype(jnp.float32))
    return jnp.maximum(a2, attn.astype(jnp.float32)).astype(attn.dtype)


class SCSEModule(nn.Module):
  """The reference SCSEModule: x * cSE(x) -> 1x1 ConvModule `c11` to `features` channels.

  cSE = global avg pool -> 1x1 conv `cSE_1` (C -> C // reduction) -> ReLU -> 1x1 conv `cSE_3`
  -> sigmoid (torch Sequential indices 1 and 3).
  """

  features: int
  reduction: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    s = layers.adaptive_avg_pool(x, 1)
    s = layers.conv2d(c // self.reduction, 1, in_features=c, name="cSE_1", **kw)(s)
    s = jax.nn.relu(s)
    s = layers.conv2d(c, 1, in_features=c // self.reduction, name="cSE_3", **kw)(s)
    s = jax.nn.sigmoid(s)
    return layers.ConvModule(self.features, 1, name="c11", **kw)(x * s, train)


class APSCHead(nn.Module):
  """APSC-Net's decode head (official TestRFB1HA1CLab); see the module docstring."""

  config: APSCHeadConfig = APSCHeadConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[Array], train: bool) -> dict[str, Any]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = cfg.channels
    n = len(inputs)
    inputs = [t.astype(self.dtype) for t in inputs]

    laterals = [
      layers.ConvModule(c, 1, name=f"lateral_convs_{i}", **kw)(inputs[i], train)
      for i in range(n - 1)
    ]
    laterals.append(upernet.psp_forward(inputs[-1], cfg.pool_scales, c, train, **kw))
    if cfg.fusion == "se":
      laterals = upernet.se_gated_fusion(laterals, cfg.se_reduction, **kw)
    else:
      laterals = upernet.sum_fusion(laterals)
    fpn_outs = [
      layers.ConvModule(c, 3, padding=1, name=f"fpn_convs_{i}", **kw)(laterals[i], train)
      for i in range(n - 1)
    ]
    fpn_outs.append(laterals[-1])

    aux = [deeplab.cls_seg(fpn_outs[0], cfg.num_classes, cfg.dropout, train, **kw)]
    feat0 = layers.conv2d(cfg.feat0_channels, 1, in_features=c, name="convert", **kw)(fpn_outs[0])
    size = fpn_outs[1].shape[1:3]
    x = jnp.concatenate(
      [layers.resize_bilinear(f, size, align_corners=False) for f in fpn_outs], axis=-1
    )

    msdec = deeplab.DepthwiseSeparableASPPHead(
      channels=c,
      dilations=cfg.aspp_dilations,
      c1_channels=cfg.c1_channels,
      dropout=cfg.dropout,
      num_classes=cfg.num_classes,
      name="MSDEC",
      **kw,
    )
    if cfg.rectify_passes == 0:
      logits, y = msdec(feat0, x, train)
    else:
      ha = HeadAttn(
        kernel_size=cfg.kernel_size,
        gen_size=cfg.kernel_gen_size,
        gen_dims=cfg.kernel_gen_dims,
        dropout=cfg.dropout,
        name="ha",
        **kw,
      )
      ce = SCSEModule(features=x.shape[-1], reduction=cfg.cse_reduction, name="CE", **kw)
      for p in range(cfg.rectify_passes):
        # F.interpolate(scale_factor=0.5, mode='bilinear'): align_corners=False, scale-based.
        pos = jax.nn.softmax(aux[-1].astype(jnp.float32), axis=-1)[..., 1:2]
        pos = layers.resize_bilinear(pos, scale_factor=0.5, align_corners=False)
        x = x * ha(pos.astype(self.dtype), train)
        logits, y = msdec(feat0, x, train)
        if p != cfg.rectify_passes - 1:
          aux.append(logits)
          x = ce(jnp.concatenate([x, y], axis=-1), train)

    image_logits = None
    if cfg.image_head:
      image_logits = self._image_head(logits, x, y, train)
    return dict(
      logits=logits.astype(jnp.float32),
      aux=tuple(a.astype(jnp.float32) for a in aux),
      image_logits=image_logits,
    )

  def _image_head(self, logits: Array, x: Array, y: Array, train: bool) -> Array:
    """The image-level classifier `cls_head` on the (Y, X slices, prob) stack, detached unless
    `image_head_detach` is off."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = y.shape[-1]
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:2]
    # self.ds = nn.UpsamplingBilinear2d(scale_factor=0.5): align_corners=True.
    prob = layers.resize_bilinear(prob, scale_factor=0.5, align_corners=True)
    prob = jnp.broadcast_to(prob.astype(y.dtype), y.shape)
    slices = [x[..., k * c : (k + 1) * c] for k in range(x.shape[-1] // c)]
    z = interleave_channels([y] + slices + [prob])
    if cfg.image_head_detach:
      # The reference detaches the stack: the image head never trains the segmentation path.
      z = jax.lax.stop_gradient(z)
    d0, d1, d2 = cfg.image_head_dims
    # torch Sequential: 0 ConvModule, 1 MaxPool, 2 ConvModule, 3 MaxPool, 4 ConvModule,
    # 5 AdaptiveMaxPool2d(1), 6 Dropout, 7 Conv2d.
    z = layers.ConvModule(d0, 1, name="cls_head_0", **kw)(z, train)
    z = layers.max_pool_2x2(z)
    z = layers.ConvModule(d1, 3, padding=1, name="cls_head_2", **kw)(z, train)
    z = layers.max_pool_2x2(z)
    z = layers.ConvModule(d2, 3, padding=1, name="cls_head_4", **kw)(z, train)
    z = layers.adaptive_max_pool(z, 1)
    z = nn.Dropout(cfg.image_head_dropout)(z, deterministic=not train)
    z = layers.conv2d(cfg.num_classes, 1, in_features=d2, name="cls_head_7", **kw)(z)
    return z[:, 0, 0, :].astype(jnp.float32)


class APSCNet(nn.Module):
  """The official APSC-Net: ConvNeXt-B (drop path 0.4, layer scale 1.0) + `APSCHead`.

  `__call__(x, train)` takes (B, H, W, in_chans) normalised images, H and W multiples of 32, and
  returns the head's dict (logits at 1/4 resolution; the caller upsamples). Submodules are named
  `backbone` and `decode_head` like the torch segmentor, so the variables map 1:1 onto the
  official APSC-Net.pth state_dict.
  """

  in_chans: int = 3
  drop_path_rate: float = 0.4
  head: APSCHeadConfig = APSCHeadConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> dict[str, Any]:
    common.check_image_input(x, self.in_chans)
    dims, depths = convnext.CONVNEXT_PRESETS["base"]
    feats = convnext.ConvNeXt(
      dims=dims,
      depths=depths,
      in_chans=self.in_chans,
      drop_path_rate=self.drop_path_rate,
      layer_scale_init_value=1.0,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="backbone",
    )(x, train)
    return APSCHead(self.head, self.dtype, self.param_dtype, name="decode_head")(feats, train)
