"""SACM (CAAA's SDG annotator) and its pieces: the shared correlation op against a direct NumPy
statement and the official index arithmetic; the whole model against a small PyTorch
restatement of the official `SAFM_model` (safm_convb.py, convbuper.py, the CIML UPerHead and
DepthwiseSeparableASPPHead) with its weights copied over, < 1e-4 in float32; the strict
SAFM.pth importer on files the test writes with the official key names, and the official key
set and parameter count of the full-size model (from a torch model on the meta device, so no
130 M parameters are materialised); the coco_sdg source's masks; and the SDG task trained,
checkpointed, resumed and evaluated through the `miml-jax` CLI."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from miml_jax import cli, models
from miml_jax import config as config_lib
from miml_jax.errors import UserInputError
from miml_jax.input import instance_forgery, sdg
from miml_jax.models import convert, naming
from miml_jax.models.correlation import CorrelationPooling, correlation_volume
from miml_jax.tasks import sdg_segmentation
from test_instance_forgery import noise
from test_tasks import coco_root, run  # noqa: F401 (coco_root: a fixture)

torch = pytest.importorskip("torch")
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from miml_jax.torch_reference import (  # noqa: E402
  TPPM,
  TConvModule,
  TConvNeXt,
  TSepASPPHead,
  mmseg_resize,
)
from test_parity import randomize_  # noqa: E402

SACM_TINY = os.path.join(os.path.dirname(__file__), "..", "experiments", "caaa_sacm.py:tiny")
# The tiny experiment's SACM: 64 x 64 inputs (an 8 x 8 correlation grid, 64 shifts).
SMALL = config_lib.load_config(SACM_TINY).model.to_dict()


@pytest.fixture(scope="module", autouse=True)
def _float32_highest_precision():
  old_threads = torch.get_num_threads()
  torch.set_num_threads(1)
  with jax.default_matmul_precision("highest"):
    yield
  torch.set_num_threads(old_threads)


# ---- correlation ------------------------------------------------------------------------------
def _official_corr(x1, x2):
  """safm_convb.Correlation_Module with get_mapping_indices, on NCHW torch tensors."""
  b, c, h, w = x1.shape
  n = h * w
  indices = []
  for rx in range(h):
    for cx in range(w):
      for rb in range(h):
        for cb in range(w):
          ia = ((rb + rx) % h) * w + (cb + cx) % w
          indices.append(ia * n + rb * w + cb)
  m = torch.bmm(x2.reshape(b, c, n).permute(0, 2, 1), x1.reshape(b, c, n) / c)
  return torch.index_select(m.reshape(b, -1), 1, torch.tensor(indices)).reshape(b, n, h, w)


def test_correlation_volume_matches_numpy_and_the_official_indices():
  rng = np.random.default_rng(0)
  # A non-square grid: rows and columns of the shift must not be mixed up.
  a, b = (rng.normal(size=(2, 3, 5, 4)).astype(np.float32) for _ in range(2))
  want = np.zeros((2, 3, 5, 15), np.float32)
  for r in range(3):
    for c in range(5):
      for dy in range(3):
        for dx in range(5):
          want[:, r, c, dy * 5 + dx] = np.sum(a[:, r, c] * b[:, (r + dy) % 3, (c + dx) % 5], -1) / 4
  got = np.asarray(correlation_volume(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got, want, atol=1e-6)
  official = _official_corr(
    torch.from_numpy(a.transpose(0, 3, 1, 2)), torch.from_numpy(b.transpose(0, 3, 1, 2))
  )
  np.testing.assert_allclose(got, official.numpy().transpose(0, 2, 3, 1), atol=1e-6)
  # Not symmetric: Corr(a, b) lies in a's frame.
  assert not np.allclose(got, np.asarray(correlation_volume(jnp.asarray(b), jnp.asarray(a))))
  with pytest.raises(ValueError, match="one shape"):
    correlation_volume(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 3, 3)))


def test_correlation_pooling_is_max_mean_and_a_1x1_conv():
  rng = np.random.default_rng(1)
  volume = rng.normal(size=(2, 3, 4, 12)).astype(np.float32)
  pool = CorrelationPooling(num_learned=5)
  variables = pool.init(jax.random.PRNGKey(0), volume)
  kernel = np.asarray(variables["params"]["fc"]["kernel"])
  bias = np.asarray(variables["params"]["fc"]["bias"])
  assert kernel.shape == (1, 1, 12, 5)  # torch fc.weight (5, 12, 1, 1)
  got = np.asarray(pool.apply(variables, volume))
  want = np.concatenate(
    [volume.max(-1, keepdims=True), volume.mean(-1, keepdims=True), volume @ kernel[0, 0] + bias],
    -1,
  )
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---- PyTorch restatement of the official SAFM_model ------------------------------------------
class TUPerFeatures(tnn.Module):
  """The CIML UPerHead: laterals + PSP, top-down sum, fpn convs, all resized to level 1."""

  def __init__(self, in_channels, channels, pool_scales=(1, 2, 3, 6)):
    super().__init__()
    self.conv_seg = tnn.Conv2d(channels, 2, 1)
    self.psp_modules = TPPM(pool_scales, in_channels[-1], channels)
    self.bottleneck = TConvModule(
      in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1
    )
    self.lateral_convs = tnn.ModuleList([TConvModule(c, channels, 1) for c in in_channels[:-1]])
    self.fpn_convs = tnn.ModuleList(
      [TConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]]
    )

  def forward(self, inputs):
    laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
    laterals.append(self.bottleneck(torch.cat([inputs[-1]] + self.psp_modules(inputs[-1]), 1)))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + mmseg_resize(laterals[i], laterals[i - 1].shape[2:])
    outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
    return [mmseg_resize(o, outs[1].shape[2:]) for o in outs]


class TFCNHead(tnn.Module):
  def __init__(self, cin, channels):
    super().__init__()
    self.conv_seg = tnn.Conv2d(channels, 2, 1)
    self.convs = tnn.Sequential(TConvModule(cin, channels, 3, padding=1))


class TConvBUPer(tnn.Module):
  def __init__(self, dims, depths, channels, aux_channels, pool_scales):
    super().__init__()
    self.backbone = TConvNeXt(3, dims, depths)
    self.decode_head = TUPerFeatures(dims, channels, pool_scales)
    self.auxiliary_head = TFCNHead(dims[2], aux_channels)

  def forward(self, x):
    return self.decode_head(self.backbone(x))


class TPoolopt(tnn.Module):
  def __init__(self, shifts, num_learned):
    super().__init__()
    self.fc = tnn.Conv2d(shifts, num_learned, 1, 1, 0)

  def forward(self, corr):
    return torch.cat(
      (torch.max(corr, 1, keepdim=True)[0], torch.mean(corr, 1, keepdim=True), self.fc(corr)), 1
    )


class TSAFM(tnn.Module):
  """safm_convb.SAFM_model, sized by arguments (the official: 512 px, ConvNeXt-B, 512 wide)."""

  def __init__(
    self,
    image_size,
    dims,
    depths,
    channels,
    pool_scales,
    aux_channels,
    num_learned,
    aspp,
    dilations,
    c1,
    up,
  ):
    super().__init__()
    self.models = TConvBUPer(dims, depths, channels, aux_channels, pool_scales)
    self.poolopt_on_corrmat = TPoolopt((image_size // 8) ** 2, num_learned)
    corr = 32 * (2 + num_learned)
    self.deeplab = TSepASPPHead(
      3 * channels + corr, aspp, dilations, channels, c1, dropout_ratio=0.1
    )
    self.seg_out = tnn.Conv2d(corr, 2, 1, 1, 0)
    self.deeplab.conv_seg = tnn.Sequential(
      tnn.UpsamplingBilinear2d(scale_factor=2.0),
      tnn.Conv2d(aspp, up[0], 3, 1, 1),
      tnn.BatchNorm2d(up[0]),
      tnn.ReLU(),
      tnn.UpsamplingBilinear2d(scale_factor=2.0),
      tnn.Conv2d(up[0], up[1], 3, 1, 1),
      tnn.BatchNorm2d(up[1]),
      tnn.ReLU(),
      tnn.UpsamplingBilinear2d(scale_factor=2.0),
      tnn.Conv2d(up[1], 2, 1, 1, 0),
    )

  def corr_fun(self, x1, x2):
    pool = self.poolopt_on_corrmat
    c12, c21 = pool(_official_corr(x1, x2)), pool(_official_corr(x2, x1))
    c11, c22 = pool(_official_corr(x1, x1)), pool(_official_corr(x2, x2))
    return torch.cat((c12, c11), 1), torch.cat((c21, c22), 1)

  def forward(self, x1, x2):
    f1, f2 = self.models(x1), self.models(x2)
    # The official order: 3, 4, 5, 6, 3a, 4a, 5a, 6a, 3b, ... written out.
    order = [(0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (1, 0), (2, 0), (3, 0)]
    order += [(0, 2), (1, 2), (2, 1), (3, 1), (0, 3), (1, 3), (2, 3), (3, 2)]
    pairs = [self.corr_fun(f1[i], f2[j]) for i, j in order]
    c1 = torch.cat([p[0] for p in pairs], 1)
    c2 = torch.cat([p[1] for p in pairs], 1)
    p1, p2 = self.seg_out(c1), self.seg_out(c2)
    c1 = torch.cat((f1[0], f1[1], f1[2], c1), 1) + F.softmax(p1, dim=1)[:, 1:2]
    c2 = torch.cat((f2[0], f2[1], f2[2], c2), 1) + F.softmax(p2, dim=1)[:, 1:2]
    x1, _ = self.deeplab(f1[0], c1)
    x2, _ = self.deeplab(f2[0], c2)
    up = functools.partial(F.interpolate, scale_factor=8.0, mode="bilinear")
    return x1, x2, up(p1), up(p2)


def _torch_sacm(cfg):
  bb = cfg["backbone"]
  return TSAFM(
    cfg["image_size"],
    bb["dims"],
    bb["depths"],
    cfg["channels"],
    cfg.get("pool_scales", (1, 2, 3, 6)),
    cfg["aux_channels"],
    cfg["num_learned"],
    cfg["aspp_channels"],
    cfg["dilations"],
    cfg["c1_channels"],
    cfg["up_channels"],
  )


def _state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _config(model=SMALL):
  return ml_collections.ConfigDict({"model": model})


def test_sacm_matches_the_official_model_in_pytorch():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  f = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  ta, tf = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (a, f))
  torch.manual_seed(3)
  tmodel = randomize_(_torch_sacm(SMALL), ta, tf)
  model = models.build_model(SMALL)
  target = models.abstract_variables(model, _config())
  variables, report = convert.state_dict_to_variables(_state_dict(tmodel), target, strict=True)
  assert report.prefix == "none" and not (report.unmapped or report.missing or report.mismatched)
  with torch.no_grad():
    refs = tmodel(ta, tf)
  outs = jax.jit(functools.partial(model.apply, train=False))(variables, authentic=a, forged=f)
  names = ("authentic_logits", "forged_logits", "authentic_aux", "forged_aux")
  for name, ref in zip(names, refs, strict=True):
    ref = ref.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(outs[name])
    assert got.shape == ref.shape == (2, 64, 64, 2), name
    assert np.std(ref) > 1e-3, name
    err = float(np.max(np.abs(got - ref)))
    assert err < 1e-4, f"{name}: max abs error {err:.3g}"
  # Training mode, the official two passes (joint_batch=False): each image's batch is
  # normalised with its own statistics, as the two torch calls do.
  official = models.build_model({**SMALL, "joint_batch": False})
  tmodel.train()
  tmodel.deeplab.dropout.p = 0.0  # (SMALL has dropout 0 and no drop path.)
  with torch.no_grad():
    refs = tmodel(ta, tf)
  outs_train, _ = jax.jit(functools.partial(official.apply, train=True, mutable=["batch_stats"]))(
    variables, authentic=a, forged=f
  )
  for name, ref in zip(names, refs, strict=True):
    err = float(np.max(np.abs(np.asarray(outs_train[name]) - ref.numpy().transpose(0, 2, 3, 1))))
    assert err < 1e-4, f"train-mode {name}: max abs error {err:.3g}"
  # Swapping the images changes the forged map: the model uses both.
  swapped = jax.jit(functools.partial(model.apply, train=False))(variables, authentic=f, forged=a)
  assert not np.allclose(np.asarray(swapped["forged_logits"]), np.asarray(outs["forged_logits"]))


# ---- importer ---------------------------------------------------------------------------------
def test_full_size_sacm_has_the_official_keys_shapes_and_parameter_count():
  """The official model (512 px, ConvNeXt-B), built by torch on the meta device (shapes only)
  against our eval_shape'd tree: the same keys, shapes and parameter count."""
  full = dict(
    name="sacm",
    image_size=512,
    backbone=dict(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3)),
    channels=512,
    aux_channels=256,
    num_learned=14,
    aspp_channels=512,
    dilations=(1, 12, 24, 36),
    c1_channels=48,
    up_channels=(128, 32),
  )
  with torch.device("meta"):
    tmodel = _torch_sacm(full)
  official = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
  official_params = sum(p.numel() for p in tmodel.parameters())
  model = models.build_model({"name": "sacm"})  # The defaults are the official model.
  abstract = models.abstract_variables(model, _config({"name": "sacm"}))
  ours = {k: shape for k, (_, _, shape) in naming.flax_tree_to_torch_keys(abstract).items()}
  assert ours == {k: s for k, s in official.items() if not k.endswith("num_batches_tracked")}
  assert models.count_params(abstract) == official_params == 130_936_870
  assert official["poolopt_on_corrmat.fc.weight"] == (14, 4096, 1, 1)
  # The DataParallel file: every key under 'module.', zero-stride arrays (no 500 MB).
  state = {"module." + k: np.broadcast_to(np.float32(0.5), s) for k, s in official.items()}
  variables, report = convert.state_dict_to_variables(state, abstract, source="SAFM.pth")
  assert not (report.unmapped or report.missing or report.mismatched)


