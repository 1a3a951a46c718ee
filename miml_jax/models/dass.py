"""DASS, CAAA's annotator of in-place edits (SPG pairs): the released `DASS.pth` architecture of
the official MIML code (`models for CIML/dass.py` with mmseg's `UPerLab` decode head), NHWC.

Input: the pair task's 9 channels (authentic, forged, difference; tasks/pair_segmentation.py).
The network, with the official defaults:

* `backbone`: VAN-B5 (embed 96/192/480/768, depths 3/3/24/3, mlp ratios 8/8/4/4, BatchNorm in
  the blocks, a LayerNorm after each stage, layer scale 1e-2, drop path 0.4; van.py), or a
  ConvNeXt (`backbone.name='convnext'`, ConvNeXt-B by default: the backbone the official
  `train_dass.py` builds, `convbuper.py`).
* `decode_head` (UPerLab): UPerNet laterals (1x1 ConvModules -> `channels`) on stages 1-3, PPM
  (pool scales 1/2/3/6) + `bottleneck` on stage 4, top-down sum, 3x3 `fpn_convs`; then every FPN
  map, level 0 included, is resized to level 1's size (stride 8) and concatenated (4 x channels),
  and a DeepLabV3+ head `deeplab` (deeplab.py: image pooling, a 1x1 branch and depthwise-separable
  3x3 branches at dilations 12/24/36, `aspp_channels` wide; its low-level input is the 1x1 conv
  `convert` (channels -> c1_in_channels, with bias) of FPN level 0, projected to 48 channels;
  two separable 3x3; Dropout2d; 1x1 -> num_classes) gives the logits at stride 4.
* In training only, two auxiliary outputs: UPerLab's own `conv_seg` on FPN level 0 (after
  Dropout2d; mmseg's cls_seg) and an FCN head `auxiliary_head` on stage 3 (fcn.py).
* Every output is upsampled x4 (x16 for the FCN head) with `F.upsample_bilinear`, i.e.
  align_corners=True with a scale factor, as the official forward does.

`__call__(x, train)` -> {'logits': (B, 4*(H//4), 4*(W//4), num_classes), 'aux': [FCN head,
UPerLab conv_seg] in training, [] otherwise, 'image_logits': None}. The task's segmentation loss
weighs them with `loss.weights` (final first, then aux in this order).

Parameters map 1:1 onto the torch state_dict (naming.py's rule, no extra renames):
`backbone.block3.23.attn.proj_1.weight` -> `backbone/block3_23/attn/proj_1/kernel`,
`decode_head.lateral_convs.0.conv.weight` -> `decode_head/lateral_convs_0/conv/kernel`,
`decode_head.psp_modules.3.1.bn.running_var` -> batch_stats
`decode_head/psp_modules_3_1/bn/var`, `decode_head.convert.weight` ->
`decode_head/convert/kernel`, `decode_head.deeplab.aspp_modules.1.depthwise_conv.conv.weight`
-> `decode_head/deeplab/aspp_modules_1/depthwise_conv/conv/kernel`,
`auxiliary_head.convs.0.conv.weight` -> `auxiliary_head/convs_0/conv/kernel`. The released
checkpoint (`{'state_dict': ...}` of an nn.DataParallel, keys under `module.`) converts strictly
with `miml-jax convert DASS.pth --config experiments/caaa_dass.py --out dass.msgpack`.

Input convention (`input_norm`): 'task' (default) feeds the task's channels unchanged; this is
what models trained here use. 'auto_annotate' re-derives, inside the model, the input the
released weights were run on by the official `Auto_Annotate_SPG.py`: each image /255 normalised
with that script's mean (0.485, 0.455, 0.406) (its typo for 0.456) and std (0.229, 0.224,
0.225), and the difference taken on the uint8 tensors, which wraps around ((a - f) mod 256),
then /255 and normalised with the same mean and std. It is exact for inputs made from uint8
images (the task's are). docs/caaa.md lists every departure.

Config (`model` section):

    name = 'dass'
    dtype = 'float32' | 'bfloat16'
    input_norm = 'task' | 'auto_annotate'
    backbone = dict(name='van' | 'convnext', preset='b5' (van) / 'base' (convnext) unless dims
                    are given, dims / embed_dims, depths, mlp_ratios (VAN), in_chans=9,
                    drop_path_rate=0.4)
    head = dict(channels=512, pool_scales=(1, 2, 3, 6), c1_in_channels=256, c1_channels=48,
                aspp_channels=512, dilations=(1, 12, 24, 36), dropout=0.1, num_classes=2)
    aux = dict(channels=256, num_convs=1, in_index=2, dropout=0.1) or None (no FCN head)
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import convnext, deeplab, fcn, layers, upernet, van
from miml_jax.models.common import as_dict, resolve_dtype
from miml_jax.models.segmentor import SegmentorBackbone

Array = jax.Array
Dtype = Any

# The task's normalisation (input/transforms.py IMAGENET_MEAN / IMAGENET_STD, on 0..255; models
# sit below input/ and do not import it; tests/test_dass.py checks that they agree).
TASK_MEAN = (123.675, 116.28, 103.53)
TASK_STD = (58.395, 57.12, 57.375)
# Auto_Annotate_SPG.py's Normalize, on 0..1 values, for all 9 channels (0.455: sic).
AUTO_ANNOTATE_MEAN = (0.485, 0.455, 0.406)
AUTO_ANNOTATE_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("task", "auto_annotate")


@dataclasses.dataclass(frozen=True)
class UPerLabConfig:
  """The decode head (`model.head`); defaults are the released DASS's."""

  channels: int = 512
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  # UPerLab's `convert` (1x1 conv) output: the DeepLabV3+ low-level input c1.
  c1_in_channels: int = 256
  c1_channels: int = 48
  aspp_channels: int = 512
  dilations: tuple[int, ...] = (1, 12, 24, 36)
  # Dropout2d before each conv_seg (UPerLab's own and the DeepLabV3+ head's).
  dropout: float = 0.1
  num_classes: int = 2


