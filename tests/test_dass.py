"""DASS (models/dass.py) against a small PyTorch restatement of the official modules, the strict
importers of the released DASS.pth and convxl.pth key layouts, and the caaa_dass experiment
through `miml-jax train` / `eval`.

The torch side restates MIML's `models for CIML/dass.py` (VAN + UPerLab + FCNHead, official
attribute names, so its state_dict has the released checkpoint's keys) from the references the
other parity tests already hold: the VAN and FCNHead of test_van_fcn.py, mmcv's ConvModule, mmseg's
PPM and the DeepLabV3+ head of test_parity.py; UPerLab and the DASS wrapper are written here.
Weights go through the converter (strict); outputs are compared in fp32 (< 1e-4) on non-square
inputs, where align_corners choices and resize targets differ. The full-size key layouts are
built on torch's meta device (no memory), so the importers are checked on every official key
and shape without writing a 0.5 GB file.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from miml_jax import cli, models, tasks
from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.models import convert, dass

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

# The shared torch references (they import torch, hence after the skip).
from miml_jax.torch_reference import TPPM, TConvModule, TConvNeXt, TLayerNorm, TSepASPPHead  # noqa: E402
from test_parity import randomize_  # noqa: E402
from test_tasks import coco_root  # noqa: E402, F401  (a fixture)
from test_van_fcn import _convert, _TorchBlock, _TorchFCNHead, _TorchVAN  # noqa: E402

TOL = 1e-4
EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "caaa_dass.py")


@pytest.fixture(autouse=True)
def _fp32_highest():
  old = torch.get_default_dtype(), torch.get_num_threads()
  torch.set_default_dtype(torch.float32)
  torch.set_num_threads(1)
  with jax.default_matmul_precision("highest"):
    yield
  torch.set_default_dtype(old[0])
  torch.set_num_threads(old[1])


# ---------------------------------------------------------------------------------------------
# PyTorch restatement of the official DASS (uper_lab.py, dass.py).


def _resize(x, size):
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _upsample(x, factor):
  # The official forward's F.upsample_bilinear(x, scale_factor=factor), written out.
  return F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=True)


class TUPerLab(tnn.Module):
  def __init__(self, in_channels, channels, c1_in, c1_channels, aspp_channels, dilations, drop):
    super().__init__()
    self.deeplab = TSepASPPHead(
      4 * channels, aspp_channels, dilations, c1_in, c1_channels, dropout_ratio=drop
    )
    self.convert = tnn.Conv2d(channels, c1_in, 1, 1, 0)
    self.psp_modules = TPPM((1, 2, 3, 6), in_channels[-1], channels)
    self.bottleneck = TConvModule(in_channels[-1] + 4 * channels, channels, 3, padding=1)
    self.lateral_convs = tnn.ModuleList([TConvModule(c, channels, 1) for c in in_channels[:-1]])
    self.fpn_convs = tnn.ModuleList(
      [TConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]]
    )
    self.conv_seg = tnn.Conv2d(channels, 2, 1)
    self.dropout = tnn.Dropout2d(drop)

  def forward(self, inputs):
    laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
    x = inputs[-1]
    laterals.append(self.bottleneck(torch.cat([x] + self.psp_modules(x), 1)))
    for i in range(3, 0, -1):
      laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
    outs = [self.fpn_convs[i](laterals[i]) for i in range(3)] + [laterals[-1]]
    cls_aux = self.conv_seg(self.dropout(outs[0]))
    feat0 = self.convert(outs[0])
    outs = [_resize(o, outs[1].shape[2:]) for o in outs]
    logits, _ = self.deeplab(feat0, torch.cat(outs, 1))
    return logits, cls_aux


class TDASS(tnn.Module):
  def __init__(self, in_chans, dims, depths, ratios, head, aux_channels, drop=0.1, convnext=False):
    super().__init__()
    if convnext:
      self.backbone = TConvNeXt(in_chans, dims, depths)
    else:
      self.backbone = _TorchVAN(in_chans, dims, depths, ratios)
    self.decode_head = TUPerLab(dims, *head, drop)
    self.auxiliary_head = _TorchFCNHead(dims[2], aux_channels, 1, False, 3, 1, 2)
    self.auxiliary_head.dropout.p = drop

  def forward(self, x):
    outs = self.backbone(x)
    logits, cls_aux = self.decode_head(outs)
    if not self.training:
      return _upsample(logits, 4)
    return _upsample(logits, 4), _upsample(self.auxiliary_head(outs[2]), 16), _upsample(cls_aux, 4)


# Tiny sizes: VAN widths, decode head (channels, c1_in, c1_channels, aspp, dilations), aux.
DIMS, DEPTHS, RATIOS = (8, 16, 24, 32), (1, 1, 2, 1), (4, 4, 2, 2)
HEAD = (16, 8, 4, 16, (1, 2, 3))


def _model_config(drop=0.1, backbone="van", input_norm="task"):
  bb = dict(name=backbone, dims=DIMS, depths=DEPTHS, in_chans=9, drop_path_rate=0.0)
  if backbone == "van":
    bb["mlp_ratios"] = RATIOS
  channels, c1_in, c1_channels, aspp, dilations = HEAD
  return dict(
    name="dass",
    input_norm=input_norm,
    backbone=bb,
    head=dict(
      channels=channels,
      c1_in_channels=c1_in,
      c1_channels=c1_channels,
      aspp_channels=aspp,
      dilations=dilations,
      dropout=drop,
    ),
    aux=dict(channels=8, num_convs=1, in_index=2, dropout=drop),
  )


@torch.no_grad()
def _randomize(model, x, seed):
  """Layer scales and LayerNorms away from their init, then calibrated, perturbed BatchNorms."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, _TorchBlock):
      for p in (m.layer_scale_1, m.layer_scale_2):
        p.copy_(0.2 + 0.6 * torch.rand(p.shape[0], generator=g))
    if isinstance(m, tnn.LayerNorm):
      m.weight.uniform_(0.5, 1.5, generator=g)
      m.bias.normal_(0.0, 0.2, generator=g)
  # Dropout would make the calibrating train pass random; it has no parameters.
  drops = [(m, m.p) for m in model.modules() if isinstance(m, tnn.Dropout2d)]
  for m, _ in drops:
    m.p = 0.0
  randomize_(model, x, seed=seed)
  for m, p in drops:
    m.p = p
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      m.num_batches_tracked.zero_()  # the calibrating pass counted one
  return model