def test_safm_pth_converts_strictly(tmp_path, capsys):
  torch.manual_seed(0)
  tmodel = _torch_sacm(SMALL)
  state = {"module." + k: v for k, v in tmodel.state_dict().items()}  # DataParallel's file
  path = tmp_path / "SAFM.pth"
  torch.save(state, path)
  config = _config()
  out = tmp_path / "sacm.msgpack"
  code, _, err = run(capsys, "convert", path, "--config", SACM_TINY, "--out", out)
  assert code == 0, err
  assert os.path.isfile(out)
  # Strict: an unknown key, a missing key and a wrong shape are one-line errors naming them.
  target = models.abstract_variables(models.build_model(SMALL), config)
  plain = {k: v.numpy() for k, v in state.items()}
  extra = dict(plain, **{"module.deeplab.extra.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(UserInputError, match="deeplab.extra.weight"):
    convert.state_dict_to_variables(extra, target, source=str(path))
  missing = {k: v for k, v in plain.items() if "seg_out.weight" not in k}
  with pytest.raises(UserInputError, match="seg_out"):
    convert.state_dict_to_variables(missing, target, source=str(path))
  wrong = dict(plain)
  wrong["module.poolopt_on_corrmat.fc.weight"] = np.zeros((3, 4096, 1, 1), np.float32)
  with pytest.raises(UserInputError, match="poolopt_on_corrmat.fc.weight"):
    convert.state_dict_to_variables(wrong, target, source=str(path))


def test_bad_sacm_settings_are_one_line_errors():
  with pytest.raises(UserInputError, match="model.image_size"):
    models.build_model({**SMALL, "image_size": 48})
  with pytest.raises(UserInputError, match="unknown key"):
    models.build_model({**SMALL, "width": 3})
  model = models.build_model(SMALL)
  with pytest.raises(UserInputError, match="'forged' must be"):
    model.init(
      jax.random.PRNGKey(0),
      authentic=jnp.zeros((1, 64, 64, 3)),
      forged=jnp.zeros((1, 32, 32, 3)),
      train=False,
    )


# ---- the coco_sdg source ----------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_coco_sdg_pastes_donor_pixels_under_both_masks(shared_data, flip):
  from miml_jax.input import coco

  instances = coco.open_instances(os.path.join(shared_data, "coco_mini"), "validation")
  cfg = instance_forgery.InstanceForgeryConfig(
    scale_range=(1.0, 1.0), flip_prob=float(flip), occlude_prob=0.5
  )
  source = sdg.SDGSource(instances, 64, seed=0, split_id=1, config=cfg)
  checked = 0
  for index in range(12):
    sample = source[index]
    if sample["kind"] != "sdg":
      assert not sample["mask"].any() and not sample["donor_mask"].any()
      continue
    target, donor = sample["mask"] > 0, sample["donor_mask"] > 0
    ty, tx = np.nonzero(target)
    dy, dx = np.nonzero(donor)
    # At scale 1 the paste is a translation (and a mirror): the masks are images of each other.
    assert len(ty) == len(dy) > 0
    sy = ty.min() - dy.min()
    if flip:
      mirror = dx.max() + tx.min()
      back = np.zeros_like(donor)
      back[ty - sy, mirror - tx] = True
      src = sample["authentic"][ty - sy, mirror - tx]
    else:
      sx = tx.min() - dx.min()
      back = np.zeros_like(donor)
      back[ty - sy, tx - sx] = True
      src = sample["authentic"][ty - sy, tx - sx]
    np.testing.assert_array_equal(back, donor)
    np.testing.assert_array_equal(sample["forged"][ty, tx], src)
    checked += 1
  assert checked >= 6
  # Deterministic per (seed, index); another seed makes another pair.
  again = sdg.SDGSource(instances, 64, seed=0, split_id=1, config=cfg)[3]
  np.testing.assert_array_equal(again["forged"], source[3]["forged"])
  other = sdg.SDGSource(instances, 64, seed=1, split_id=1, config=cfg)[3]
  assert not np.array_equal(other["forged"], again["forged"])


# ---- the task through the CLI -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sdg_run(coco_root, tmp_path_factory):  # noqa: F811
  workdir = tmp_path_factory.mktemp("sdg") / "w"
  code = cli.main(
    [
      "train",
      "--config",
      SACM_TINY,
      "--workdir",
      str(workdir),
      "--json",
      f"--config.data.train=coco_sdg:{coco_root}",
      f"--config.data.validation=coco_sdg:{coco_root}",
      "--config.train.steps=4",
      "--config.train.eval_every=0",
      "--config.input.batch_size=2",
    ]
  )
  assert code == 0
  return workdir


def test_sdg_task_trains_checkpoints_resumes_and_evaluates(
  sdg_run,
  coco_root,  # noqa: F811
  tmp_path,
  capsys,
):
  from miml_jax import checkpoint

  assert sorted(os.listdir(sdg_run / "checkpoints")) == ["2", "4"]
  history = [json.loads(line) for line in (sdg_run / "metrics.jsonl").read_text().splitlines()]
  losses = [r for r in history if "loss" in r]
  assert losses and all(np.isfinite(r["loss"]) for r in losses)
  assert {"loss_forged", "loss_authentic", "loss_forged_aux"} <= {
    k.split("/")[-1] for r in losses for k in r
  }
  # Exact resume: drop the last checkpoint and train its steps again.
  resumed = tmp_path / "resumed"
  shutil.copytree(sdg_run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  code, _, err = run(
    capsys,
    "train",
    "--config",
    SACM_TINY,
    "--workdir",
    resumed,
    f"--config.data.train=coco_sdg:{coco_root}",
    f"--config.data.validation=coco_sdg:{coco_root}",
    "--config.train.steps=4",
    "--config.train.eval_every=0",
    "--config.input.batch_size=2",
  )
  assert code == 0 and "resumed from" in err
  for a, b in zip(
    jax.tree_util.tree_leaves(checkpoint.load_model(str(resumed), 4)[2]),
    jax.tree_util.tree_leaves(checkpoint.load_model(str(sdg_run), 4)[2]),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # eval: the forged image's map by the MIML protocol, and the donor masks.
  code, out, _ = run(capsys, "eval", "--checkpoint", sdg_run, "--json", "--conventions", "none")
  assert code == 0, out
  result = json.loads(out)
  assert result["summary"]["num_images"] > 0 and 0.0 <= result["summary"]["iou"] <= 1.0
  assert 0.0 <= result["summary"]["donor_iou"] <= 1.0 and "donor_pixel_auc" in result["summary"]
  # predict on pair folders of unequal sizes: each image's map at its own size.
  from miml_jax import io

  pair = tmp_path / "pairs" / "p0"
  pair.mkdir(parents=True)
  io.write_image(str(pair / "0.png"), noise(48, 56, 1))
  io.write_image(str(pair / "1.png"), noise(40, 72, 2))
  code, out, _ = run(
    capsys, "predict", pair, "--checkpoint", sdg_run, "--out", tmp_path / "p", "--json"
  )
  assert code == 0, out
  (record,) = json.loads(out)["predictions"]
  assert io.read_image(record["files"]["heatmap"]).shape[:2] == (40, 72)
  assert io.read_image(record["donor"]["files"]["heatmap"]).shape[:2] == (48, 56)


def test_sdg_train_transform_draws_each_image_on_its_own():
  from miml_jax.input import transforms

  config = _config()
  config.input = {"augment": {"crop_size": 32}}
  task = sdg_segmentation.SDGSegmentationTask(config)
  # No resize and no photometric change: only flips and quarter turns move the pixels.
  augment = transforms.AugmentConfig(
    crop_size=32, resize_range=(1.0, 1.0), jpeg_prob=0.0, rgb_shift_prob=0.0
  )
  transform = task.train_transform(augment)
  pattern = np.zeros((32, 32), np.uint8)
  pattern[:20, :12] = 255  # An asymmetric region: every flip and turn moves it.
  image = np.repeat(pattern[..., None], 3, axis=-1)
  element = {"authentic": image, "forged": image, "donor_mask": pattern, "mask": pattern}
  differ = 0
  for seed in range(8):
    out = transform(element, np.random.default_rng(seed))
    # Each mask followed its own image...
    np.testing.assert_array_equal(out["donor_mask"], out["authentic"][..., 0] > 127)
    np.testing.assert_array_equal(out["mask"], out["forged"][..., 0] > 127)
    # ... and the two images got their own draws.
    differ += not np.array_equal(out["authentic"], out["forged"])
  assert differ
  # Without a donor mask (real pairs) the authentic image's labels are ignored; with has_mask
  # False the forged image's too.
  out = transform(
    {"authentic": image, "forged": image, "mask": pattern, "has_mask": False},
    np.random.default_rng(0),
  )
  assert (out["donor_mask"] == transforms.IGNORE_LABEL).all()
  assert (out["mask"] == transforms.IGNORE_LABEL).all()


def test_sdg_batches_and_loss():
  config = _config()
  config.input = {"augment": {"crop_size": 64}}
  config.loss = dict(name="ce", aux_weight=0.4, authentic_weight=1.0, dice_weight=0.0)
  task = sdg_segmentation.SDGSegmentationTask(config)
  batch = task.random_batch(np.random.default_rng(0), 2, 64)
  assert {k: v.shape for k, v in batch.items()} == {
    "authentic": (2, 64, 64, 3),
    "forged": (2, 64, 64, 3),
    "donor_mask": (2, 64, 64),
    "mask": (2, 64, 64),
  }
  model = models.build_model(SMALL)
  variables = jax.jit(lambda r: models.init_variables(model, config, r))(jax.random.PRNGKey(0))
  inputs = task.model_inputs(batch)
  outputs = model.apply(variables, **inputs, train=False)
  loss, terms = task.loss(outputs, batch)
  want = (
    terms["loss_forged"]
    + 0.4 * terms["loss_forged_aux"]
    + terms["loss_authentic"]
    + 0.4 * terms["loss_authentic_aux"]
  )
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
