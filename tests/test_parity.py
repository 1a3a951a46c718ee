"""PyTorch parity of the flax modules in miml_jax/models/.

Each test builds a small PyTorch reference module written here (an independent restatement of the
official code: FAIR/mmseg ConvNeXt, mmcv ConvModule / DepthwiseSeparableConvModule, mmseg PPM and
DepthwiseSeparableASPPHead, and APSC-Net's HeadAttn, SCSEModule and TestRFB1HA1CLab head from the
MIML repository), gives it random weights and meaningful BatchNorm statistics, converts its
state_dict with `convert.state_dict_to_variables(..., strict=True)` and compares both forward
passes in eval mode (torch NCHW, flax NHWC) in float32: max abs error < 1e-4.

BatchNorm statistics are "calibrated": one train-mode torch pass with a cumulative average
records the real batch statistics of the test input (so activations stay O(1) through the
network instead of vanishing or exploding), then mean / var / weight / bias are perturbed randomly
so that BN parity is not a trivial identity.

The flax side runs jitted (one compile per module; on CPU that beats the op-by-op path, which
compiles a kernel per distinct op shape).
"""

import functools

import flax.linen as fnn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as tnn
import torch.nn.functional as F

from miml_jax.models import (
  apsc_net,
  convert,
  convnext,
  deeplab,
  upernet,
)

TOL = 1e-4
# Max abs error per compared output, printed at the end of the module (run with -s to see it).
MAX_ERRORS = {}


@pytest.fixture(scope="module", autouse=True)
def _float32_highest_precision():
  """float32 torch on few threads; jax matmuls / convs at 'highest' precision, then restored."""
  old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
  torch.set_default_dtype(torch.float32)
  torch.set_num_threads(1)
  with jax.default_matmul_precision("highest"):
    yield
  torch.set_default_dtype(old_dtype)
  torch.set_num_threads(old_threads)
  if MAX_ERRORS:
    print("\nmax abs error per output:")
    for name, err in MAX_ERRORS.items():
      print(f"  {name}: {err:.3g}")


# ---------------------------------------------------------------------------------------------
# Helpers.


def nchw_to_nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def to_torch(x_nhwc):
  """An NHWC numpy array as an NCHW float32 torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def normal(rng, *shape, scale=1.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


@torch.no_grad()
def randomize_(model, *inputs, seed=0):
  """Random norm affines, layer scales and (calibrated, then perturbed) BN statistics."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
  if bns:
    # momentum=None: cumulative average, so one pass records the true batch statistics.
    for bn in bns:
      bn.reset_running_stats()
      bn.momentum = None
    model.train()
    model(*inputs)
    for bn in bns:
      n = bn.num_features
      bn.running_mean.add_(0.1 * torch.randn(n, generator=g))
      bn.running_var.clamp_(min=1e-2).mul_(torch.empty(n).uniform_(0.7, 1.4, generator=g))
      bn.weight.uniform_(0.5, 1.5, generator=g)
      bn.bias.normal_(0.0, 0.2, generator=g)
      bn.momentum = 0.1
  for m in model.modules():
    if isinstance(m, TLayerNorm):
      m.weight.uniform_(0.5, 1.5, generator=g)
      m.bias.normal_(0.0, 0.2, generator=g)
    if isinstance(m, TBlock):
      m.gamma.uniform_(-1.0, 1.0, generator=g)
  model.eval()
  return model


def numpy_state_dict(torch_module):
  return {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}


def flax_target(flax_module, *args):
  return jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), *args, train=False))


def convert_to_flax(flax_module, torch_module, *args):
  """torch_module's state_dict as variables of flax_module (strict), checking the report."""
  state_dict = numpy_state_dict(torch_module)
  variables, report = convert.state_dict_to_variables(
    state_dict, flax_target(flax_module, *args), strict=True
  )
  n_bn = sum(isinstance(m, tnn.BatchNorm2d) for m in torch_module.modules())
  assert report.prefix == "none"
  assert report.converted == len(state_dict) - n_bn
  assert report.ignored == n_bn  # the num_batches_tracked buffers
  return variables


def jit_apply(module, variables, *args, train=False):
  """module.apply under jit: one XLA compile beats op-by-op dispatch of many small shapes."""
  return jax.jit(functools.partial(module.apply, train=train))(variables, *args)


def check(name, ref, got, tol=TOL):
  """ref: torch output (NCHW tensor, or (B, K)); got: flax output (NHWC / (B, K))."""
  ref = ref.detach().numpy()
  got = np.asarray(got)
  if ref.ndim == 4:
    ref = nchw_to_nhwc(ref)
  assert ref.shape == got.shape, (name, ref.shape, got.shape)
  # The reference must carry signal, or agreement would mean nothing.
  assert np.std(ref) > 1e-3, (name, np.std(ref))
  err = float(np.max(np.abs(ref - got)))
  MAX_ERRORS[name] = max(err, MAX_ERRORS.get(name, 0.0))
  assert err < tol, f"{name}: max abs error {err:.3g} >= {tol}"


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