@dataclasses.dataclass(frozen=True)
class DASSAux:
  """The FCN auxiliary head on a backbone stage (`model.aux`)."""

  channels: int = 256
  num_convs: int = 1
  in_index: int = 2
  dropout: float = 0.1


def backbone_from_dict(d) -> SegmentorBackbone:
  """`model.backbone` with DASS's defaults: VAN-B5 (or ConvNeXt-B), 9 input channels, drop path
  0.4 (official dass.py / convbuper.py)."""
  d = dict(d or {})
  d.setdefault("name", "van")
  d.setdefault("in_chans", 9)
  d.setdefault("drop_path_rate", 0.4)
  if not (d.get("preset") or d.get("dims") or d.get("embed_dims")):
    d["preset"] = {"van": "b5", "convnext": "base"}.get(d["name"])
  return SegmentorBackbone.from_dict(d)


class UPerLab(nn.Module):
  """mmseg UPerLab (MIML's `uper_lab.py`): UPerNet FPN -> DeepLabV3+; see the module docstring.

  `__call__(feats, train)` -> (logits at level 0's resolution, conv_seg logits on FPN level 0).
  """

  config: UPerLabConfig = UPerLabConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, train: bool) -> tuple[Array, Array]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inputs = [t.astype(self.dtype) for t in inputs]
    n = len(inputs)
    laterals = [
      layers.ConvModule(c.channels, 1, name=f"lateral_convs_{i}", **kw)(inputs[i], train)
      for i in range(n - 1)
    ]
    laterals.append(upernet.psp_forward(inputs[-1], c.pool_scales, c.channels, train, **kw))
    laterals = upernet.sum_fusion(laterals)
    outs = [
      layers.ConvModule(c.channels, 3, padding=1, name=f"fpn_convs_{i}", **kw)(laterals[i], train)
      for i in range(n - 1)
    ] + [laterals[-1]]
    # The official forward computes this only in training; it is built in both modes so the
    # parameter tree (and the state_dict it maps to) does not depend on the mode.
    cls_aux = deeplab.cls_seg(outs[0], c.num_classes, c.dropout, train, **kw)
    feat0 = layers.conv2d(c.c1_in_channels, 1, in_features=c.channels, name="convert", **kw)(
      outs[0]
    )
    # Every level, level 0 included, to level 1's size (stride 8), then concatenated.
    size = outs[1].shape[1:3]
    fused = jnp.concatenate(
      [layers.resize_bilinear(o, size, align_corners=False) for o in outs], axis=-1
    )
    logits, _ = deeplab.DepthwiseSeparableASPPHead(
      channels=c.aspp_channels,
      dilations=c.dilations,
      c1_channels=c.c1_channels,
      dropout=c.dropout,
      num_classes=c.num_classes,
      name="deeplab",
      **kw,
    )(feat0, fused, train)
    return logits.astype(jnp.float32), cls_aux.astype(jnp.float32)


