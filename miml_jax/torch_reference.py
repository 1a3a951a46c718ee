"""PyTorch restatements of the official modules, shared by the parity tests and the benchmarks.

Each is an independent restatement of the official code (FAIR/mmseg ConvNeXt, mmcv ConvModule /
DepthwiseSeparableConvModule, mmseg PPM, UPerHead and DepthwiseSeparableASPPHead, and APSC-Net's
HeadAttn, SCSEModule and TestRFB1HA1CLab head from the MIML repository), NCHW, sized by
arguments where the official code hard-codes its sizes. `tests/test_parity.py` checks the flax
modules against them; `miml-jax bench` times them next to the flax modules (torch is only in the
`test` and `bench` extras).
"""

import torch
import torch.nn as tnn
import torch.nn.functional as F


def mmseg_resize(x, size):
  """mmseg.ops.resize(x, size, mode='bilinear', align_corners=False) (APSC-Net's setting)."""
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# PyTorch references: mmcv blocks.


class TConvModule(tnn.Module):
  """mmcv ConvModule with norm_cfg=BN, act_cfg=ReLU: conv (bias='auto' -> none) -> BN -> ReLU."""

  def __init__(self, cin, cout, k, stride=1, padding=0, dilation=1, groups=1):
    super().__init__()
    self.conv = tnn.Conv2d(
      cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False
    )
    self.bn = tnn.BatchNorm2d(cout)
    self.activate = tnn.ReLU()

  def forward(self, x):
    return self.activate(self.bn(self.conv(x)))


class TDepthwiseSeparableConvModule(tnn.Module):
  """mmcv DepthwiseSeparableConvModule: depthwise ConvModule (groups=cin) -> 1x1 ConvModule."""

  def __init__(self, cin, cout, k, padding=0, dilation=1):
    super().__init__()
    self.depthwise_conv = TConvModule(cin, cin, k, padding=padding, dilation=dilation, groups=cin)
    self.pointwise_conv = TConvModule(cin, cout, 1)

  def forward(self, x):
    return self.pointwise_conv(self.depthwise_conv(x))


# ---------------------------------------------------------------------------------------------
# PyTorch references: ConvNeXt (the FAIR / mmseg backbone of the MIML repository).


class TLayerNorm(tnn.Module):
  """ConvNeXt's LayerNorm: channels_last -> F.layer_norm; channels_first -> by hand over dim 1."""

  def __init__(self, dim, eps=1e-6, data_format="channels_last"):
    super().__init__()
    self.weight = tnn.Parameter(torch.ones(dim))
    self.bias = tnn.Parameter(torch.zeros(dim))
    self.eps = eps
    self.data_format = data_format
    self.dim = dim

  def forward(self, x):
    if self.data_format == "channels_last":
      return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


class TBlock(tnn.Module):
  """dwconv 7x7 -> permute -> LN -> Linear 4x -> GELU -> Linear -> gamma -> permute -> + x."""

  def __init__(self, dim, layer_scale_init_value=1.0):
    super().__init__()
    self.dwconv = tnn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
    self.norm = TLayerNorm(dim, eps=1e-6)
    self.pwconv1 = tnn.Linear(dim, 4 * dim)
    self.act = tnn.GELU()
    self.pwconv2 = tnn.Linear(4 * dim, dim)
    self.gamma = tnn.Parameter(layer_scale_init_value * torch.ones(dim))

  def forward(self, x):
    shortcut = x
    x = self.dwconv(x).permute(0, 2, 3, 1)
    x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
    x = (self.gamma * x).permute(0, 3, 1, 2)
    return shortcut + x  # drop path is the identity in eval mode


class TConvNeXt(tnn.Module):
  def __init__(self, in_chans, dims, depths):
    super().__init__()
    self.downsample_layers = tnn.ModuleList()
    self.downsample_layers.append(
      tnn.Sequential(
        tnn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
        TLayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
      )
    )
    for i in range(3):
      self.downsample_layers.append(
        tnn.Sequential(
          TLayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
          tnn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
        )
      )
    self.stages = tnn.ModuleList(
      [tnn.Sequential(*[TBlock(dims[i]) for _ in range(depths[i])]) for i in range(4)]
    )
    for i in range(4):
      self.add_module(f"norm{i}", TLayerNorm(dims[i], eps=1e-6, data_format="channels_first"))

  def forward(self, x):
    outs = []
    for i in range(4):
      x = self.stages[i](self.downsample_layers[i](x))
      outs.append(getattr(self, f"norm{i}")(x))
    return tuple(outs)