# ---------------------------------------------------------------------------------------------
# ConvNeXt.

DIMS, DEPTHS = (8, 16, 24, 32), (1, 1, 2, 1)


def test_convnext_block_parity():
  rng = np.random.default_rng(0)
  x = normal(rng, 2, 9, 11, 8)
  torch.manual_seed(0)
  tblock = randomize_(TBlock(8))
  with torch.no_grad():  # wide GELU inputs, so that its tanh approximation would not pass
    tblock.pwconv1.weight.mul_(4.0)
  block = convnext.Block(8, layer_scale_init_value=1.0)
  variables = convert_to_flax(block, tblock, x)
  with torch.no_grad():
    ref = tblock(to_torch(x))
  check("convnext.Block", ref, jit_apply(block, variables, x, train=False))


@pytest.mark.parametrize("in_chans", [3, 9])
def test_convnext_backbone_parity(in_chans):
  rng = np.random.default_rng(in_chans)
  x = normal(rng, 2, 64, 96, in_chans)
  torch.manual_seed(in_chans)
  tmodel = randomize_(TConvNeXt(in_chans, DIMS, DEPTHS))
  model = convnext.ConvNeXt(dims=DIMS, depths=DEPTHS, in_chans=in_chans, layer_scale_init_value=1.0)
  variables = convert_to_flax(model, tmodel, x)
  with torch.no_grad():
    refs = tmodel(to_torch(x))
  outs = jit_apply(model, variables, x, train=False)
  assert len(outs) == 4
  for i, (ref, out) in enumerate(zip(refs, outs)):
    check(f"convnext.ConvNeXt(in_chans={in_chans}) stage {i}", ref, out)


# ---------------------------------------------------------------------------------------------
# UPerNet pieces: the functions are called from a wrapper module, as the head calls them.


class PSPWrap(fnn.Module):
  pool_scales: tuple
  channels: int

  @fnn.compact
  def __call__(self, x, train):
    return upernet.psp_forward(x, self.pool_scales, self.channels, train)


class SEFusionWrap(fnn.Module):
  reduction: int = 8

  @fnn.compact
  def __call__(self, laterals, train):
    return upernet.se_gated_fusion(laterals, self.reduction)


def test_ppm_psp_forward_parity():
  # 5x7 input: overlapping adaptive-pool bins, and scale 6 > 5 (output larger than the input).
  rng = np.random.default_rng(1)
  x = normal(rng, 2, 5, 7, 12)
  torch.manual_seed(1)
  tx = to_torch(x)
  tmodel = randomize_(TPSP((1, 2, 3, 6), 12, 8), tx)
  model = PSPWrap((1, 2, 3, 6), 8)
  variables = convert_to_flax(model, tmodel, x)
  with torch.no_grad():
    ref = tmodel(tx)
  check("upernet.psp_forward", ref, jit_apply(model, variables, x, train=False))


def test_se_gated_fusion_parity():
  rng = np.random.default_rng(2)
  c = 16
  laterals = [normal(rng, 2, h, w, c) for h, w in ((13, 17), (7, 9), (4, 5), (2, 3))]
  torch.manual_seed(2)
  tmodel = randomize_(TSEFusion(c, 8))
  model = SEFusionWrap(8)
  variables = convert_to_flax(model, tmodel, laterals)
  with torch.no_grad():
    refs = tmodel([to_torch(t) for t in laterals])
  outs = jit_apply(model, variables, laterals, train=False)
  for i in range(4):
    check(f"upernet.se_gated_fusion level {i}", refs[i], outs[i])


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