def auto_annotate_inputs(x: Array) -> Array:
  """The task's 9 channels -> the official Auto_Annotate_SPG.py input (see the module docstring).

  The uint8 pixels are recovered from the normalised images (exact after rounding), so the
  wrap-around difference can be taken as torch's uint8 subtraction does.
  """
  mean = jnp.asarray(TASK_MEAN, jnp.float32)
  std = jnp.asarray(TASK_STD, jnp.float32)
  x = x.astype(jnp.float32)
  authentic = jnp.round(x[..., 0:3] * std + mean)
  forged = jnp.round(x[..., 3:6] * std + mean)
  difference = jnp.mod(authentic - forged, 256.0)
  stacked = jnp.concatenate([authentic, forged, difference], axis=-1) / 255.0
  mean9 = jnp.asarray(AUTO_ANNOTATE_MEAN * 3, jnp.float32)
  std9 = jnp.asarray(AUTO_ANNOTATE_STD * 3, jnp.float32)
  return (stacked - mean9) / std9


class DASS(nn.Module):
  """Backbone + UPerLab (+ FCN auxiliary head); see the module docstring."""

  backbone: SegmentorBackbone = backbone_from_dict({})
  head: UPerLabConfig = UPerLabConfig()
  aux: DASSAux | None = DASSAux()
  input_norm: str = "task"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, model_config) -> "DASS":
    from miml_jax import config as config_lib

    cfg = as_dict(model_config)
    known = {"name", "dtype", "input_norm", "backbone", "head", "aux"}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise UserInputError(f"model: unknown key(s) {unknown} for dass; known: {sorted(known)}")
    input_norm = cfg.get("input_norm", "task")
    if input_norm not in INPUT_NORMS:
      raise UserInputError(f"model.input_norm: {input_norm!r} is not one of {list(INPUT_NORMS)}")
    aux = cfg.get("aux", {})
    return cls(
      backbone=backbone_from_dict(as_dict(cfg.get("backbone"))),
      head=config_lib.settings_from_config(UPerLabConfig, as_dict(cfg.get("head")), "model.head"),
      aux=None
      if aux is None
      else config_lib.settings_from_config(DASSAux, as_dict(aux), "model.aux"),
      input_norm=input_norm,
      dtype=resolve_dtype(cfg.get("dtype", "float32")),
    )

  @nn.compact
  def __call__(self, x: Array, train: bool) -> dict:
    bb = self.backbone
    if x.ndim != 4 or x.shape[-1] != bb.in_chans:
      raise UserInputError(
        f"dass: expected (B, H, W, {bb.in_chans}) inputs (model.backbone.in_chans), "
        f"got {tuple(x.shape)}"
      )
    if self.input_norm == "auto_annotate":
      if bb.in_chans != 9:
        raise UserInputError("model.input_norm='auto_annotate' needs model.backbone.in_chans=9")
      x = auto_annotate_inputs(x)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shared = dict(in_chans=bb.in_chans, drop_path_rate=bb.drop_path_rate, name="backbone", **kw)
    if bb.name == "convnext":
      feats = convnext.ConvNeXt(dims=bb.dims, depths=bb.depths, **shared)(x, train)
    else:
      feats = van.VAN(embed_dims=bb.dims, depths=bb.depths, mlp_ratios=bb.mlp_ratios, **shared)(
        x, train
      )
    logits, cls_aux = UPerLab(self.head, name="decode_head", **kw)(feats, train)
    fcn_aux = None
    if self.aux is not None:
      fcn_aux = fcn.FCNHead(
        channels=self.aux.channels,
        num_convs=self.aux.num_convs,
        concat_input=False,
        num_classes=self.head.num_classes,
        dropout=self.aux.dropout,
        in_index=self.aux.in_index,
        name="auxiliary_head",
        **kw,
      )(feats, train).astype(jnp.float32)

    def up(t, factor):
      # F.upsample_bilinear(t, scale_factor=factor): align_corners=True.
      return layers.resize_bilinear(t, scale_factor=float(factor), align_corners=True)

    aux = []
    if train:
      if fcn_aux is not None:
        # Back from its stage's stride (x16 for stage 3, as the official forward does).
        aux.append(up(fcn_aux, 2 ** (self.aux.in_index + 2)))
      aux.append(up(cls_aux, 4))
    return {"logits": up(logits, 4), "aux": aux, "image_logits": None}