# ---------------------------------------------------------------------------------------------
# PyTorch references: mmseg PPM, APSC-Net's SE fusion, DepthwiseSeparableASPPHead2.


class TPPM(tnn.ModuleList):
  """mmseg PPM: per scale Sequential(AdaptiveAvgPool2d, 1x1 ConvModule), resized back."""

  def __init__(self, pool_scales, cin, channels):
    super().__init__(
      [tnn.Sequential(tnn.AdaptiveAvgPool2d(s), TConvModule(cin, channels, 1)) for s in pool_scales]
    )

  def forward(self, x):
    return [mmseg_resize(ppm(x), x.shape[2:]) for ppm in self]


class TPSP(tnn.Module):
  """UPerHead.psp_forward: bottleneck(cat([x] + PPM(x)))."""

  def __init__(self, pool_scales, cin, channels):
    super().__init__()
    self.psp_modules = TPPM(pool_scales, cin, channels)
    self.bottleneck = TConvModule(cin + len(pool_scales) * channels, channels, 3, padding=1)

  def forward(self, x):
    return self.bottleneck(torch.cat([x] + self.psp_modules(x), dim=1))


def se_mlp(cin, n_out, reduction):
  return tnn.Sequential(
    tnn.Conv2d(cin, cin // reduction, 1),
    tnn.ReLU(inplace=True),
    tnn.Conv2d(cin // reduction, n_out, 1),
    tnn.Sigmoid(),
  )


def t_se_fusion(m, laterals):
  """The official SE-gated top-down fusion, written out per level; m holds SE1..SE3 and avg."""
  laterals = list(laterals)
  avg = m.avg
  for i in range(3, 0, -1):
    prev_shape = laterals[i - 1].shape[2:]
    if i == 3:
      wt = m.SE1(torch.cat((avg(laterals[2]), avg(laterals[3])), 1))
      laterals[2] = wt[:, 0:1] * laterals[2] + wt[:, 1:2] * mmseg_resize(laterals[3], prev_shape)
    elif i == 2:
      wt = m.SE2(torch.cat((avg(laterals[1]), avg(laterals[2]), avg(laterals[3])), 1))
      laterals[1] = (
        wt[:, 0:1] * laterals[1]
        + wt[:, 1:2] * mmseg_resize(laterals[2], prev_shape)
        + wt[:, 2:3] * mmseg_resize(laterals[3], prev_shape)
      )
    else:
      wt = m.SE3(
        torch.cat((avg(laterals[0]), avg(laterals[1]), avg(laterals[2]), avg(laterals[3])), 1)
      )
      laterals[0] = (
        wt[:, 0:1] * laterals[0]
        + wt[:, 1:2] * mmseg_resize(laterals[1], prev_shape)
        + wt[:, 2:3] * mmseg_resize(laterals[2], prev_shape)
        + wt[:, 3:4] * mmseg_resize(laterals[3], prev_shape)
      )
  return laterals


class TSEFusion(tnn.Module):
  """TestRFB1HA1CLab's top-down fusion, written out per level as the official forward is."""

  def __init__(self, channels, reduction=8):
    super().__init__()
    self.avg = tnn.AdaptiveAvgPool2d(1)
    self.SE1 = se_mlp(2 * channels, 2, reduction)
    self.SE2 = se_mlp(3 * channels, 3, reduction)
    self.SE3 = se_mlp(4 * channels, 4, reduction)

  def forward(self, laterals):
    return t_se_fusion(self, laterals)


class TSepASPPHead(tnn.Module):
  """mmseg ASPPHead + DepthwiseSeparableASPPHead2 (APSC-Net's MSDEC); forward(c1, x)."""

  def __init__(
    self, cin, channels, dilations, c1_in_channels, c1_channels, num_classes=2, dropout_ratio=0.1
  ):
    super().__init__()
    self.image_pool = tnn.Sequential(tnn.AdaptiveAvgPool2d(1), TConvModule(cin, channels, 1))
    self.aspp_modules = tnn.ModuleList(
      [
        TConvModule(cin, channels, 1)
        if d == 1
        else TDepthwiseSeparableConvModule(cin, channels, 3, padding=d, dilation=d)
        for d in dilations
      ]
    )
    self.bottleneck = TConvModule((len(dilations) + 1) * channels, channels, 3, padding=1)
    self.c1_bottleneck = TConvModule(c1_in_channels, c1_channels, 1)
    self.sep_bottleneck = tnn.Sequential(
      TDepthwiseSeparableConvModule(channels + c1_channels, channels, 3, padding=1),
      TDepthwiseSeparableConvModule(channels, channels, 3, padding=1),
    )
    self.conv_seg = tnn.Conv2d(channels, num_classes, 1)
    self.dropout = tnn.Dropout2d(dropout_ratio)

  def forward(self, c1, x):
    outs = [mmseg_resize(self.image_pool(x), x.shape[2:])]
    outs += [m(x) for m in self.aspp_modules]
    y = self.bottleneck(torch.cat(outs, dim=1))
    c1 = self.c1_bottleneck(c1)
    out = torch.cat([mmseg_resize(y, c1.shape[2:]), c1], dim=1)
    out = self.sep_bottleneck(out)
    return self.conv_seg(self.dropout(out)), y


# ---------------------------------------------------------------------------------------------
# PyTorch references: APSC-Net (MIML repo, mmseg/models/decode_heads/test_rfb1ha1c.py), sized
# by arguments where the official code hard-codes 512 / 2048 / 31 / 64.


def t_min_max_norm(in_):
  max_ = in_.max(3)[0].max(2)[0].unsqueeze(2).unsqueeze(3).expand_as(in_)
  min_ = in_.min(3)[0].min(2)[0].unsqueeze(2).unsqueeze(3).expand_as(in_)
  return (in_ - min_).div(max_ - min_ + 1e-8)


class THeadAttn(tnn.Module):
  def __init__(self, kernel_size=31, gen_size=64, gen_dims=(32, 64, 128, 256, 512)):
    super().__init__()
    self.k = kernel_size
    convs, cin = [], 1
    for i, d in enumerate(gen_dims):
      last = i == len(gen_dims) - 1
      convs.append(TConvModule(cin, d, 3 if last else 5, padding=1 if last else 2, stride=2))
      cin = d
    self.kg = tnn.Sequential(
      tnn.UpsamplingBilinear2d(size=(gen_size, gen_size)),
      *convs,
      tnn.AdaptiveAvgPool2d(1),
      tnn.Flatten(),
      tnn.Dropout(p=0.1),
      tnn.Linear(cin, kernel_size * kernel_size),
    )

  def forward(self, attn):
    b, k = attn.size(0), self.k
    kg = self.kg(attn).reshape(b, 1, k, k)
    attn2 = torch.cat(
      [F.conv2d(attn[i : i + 1], kg[i : i + 1], padding=(k - 1) // 2) for i in range(b)]
    )
    attn2 = t_min_max_norm(attn2)
    return attn2.max(attn)


class TSCSEModule(tnn.Module):
  def __init__(self, cin, reduction, cout):
    super().__init__()
    self.cSE = tnn.Sequential(
      tnn.AdaptiveAvgPool2d(1),
      tnn.Conv2d(cin, cin // reduction, 1),
      tnn.ReLU(inplace=True),
      tnn.Conv2d(cin // reduction, cin, 1),
      tnn.Sigmoid(),
    )
    self.c11 = TConvModule(cin, cout, 1)

  def forward(self, x):
    return self.c11(x * self.cSE(x))


class TAPSCHead(tnn.Module):
  """TestRFB1HA1CLab; forward returns (lab_outs, cls_aux, cpred) as its training branch does."""

  def __init__(
    self,
    in_channels,
    channels,
    pool_scales,
    feat0_channels,
    c1_channels,
    dilations,
    kernel_size,
    gen_size,
    gen_dims,
    image_dims,
    passes=3,
    num_classes=2,
  ):
    super().__init__()
    c = channels
    self.passes = passes
    self.psp_modules = TPPM(pool_scales, in_channels[-1], c)
    self.bottleneck = TConvModule(in_channels[-1] + len(pool_scales) * c, c, 3, padding=1)
    self.avg = tnn.AdaptiveAvgPool2d(1)
    reduction = 8
    self.SE1 = se_mlp(2 * c, 2, reduction)
    self.SE2 = se_mlp(3 * c, 3, reduction)
    self.SE3 = se_mlp(4 * c, 4, reduction)
    self.lateral_convs = tnn.ModuleList([TConvModule(cin, c, 1) for cin in in_channels[:-1]])
    self.fpn_convs = tnn.ModuleList([TConvModule(c, c, 3, padding=1) for _ in in_channels[:-1]])
    self.conv_seg = tnn.Conv2d(c, num_classes, 1)  # BaseDecodeHead.cls_seg
    self.dropout = tnn.Dropout2d(0.1)
    self.MSDEC = TSepASPPHead(4 * c, c, dilations, feat0_channels, c1_channels, num_classes)
    self.convert = tnn.Conv2d(c, feat0_channels, 1, 1, 0)
    self.ha = THeadAttn(kernel_size, gen_size, gen_dims)
    self.CE = TSCSEModule(5 * c, 8, 4 * c)
    self.ds = tnn.UpsamplingBilinear2d(scale_factor=0.5)
    d0, d1, d2 = image_dims
    self.cls_head = tnn.Sequential(
      TConvModule(6 * c, d0, 1),
      tnn.MaxPool2d(2, 2),
      TConvModule(d0, d1, 3, padding=1),
      tnn.MaxPool2d(2, 2),
      TConvModule(d1, d2, 3, padding=1),
      tnn.AdaptiveMaxPool2d(1),
      tnn.Dropout(p=0.2),
      tnn.Conv2d(d2, num_classes, 1, 1, 0),
    )

  def cls_seg(self, feat):
    return self.conv_seg(self.dropout(feat))

  def forward(self, inputs):
    laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
    x = inputs[-1]
    laterals.append(self.bottleneck(torch.cat([x] + self.psp_modules(x), dim=1)))
    laterals = t_se_fusion(self, laterals)
    fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(3)]
    fpn_outs.append(laterals[-1])
    cls_aux = [self.cls_seg(fpn_outs[0])]
    feat0 = self.convert(fpn_outs[0])
    size = fpn_outs[1].shape[2:]
    fpn_outs = torch.cat([mmseg_resize(f, size) for f in fpn_outs], dim=1)
    for cnt in range(self.passes):
      pos_map = F.interpolate(
        F.softmax(cls_aux[-1], dim=1)[:, 1:2], scale_factor=0.5, mode="bilinear"
      )
      fpn_outs = fpn_outs * self.ha(pos_map)
      lab_outs, fpn_adds = self.MSDEC(feat0, fpn_outs)
      if cnt != self.passes - 1:
        cls_aux.append(lab_outs)
        fpn_outs = self.CE(torch.cat((fpn_outs, fpn_adds), 1))
    b, c, h, w = fpn_adds.shape
    slices = [fpn_outs[:, k * c : (k + 1) * c] for k in range(4)]
    prob = self.ds(F.softmax(lab_outs, dim=1)[:, 1:2]).expand_as(fpn_adds)
    cpred = self.cls_head(
      torch.stack([fpn_adds] + slices + [prob], 2).reshape(b, c * 6, h, w).detach()
    )
    return lab_outs, cls_aux, cpred.flatten(1)


class TUPerHead(tnn.Module):
  """mmseg UPerHead (eval): laterals + PSP, top-down sum, fpn convs, concat at level 0,
  fpn_bottleneck, Dropout2d (identity in eval), conv_seg."""

  def __init__(self, in_channels, channels, pool_scales, num_classes):
    super().__init__()
    self.psp_modules = TPPM(pool_scales, in_channels[-1], channels)
    self.bottleneck = TConvModule(
      in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1
    )
    self.lateral_convs = tnn.ModuleList([TConvModule(c, channels, 1) for c in in_channels[:-1]])
    self.fpn_convs = tnn.ModuleList(
      [TConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]]
    )
    self.fpn_bottleneck = TConvModule(len(in_channels) * channels, channels, 3, padding=1)
    self.conv_seg = tnn.Conv2d(channels, num_classes, 1)

  def forward(self, inputs):
    laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
    laterals.append(self.bottleneck(torch.cat([inputs[-1]] + self.psp_modules(inputs[-1]), 1)))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + mmseg_resize(laterals[i], laterals[i - 1].shape[2:])
    outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
    outs = [outs[0]] + [mmseg_resize(o, outs[0].shape[2:]) for o in outs[1:]]
    return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, 1)))