def test_uperhead_parity():
  rng = np.random.default_rng(7)
  dims = (8, 16, 24, 32)
  feats = [normal(rng, 2, 24 // 2**i, 32 // 2**i, d) for i, d in enumerate(dims)]
  torch.manual_seed(7)
  tfeats = [to_torch(f) for f in feats]
  tmodel = randomize_(TUPerHead(dims, 16, (1, 2, 3, 6), 5), tfeats)
  model = upernet.UPerHead(channels=16, num_classes=5)
  variables = convert_to_flax(model, tmodel, feats)
  with torch.no_grad():
    ref = tmodel(tfeats)
  check("upernet.UPerHead", ref, jit_apply(model, variables, feats, train=False))


# ---------------------------------------------------------------------------------------------
# DeepLabV3+ head.


def test_depthwise_separable_aspp_head_parity():
  rng = np.random.default_rng(3)
  c1 = normal(rng, 2, 14, 18, 8)
  x = normal(rng, 2, 7, 9, 24)
  torch.manual_seed(3)
  tc1, tx = to_torch(c1), to_torch(x)
  tmodel = randomize_(TSepASPPHead(24, 16, (1, 2, 3), 8, 4), tc1, tx)
  model = deeplab.DepthwiseSeparableASPPHead(
    channels=16, dilations=(1, 2, 3), c1_channels=4, dropout=0.1, num_classes=2
  )
  variables = convert_to_flax(model, tmodel, c1, x)
  with torch.no_grad():
    ref_logits, ref_y = tmodel(tc1, tx)
  logits, y = jit_apply(model, variables, c1, x, train=False)
  check("deeplab.DepthwiseSeparableASPPHead logits", ref_logits, logits)
  check("deeplab.DepthwiseSeparableASPPHead bottleneck", ref_y, y)


# ---------------------------------------------------------------------------------------------
# APSC-Net modules.


def test_head_attn_parity():
  rng = np.random.default_rng(4)
  attn = 1.0 / (1.0 + np.exp(-normal(rng, 2, 12, 16, 1, scale=2.0)))  # a probability map
  torch.manual_seed(4)
  tattn = to_torch(attn)
  tmodel = randomize_(THeadAttn(5, 16, (4, 8)), tattn)
  model = apsc_net.HeadAttn(kernel_size=5, gen_size=16, gen_dims=(4, 8))
  variables = convert_to_flax(model, tmodel, attn)
  with torch.no_grad():
    ref = tmodel(tattn)
  check("apsc_net.HeadAttn", ref, jit_apply(model, variables, attn, train=False))


def test_scse_module_parity():
  rng = np.random.default_rng(5)
  x = normal(rng, 2, 6, 7, 20)
  torch.manual_seed(5)
  tx = to_torch(x)
  tmodel = randomize_(TSCSEModule(20, 4, 16), tx)
  model = apsc_net.SCSEModule(features=16, reduction=4)
  variables = convert_to_flax(model, tmodel, x)
  with torch.no_grad():
    ref = tmodel(tx)
  check("apsc_net.SCSEModule", ref, jit_apply(model, variables, x, train=False))


def test_apsc_head_parity(tmp_path):
  """The whole tiny head: logits, every aux logit map and the image logits.

  Also loads the same weights the way official checkpoints come: an mmseg-style .pth with the
  keys under 'decode_head.' inside {'state_dict': ...}, into the bare head.
  """
  in_channels = DIMS
  cfg = apsc_net.APSCHeadConfig(
    channels=16,
    pool_scales=(1, 2, 3, 6),
    fusion="se",
    se_reduction=8,
    feat0_channels=8,
    c1_channels=4,
    aspp_dilations=(1, 2, 3),
    rectify_passes=3,
    kernel_size=5,
    kernel_gen_size=16,
    kernel_gen_dims=(4, 8),
    cse_reduction=8,
    dropout=0.1,
    image_head=True,
    image_head_dims=(8, 8, 8),
    image_head_dropout=0.2,
    num_classes=2,
  )
  rng = np.random.default_rng(6)
  # Backbone features of a 96x128 image (strides 4, 8, 16, 32): non-square, and the PPM's
  # scale 6 exceeds the 3x4 top level.
  feats = [normal(rng, 2, 96 // s, 128 // s, c) for s, c in zip((4, 8, 16, 32), in_channels)]
  tfeats = [to_torch(f) for f in feats]
  torch.manual_seed(6)
  tmodel = randomize_(
    TAPSCHead(in_channels, 16, (1, 2, 3, 6), 8, 4, (1, 2, 3), 5, 16, (4, 8), (8, 8, 8), passes=3),
    tfeats,
  )
  model = apsc_net.APSCHead(cfg)
  variables = convert_to_flax(model, tmodel, feats)
  with torch.no_grad():
    ref_logits, ref_aux, ref_image = tmodel(tfeats)
  out = jit_apply(model, variables, feats, train=False)
  check("apsc_net.APSCHead logits", ref_logits, out["logits"])
  assert len(out["aux"]) == len(ref_aux) == 3
  for i, (ref, got) in enumerate(zip(ref_aux, out["aux"])):
    check(f"apsc_net.APSCHead aux {i}", ref, got)
  check("apsc_net.APSCHead image_logits", ref_image, out["image_logits"])

  path = str(tmp_path / "apsc_head.pth")
  torch.save(
    {
      "meta": {"iter": 1},
      "state_dict": {"decode_head." + k: v for k, v in tmodel.state_dict().items()},
    },
    path,
  )
  loaded = convert.read_state_dict(path)
  from_file, report = convert.state_dict_to_variables(
    loaded, flax_target(model, feats), strict=True
  )
  assert report.prefix == "strip 'decode_head.'"
  flat = jax.tree_util.tree_leaves_with_path(variables)
  flat_file = jax.tree_util.tree_leaves_with_path(from_file)
  assert [p for p, _ in flat] == [p for p, _ in flat_file]
  for (_, a), (_, b) in zip(flat, flat_file):
    np.testing.assert_array_equal(a, b)