def _nhwc(t):
  return np.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def _check(ref, got, what):
  ref = _nhwc(ref)
  got = np.asarray(got)
  assert ref.shape == got.shape, (what, ref.shape, got.shape)
  assert np.std(ref) > 1e-3, what  # the reference carries signal
  err = float(np.max(np.abs(ref - got)))
  assert err < TOL, f"{what}: max abs error {err:.3g}"


@pytest.mark.parametrize("backbone", ["van", "convnext"])
def test_dass_matches_torch(backbone):
  torch.manual_seed(0)
  # Non-square, so resizes to level 1's size vs level 0's and the corner alignment all show.
  x = torch.randn(2, 9, 64, 96)
  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  tmodel = TDASS(9, DIMS, DEPTHS, RATIOS, HEAD, 8, convnext=backbone == "convnext")
  tmodel = _randomize(tmodel, x, seed=1).eval()
  fmodel = models.build_model(_model_config(backbone=backbone))
  variables = _convert(tmodel, fmodel, x_nhwc)

  with torch.no_grad():
    ref = tmodel(x)
  # Op by op (no jit): on CPU one XLA compile of the whole model costs more than running it.
  out = fmodel.apply(variables, x_nhwc, train=False)
  assert out["aux"] == [] and out["image_logits"] is None
  _check(ref, out["logits"], "eval logits")
  # The final upsampling's align_corners=True is what the comparison pins down.
  with torch.no_grad():
    logits_quarter = tmodel.decode_head(tmodel.backbone(x))[0]
  other = F.interpolate(logits_quarter, scale_factor=4.0, mode="bilinear", align_corners=False)
  assert float((other - ref).abs().max()) > 10 * TOL

  if backbone == "van":
    # Training: batch statistics, and both auxiliary outputs (dropout off on both sides).
    tmodel_nodrop = TDASS(9, DIMS, DEPTHS, RATIOS, HEAD, 8, drop=0.0)
    tmodel_nodrop.load_state_dict(tmodel.state_dict())
    tmodel_nodrop.train()
    with torch.no_grad():
      refs = tmodel_nodrop(x)
    fmodel = models.build_model(_model_config(drop=0.0))
    out, _ = fmodel.apply(variables, x_nhwc, train=True, mutable=["batch_stats"])
    for name, r, o in zip(("logits", "fcn aux", "uperlab aux"), refs, [out["logits"], *out["aux"]]):
      _check(r, o, f"train {name}")


def test_auto_annotate_input_norm_matches_the_official_preprocessing():
  """input_norm='auto_annotate' on the task's inputs == Auto_Annotate_SPG.py's own tensors."""
  assert dass.TASK_MEAN == transforms.IMAGENET_MEAN and dass.TASK_STD == transforms.IMAGENET_STD
  rng = np.random.default_rng(0)
  authentic = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
  forged = authentic.copy()
  # Brighter and darker edits: the uint8 difference wraps around for the darker ones.
  forged[:, 8:30, 10:40] = np.clip(authentic[:, 8:30, 10:40].astype(int) + 60, 0, 255)
  forged[:, 34:60, 50:90] = authentic[:, 34:60, 50:90] // 3
  config = ml_collections.ConfigDict(
    {"task": "pair_segmentation", "model": _model_config(input_norm="auto_annotate")}
  )
  inputs = tasks.build(config).model_inputs(
    {"authentic": jnp.asarray(authentic), "forged": jnp.asarray(forged)}
  )["x"]

  # The official script: uint8 CHW tensors, abs(img1 - img2) on uint8, /255, Normalize.
  t_auth = torch.from_numpy(authentic).permute(0, 3, 1, 2)
  t_forg = torch.from_numpy(forged).permute(0, 3, 1, 2)
  t_in = torch.cat((t_auth, t_forg, torch.abs(t_auth - t_forg)), 1).float() / 255.0
  mean = torch.tensor((0.485, 0.455, 0.406) * 3)[None, :, None, None]
  std = torch.tensor((0.229, 0.224, 0.225) * 3)[None, :, None, None]
  t_in = (t_in - mean) / std
  np.testing.assert_allclose(
    np.asarray(dass.auto_annotate_inputs(inputs)), _nhwc(t_in), atol=1e-5, rtol=0
  )

  torch.manual_seed(2)
  tmodel = _randomize(TDASS(9, DIMS, DEPTHS, RATIOS, HEAD, 8), t_in, seed=2).eval()
  fmodel = models.build_model(config.model)
  variables = _convert(tmodel, fmodel, inputs)
  with torch.no_grad():
    ref = tmodel(t_in)
  apply = lambda m, v, x: m.apply(v, x, train=False)["logits"]
  _check(ref, apply(fmodel, variables, inputs), "auto_annotate logits")
  # The task's own convention gives other numbers on these weights.
  task_model = models.build_model(_model_config())
  assert float(np.max(np.abs(np.asarray(apply(task_model, variables, inputs)) - _nhwc(ref)))) > 0.1


# ---------------------------------------------------------------------------------------------
# Importers: the released DASS.pth and convxl.pth key layouts, at full size.

DASS_PARAMS = 130_186_774


def _meta_state_dict(module, prefix="module."):
  """{key: zero-stride numpy array of the official shape}; nothing is allocated."""
  return {
    prefix + k: np.broadcast_to(
      np.zeros((), np.int64 if "num_batches" in k else np.float32), v.shape
    )
    for k, v in module.state_dict().items()
  }


@pytest.fixture(scope="module")
def released_dass():
  """(official key -> shape as the released DASS.pth holds them, torch params, flax target)."""
  with torch.device("meta"):
    official = TDASS(
      9, (96, 192, 480, 768), (3, 3, 24, 3), (8, 8, 4, 4), (512, 256, 48, 512, (1, 12, 24, 36)), 256
    )
  config = ml_collections.ConfigDict({"model": {"name": "dass"}})
  target = models.abstract_variables(models.build_model(config.model), config)
  n_torch = sum(p.numel() for p in official.parameters())
  return _meta_state_dict(official), n_torch, target


def test_released_dass_converts_strictly(released_dass):
  state_dict, n_torch, target = released_dass
  assert models.count_params(target) == n_torch == DASS_PARAMS
  assert "module.decode_head.deeplab.aspp_modules.3.depthwise_conv.conv.weight" in state_dict
  assert state_dict["module.backbone.patch_embed1.proj.weight"].shape == (96, 9, 7, 7)
  variables, report = convert.state_dict_to_variables(state_dict, target, source="DASS.pth")
  assert report.prefix == "strip 'module.'"
  n_bn = sum(k.endswith("num_batches_tracked") for k in state_dict)
  assert report.ignored == n_bn and report.converted == len(state_dict) - n_bn
  assert models.count_params(variables) == DASS_PARAMS


@pytest.mark.parametrize(
  "edit,message",
  [
    ("rename", r"1 unmapped \(module\.decode_head\.convrt\.weight\).*1 missing"),
    ("drop", r"1 missing \(decode_head\.deeplab\.conv_seg\.bias\)"),
    ("reshape", r"1 mismatched \(module\.backbone\.patch_embed1\.proj\.weight: \(96, 6, 7, 7\)"),
  ],
)
def test_released_dass_importer_names_the_bad_key(released_dass, edit, message):
  state_dict, _, target = released_dass
  state_dict = dict(state_dict)
  if edit == "rename":
    state_dict["module.decode_head.convrt.weight"] = state_dict.pop(
      "module.decode_head.convert.weight"
    )
  elif edit == "drop":
    del state_dict["module.decode_head.deeplab.conv_seg.bias"]
  else:
    state_dict["module.backbone.patch_embed1.proj.weight"] = np.zeros((96, 6, 7, 7), np.float32)
  with pytest.raises(UserInputError, match=message) as info:
    convert.state_dict_to_variables(state_dict, target, source="DASS.pth")
  assert "\n" not in str(info.value) and str(info.value).startswith("DASS.pth: ")


class TConvNeXtClassifier(TConvNeXt):
  """classify_convxl.py's ConvNeXt: stages, then `norm` and fc = (Dropout, GAP, Flatten, Linear)."""

  def __init__(self, in_chans, dims, depths, num_classes):
    super().__init__(in_chans, dims, depths)
    for i in range(4):
      delattr(self, f"norm{i}")
    self.fc = tnn.Sequential(
      tnn.Dropout(0.3), tnn.AdaptiveAvgPool2d(1), tnn.Flatten(1), tnn.Linear(dims[-1], num_classes)
    )
    self.norm = TLayerNorm(dims[-1], eps=1e-6, data_format="channels_first")

  def forward(self, x):
    for i in range(4):
      x = self.stages[i](self.downsample_layers[i](x))
    return self.fc(self.norm(x))


def test_released_convxl_converts_strictly():
  with torch.device("meta"):
    official = TConvNeXtClassifier(6, (256, 512, 1024, 2048), (3, 3, 27, 3), 8)
  state_dict = _meta_state_dict(official)
  assert state_dict["module.fc.3.weight"].shape == (8, 2048)
  assert "module.norm.weight" in state_dict and "module.stages.2.26.gamma" in state_dict
  config = ml_collections.ConfigDict({"model": {"name": "pair_classifier"}})
  target = models.abstract_variables(models.build_model(config.model), config)
  n_torch = sum(p.numel() for p in official.parameters())
  state_dict = models.official_state_dict(config.model, state_dict)
  convert.state_dict_to_variables(state_dict, target, source="convxl.pth")
  assert models.count_params(target) == n_torch


def test_pair_classifier_matches_the_official_classifier():
  """classify_convxl.py's forward (stages, one `norm`, dropout, pool, fc.3), tiny widths, fp32,
  weights through the official key layout."""
  dims, depths = (8, 16, 16, 32), (1, 1, 2, 1)
  torch.manual_seed(0)
  official = TConvNeXtClassifier(6, dims, depths, 8).eval()
  randomize_(official)
  config = ml_collections.ConfigDict(
    {"model": {"name": "pair_classifier", "backbone": {"dims": dims, "depths": depths}}}
  )
  model = models.build_model(config.model)
  target = models.abstract_variables(model, config)
  state_dict = {k: v.detach().numpy() for k, v in official.state_dict().items()}
  state_dict = models.official_state_dict(
    config.model, {"module." + k: v for k, v in state_dict.items()}
  )
  variables, _ = convert.state_dict_to_variables(state_dict, target, source="convxl.pth")
  x = np.random.default_rng(0).normal(size=(2, 64, 96, 6)).astype(np.float32)
  with torch.no_grad():
    want = official(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = model.apply(variables, x=jnp.asarray(x), train=False)["logits"]
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------------------------------
# The official checkpoint's file layout through `miml-jax convert`, and the experiment.


@pytest.mark.slow
def test_convert_cli_reads_a_dataparallel_checkpoint(tmp_path, capsys):
  """{'state_dict': {'module.' + key}} as Auto_Annotate_SPG.py loads it -> init file -> same
  numbers as torch."""
  config_arg = EXPERIMENT + ":tiny"
  from miml_jax import config as config_lib

  config = config_lib.load_config(config_arg)
  bb, head = config.model.backbone, config.model.head
  torch.manual_seed(3)
  x = torch.randn(2, 9, 64, 96)
  tmodel = TDASS(
    9,
    tuple(bb.embed_dims),
    tuple(bb.depths),
    tuple(bb.mlp_ratios),
    (head.channels, head.c1_in_channels, head.c1_channels, head.aspp_channels, head.dilations),
    config.model.aux.channels,
  )
  tmodel = _randomize(tmodel, x, seed=3).eval()
  path = tmp_path / "DASS.pth"
  torch.save({"state_dict": {"module." + k: v for k, v in tmodel.state_dict().items()}}, path)
  out = tmp_path / "dass.msgpack"
  code = cli.main(["convert", str(path), "--config", config_arg, "--out", str(out), "--json"])
  stdout, err = capsys.readouterr()
  assert code == 0, err
  assert json.loads(stdout)["prefix"] == "strip 'module.'"
  model = models.build_model(config.model)
  variables, missing = models.load(model, config, str(out))
  assert not missing
  with torch.no_grad():
    ref = tmodel(x)
  got = model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False)
  _check(ref, got["logits"], "converted logits")


def test_experiment_variants_build():
  from miml_jax import config as config_lib

  released = config_lib.load_config(EXPERIMENT + ":released")
  model = models.build_model(released.model)
  # The released architecture (the defaults test_released_dass_converts_strictly counts).
  assert (model.backbone, model.head, model.aux) == (
    dass.backbone_from_dict({}),
    dass.UPerLabConfig(),
    dass.DASSAux(),
  )
  assert model.backbone.dims == (96, 192, 480, 768) and model.backbone.depths == (3, 3, 24, 3)
  assert model.input_norm == "auto_annotate"
  default = config_lib.load_config(EXPERIMENT)
  assert default.loss.weights == (1.0, 0.5, 0.5) and default.loss.name == "ce"
  with pytest.raises(UserInputError, match="model.input_norm"):
    models.build_model({**_model_config(), "input_norm": "official"})
  with pytest.raises(UserInputError, match="model.head"):
    models.build_model({**_model_config(), "head": {"chanels": 8}})


@pytest.mark.slow
def test_tiny_dass_trains_checkpoints_and_evaluates(coco_root, tmp_path, capsys):  # noqa: F811
  workdir = tmp_path / "w"
  code = cli.main(
    [
      "train",
      "--config",
      EXPERIMENT + ":tiny",
      "--workdir",
      str(workdir),
      f"--config.data.train=coco_spg:{coco_root}",
      f"--config.data.validation=coco_spg:{coco_root}",
      # Only the final evaluation (one compile less).
      "--config.train.eval_every=0",
    ]
  )
  _, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # The final output and both auxiliary outputs are trained.
  terms = [r for r in history if "loss_aux1" in r]
  assert len(terms) == 3
  assert all(np.isfinite([r["loss_final"], r["loss_aux0"], r["loss_aux1"]]).all() for r in terms)
  final = json.loads((workdir / "metrics.json").read_text())
  assert final["step"] == 3 and final["summary"]["num_images"] > 0
