"""BusterNet (models/busternet.py) and the copy_move task (tasks/copy_move.py): the original's
fixed operations against direct NumPy statements of the Keras code, the published parameter
counts, the strict importers of the released Keras file and of VGG16's, BusterNet's own
evaluation protocol against a restatement of the release's notebooks, the source masks of
`coco_copymove:`, and a tiny BusterNet through `miml-jax train / eval / predict`, both stages."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keras_files import write_keras_layers
from miml_jax import cli, io, models, tasks
from miml_jax import config as config_lib
from miml_jax.errors import UserInputError
from miml_jax.input import instance_forgery
from miml_jax.models import busternet as bn
from miml_jax.tasks import copy_move
from test_instance_forgery import ellipse, noise
from test_tasks import coco_root  # noqa: F401 (a fixture)

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "busternet.py")


def run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def numpy_conv_same(x, kernel, bias):
  """Keras Conv2D(padding='same') of (H, W, I) with an HWIO kernel, odd sizes, in float64."""
  k = kernel.shape[0]
  padded = np.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(0, 1))
  return np.einsum("hwiab,abio->hwo", windows, kernel, optimize=True) + bias


# ---- the original's fixed operations -------------------------------------------------------
def test_percentile_ranks_are_tfs_and_skip_the_self_match():
  ranks = bn.percentile_ranks(256, 256)
  # round(linspace(1, 255, 256)): 1..255 with 128 twice (the step is 254/255 < 1).
  assert ranks[0] == 1 and ranks[-1] == 255 and len(ranks) == 256
  assert sorted(set(ranks.tolist())) == list(range(1, 256))
  assert (ranks == 128).sum() == 2
  np.testing.assert_array_equal(bn.percentile_ranks(16, 0), np.arange(1, 16))
  np.testing.assert_array_equal(bn.percentile_ranks(16, 5), [1, 4, 8, 12, 15])


def test_self_correlation_percentile_pooling_matches_numpy_with_ties():
  """Standardisation over channels (population std, floored at 1e-4), X X^T / C, each row
  sorted descending, ranks kept from 1 on; with duplicated pixels (ties with the self match)
  and a constant pixel (its std floored: an all-zero row)."""
  rng = np.random.default_rng(0)
  height, width, channels = 4, 4, 32
  x = rng.normal(size=(2, height, width, channels)).astype(np.float32) * 3 + 1
  x[0, 1, 2] = x[0, 3, 0]  # A copy: a second correlation of exactly 1 in both rows.
  x[1, 2, 2] = x[1, 0, 1] * 2 + 5  # An affine copy: equal after standardisation.
  x[1, 3, 3] = 7.0  # Constant over channels.
  for nb_pools in (256, 0, 7):
    got = np.asarray(
      bn.self_correlation_percentile_pooling(bn.std_norm_along_channels(jnp.asarray(x)), nb_pools)
    )
    flat = x.reshape(2, height * width, channels).astype(np.float64)
    mean = flat.mean(-1, keepdims=True)
    std = np.maximum(1e-4, np.sqrt(((flat - mean) ** 2).mean(-1, keepdims=True)))
    z = (flat - mean) / std
    corr = z @ z.transpose(0, 2, 1) / channels
    ordered = -np.sort(-corr, axis=-1)
    n = height * width
    ranks = np.arange(1, n) if nb_pools == 0 else np.round(np.linspace(1, n - 1, nb_pools))
    want = ordered[..., ranks.astype(int)].reshape(2, height, width, -1)
    np.testing.assert_allclose(got, want, atol=1e-5)
  # The self match (1 after standardisation) is skipped: a pixel with a copy still shows 1 at
  # rank 1, one without shows its best other match, below 1; the constant pixel shows 0.
  first = got[..., 0]
  assert first[0, 1, 2] == pytest.approx(1.0, abs=1e-5)
  assert first[0, 0, 0] < 0.9
  assert first[1, 3, 3] == 0.0


def test_resizes_are_tfs_align_corners():
  """TF1 bilinear with align_corners=True: the corners map onto the corners, and a linear
  ramp stays exactly linear (half-pixel resizes do neither)."""
  ramp = np.tile(np.arange(5, dtype=np.float32), (3, 1))  # (3, 5)
  up = bn.resize_align_corners_np(ramp, (3, 9))
  np.testing.assert_allclose(up[0], np.linspace(0, 4, 9), atol=1e-6)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 6, 2)).astype(np.float32))
  y = np.asarray(bn.resize_align_corners(x, (7, 11)))
  np.testing.assert_allclose(y[0, [0, -1]][:, [0, -1]], np.asarray(x)[0, [0, -1]][:, [0, -1]])
  np.testing.assert_allclose(bn.resize_align_corners_np(np.asarray(x)[0], (7, 11)), y[0], atol=1e-5)


def test_bn_inception_block_follows_keras():
  """Parallel 'same' convs, concatenated, Keras BatchNorm (eps 1e-3; training: biased batch
  statistics, running averages with momentum 0.99), ReLU."""
  rng = np.random.default_rng(2)
  block = bn.BnInception(2, (1, 3, 5))
  x = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
  variables = block.init(jax.random.PRNGKey(0), jnp.asarray(x), True)
  params = jax.tree_util.tree_map(
    lambda v: rng.normal(size=v.shape).astype(np.float32), variables["params"]
  )
  stats = {
    "bn": {
      "mean": rng.normal(size=6).astype(np.float32),
      "var": rng.uniform(0.5, 2, 6).astype(np.float32),
    }
  }
  variables = {"params": params, "batch_stats": stats}
  convs = np.concatenate(
    [
      np.stack(
        [numpy_conv_same(xi, params[f"c{i}"]["kernel"], params[f"c{i}"]["bias"]) for xi in x]
      )
      for i in range(3)
    ],
    axis=-1,
  )
  gamma, beta = params["bn"]["scale"], params["bn"]["bias"]
  inference = np.maximum(
    (convs - stats["bn"]["mean"]) / np.sqrt(stats["bn"]["var"] + 1e-3) * gamma + beta, 0
  )
  got = block.apply(variables, jnp.asarray(x), True)
  np.testing.assert_allclose(np.asarray(got), inference, rtol=1e-4, atol=1e-4)
  got, updates = block.apply(variables, jnp.asarray(x), False, mutable=["batch_stats"])
  mean, var = convs.mean((0, 1, 2)), convs.var((0, 1, 2))
  training = np.maximum((convs - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0)
  np.testing.assert_allclose(np.asarray(got), training, rtol=1e-4, atol=1e-4)
  new = updates["batch_stats"]["bn"]
  np.testing.assert_allclose(new["mean"], 0.99 * stats["bn"]["mean"] + 0.01 * mean, rtol=1e-5)
  np.testing.assert_allclose(new["var"], 0.99 * stats["bn"]["var"] + 0.01 * var, rtol=1e-4)


# ---- parameter counts -------------------------------------------------------------------------
def _count(*trees):
  return sum(int(np.prod(leaf.shape)) for t in trees for leaf in jax.tree_util.tree_leaves(t))


def _abstract(**model):
  config = config_lib.load_config(EXPERIMENT)
  config.model.update(model)
  return models.abstract_variables(models.build_model(config.model), config)


def test_parameter_counts_are_the_released_ones():
  """Keras counts BatchNorm's moving statistics too; the published branch totals exclude the
  auxiliary heads (the released model cuts them off). They hold at 256 pooling ranks, the
  pooling layer's default, not the 100 the builder passes and never uses."""
  v = _abstract()

  def branch(v, name, aux):
    params = {k: x for k, x in v["params"][name].items() if k != aux}
    return _count(params, v["batch_stats"][name])

  assert branch(v, "simiDet", "pred_mask") == bn.SIMILARITY_PARAMS == 7_735_568
  assert branch(v, "maniDet", "dconv_pred_mask") == bn.MANIPULATION_PARAMS == 7_789_694
  released = _abstract(aux_heads=False)
  assert _count(released["params"], released["batch_stats"]) == bn.RELEASED_PARAMS == 15_526_813
  # The two auxiliary heads: 3x3 convs from 6 channels to 1.
  assert _count(v["params"], v["batch_stats"]) == 15_526_813 + 2 * (3 * 3 * 6 + 1)
  # 156 fewer pooled channels: their BatchNorm (4 each) and the 1/3/5 convs' 8 filters' inputs.
  fewer = 156 * (4 + 8 * (1 + 9 + 25))
  assert branch(_abstract(nb_pools=100), "simiDet", "pred_mask") == 7_735_568 - fewer == 7_691_264


# ---- importers ----------------------------------------------------------------------------
# The released file's top-level layers (create_BusterNet_testing_model): the two branch models
# are nested Model layers holding their inner layers' weights.
_LAYERS = (
  "image_in",
  "preprocess",
  "simiFeatex",
  "maniFeatex",
  "merge",
  "fusion_c0",
  "fusion_c1",
  "fusion_c2",
  "fusion_merge",
  "fusion_bn",
  "fusion_re",
  "pred_mask",
  "restore",
)


def _released_weights(seed=0) -> dict[str, np.ndarray]:
  """Keras weight name -> array, random, in the released model's shapes."""
  v = _abstract(aux_heads=False)
  rng = np.random.default_rng(seed)
  out = {}
  for name, path in bn.KERAS_LAYOUT.names.items():
    leaf = v
    for part in path.split("/"):
      leaf = leaf[part]
    value = rng.normal(0, 0.05, leaf.shape).astype(np.float32)
    if name.endswith("moving_variance"):
      value = np.abs(value) + 0.5
    out[name + ":0"] = value
  return out


def _write_keras(path, layers: dict[str, dict[str, np.ndarray]]):
  """A Keras 2.0.7 `save_weights` file, as the release's."""
  write_keras_layers(path, layers, full_model=False, keras_version="2.0.7")


def _released_layers(weights):
  layers = {name: {} for name in _LAYERS}
  for name, value in weights.items():
    layer = name.split("/")[0]
    owner = (
      "simiFeatex"
      if layer.startswith("simiDet")
      else "maniFeatex"
      if layer.startswith("maniDet")
      else layer
    )
    layers[owner][name] = value
  return layers


def test_released_weights_convert_strictly_and_run_as_keras(tmp_path, capsys):
  weights = _released_weights()
  good = tmp_path / "pretrained_busterNet.hd5"
  _write_keras(good, _released_layers(weights))
  out = tmp_path / "busternet.msgpack"
  released = f"{EXPERIMENT}:released"
  code, _, err = run(capsys, "convert", good, "--config", released, "--out", out)
  assert code == 0, err
  config = tasks.validate_config(config_lib.load_config(released))
  # Parameter shapes do not depend on the input size: run the converted weights at 32 px.
  config.model.input_size = 32
  model = models.build_model(config.model)
  variables, missing = models.load(model, config, str(out))
  assert not missing
  np.testing.assert_array_equal(
    variables["batch_stats"]["fusion"]["bn"]["var"], weights["fusion_bn/moving_variance:0"]
  )
  image = noise(32, 32, 3)
  x = np.asarray(bn.caffe_preprocess(image[None]))
  _, state = model.apply(
    variables, jnp.asarray(x), train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  # The first VGG block of each branch, as Keras computes it: conv + ReLU twice (the second
  # conv's output before its ReLU is what flax captures), the caffe input BGR minus the means.
  caffe = image[..., ::-1].astype(np.float64) - np.asarray(bn.CAFFE_MEAN_BGR)
  for branch in ("simiDet", "maniDet"):

    def w(layer, leaf, branch=branch):
      return weights[f"{branch}_{layer}/{leaf}:0"].astype(np.float64)

    h = np.maximum(numpy_conv_same(caffe, w("cnn_b1c1", "kernel"), w("cnn_b1c1", "bias")), 0)
    want = numpy_conv_same(h, w("cnn_b1c2", "kernel"), w("cnn_b1c2", "bias"))
    got = state["intermediates"][branch]["cnn_b1c2"]["__call__"][0][0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)

  # Strict: an unknown weight, a missing one, a wrong shape; each one line naming the file.
  cases = {
    "unknown": dict(weights, **{"simiDet_cnn_b5c1/kernel:0": np.zeros((3, 3, 512, 512))}),
    "missing": {k: v for k, v in weights.items() if k != "maniDet_dconv_dx8_c1/bias:0"},
    "shape": dict(weights, **{"fusion_c2/kernel:0": np.zeros((3, 3, 12, 3), np.float32)}),
  }
  expected = {"unknown": "simiDet_cnn_b5c1", "missing": "maniDet_dconv_dx8_c1", "shape": "fusion"}
  for case, bad_weights in cases.items():
    bad = tmp_path / f"{case}.hd5"
    _write_keras(bad, _released_layers(bad_weights))
    code, _, err = run(capsys, "convert", bad, "--config", released, "--out", tmp_path / case)
    assert code == 2, case
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and expected[case] in err, err
  # The training model has auxiliary heads the released file lacks: named, never guessed.
  code, _, err = run(capsys, "convert", good, "--config", EXPERIMENT, "--out", tmp_path / "aux")
  assert code == 2 and "pred_mask" in err


def test_vgg16_imagenet_weights_fill_both_trunks(tmp_path):
  rng = np.random.default_rng(4)
  widths = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
  names = [f"block{b}_conv{c}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for c in range(1, n + 1)]
  layers, inputs = {"input_1": {}}, 3
  for name, width in zip(names, widths, strict=True):
    layers[name] = {
      f"{name}/kernel:0": rng.normal(size=(3, 3, inputs, width)).astype(np.float32),
      f"{name}/bias:0": rng.normal(size=width).astype(np.float32),
    }
    inputs = width
    if name.endswith(("2_conv2", "1_conv2", "_conv3")):
      layers[name.split("_")[0] + "_pool"] = {}
  path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
  _write_keras(path, layers)
  loaded = bn.vgg16_variables(str(path), _abstract())["params"]
  for branch in ("simiDet", "maniDet"):
    np.testing.assert_array_equal(
      loaded[branch]["cnn_b3c2"]["kernel"], layers["block3_conv2"]["block3_conv2/kernel:0"]
    )
    assert len(loaded[branch]) == 10  # Blocks 1-4; block 5 is not BusterNet's.
  with pytest.raises(UserInputError, match="model.vgg_widths must be"):
    bn.vgg16_variables(str(path), _abstract(vgg_widths=(8, 8, 16, 16)))
  layers["fc1"] = {"fc1/kernel:0": np.zeros((4, 4), np.float32)}
  _write_keras(path, layers)
  with pytest.raises(UserInputError, match=r"fc1/kernel:0 is not a weight of VGG16"):
    bn.vgg16_variables(str(path), _abstract())


# ---- BusterNet's protocol ------------------------------------------------------------------
def notebook_discernment(z, y):
  """The release's CASIA notebook (check_one_sample + the lut counts), restated: z the model's
  3-channel output, y the 3-channel ground truth, both in the model's channel order."""
  hyp = z.argmax(-1)
  labels = []
  for channel in (0, 1):
    inside = hyp[y[..., channel] > 0.5]
    hist = [np.sum(inside == k) for k in range(3)]
    labels.append(2 if sum(hist[:2]) == 0 else int(np.argmax(hist[:2])))
  return tuple(labels)


def _maps(regions, size=8):
  """A (z, y) pair in the model's channel order (target, source, pristine) from hand-made
  (predicted target, predicted source, true target, true source) boolean maps."""
  pt, ps, tt, ts = (np.zeros((size, size), bool) for _ in range(4))
  for array, box in zip((pt, ps, tt, ts), regions, strict=True):
    for y0, y1, x0, x1 in box:
      array[y0:y1, x0:x1] = True
  z = np.stack([pt * 0.9, ps * 0.8, 1.0 - np.maximum(pt * 0.9, ps * 0.8)], -1)
  y = np.stack([tt, ts, ~(tt | ts)], -1).astype(np.float32)
  return z, y


def test_discernment_and_protocol_b_match_the_release_notebooks():
  true_t, true_s = [(0, 3, 0, 3)], [(4, 8, 4, 8)]
  cases = {
    "correct": ([(0, 3, 0, 3)], [(4, 8, 4, 8)]),
    "swapped": ([(4, 8, 4, 8)], [(0, 3, 0, 3)]),
    "opt_out": ([(0, 3, 0, 3), (4, 8, 4, 8)], []),
    # The source region split 8 / 8 between the two classes: the tie goes to channel 0, the
    # target, so both regions read target (opt-out), not source (which would be correct).
    "tie": ([(0, 3, 0, 3), (4, 6, 4, 8)], [(6, 8, 4, 8)]),
    "miss": ([(0, 3, 0, 3)], []),
  }
  lut = {
    (0, 1): "correct",
    (1, 0): "swapped",
    (0, 0): "opt_out",
    (1, 1): "opt_out",
  }
  scores = copy_move.BusterNetScores()
  task = tasks.build(config_lib.load_config(f"{EXPERIMENT}:tiny"))
  want = []
  for name, (pred_t, pred_s) in cases.items():
    z, y = _maps((pred_t, pred_s, true_t, true_s))
    prediction = task.finish(
      {"probs": z.astype(np.float32), "image_score": np.nan}, {"original_hw": (8, 8)}
    )
    notebook = notebook_discernment(z, y)
    want.append(lut.get(notebook, "miss"))
    outcome = copy_move.discernment(prediction["classes"], y[..., 1] > 0, y[..., 0] > 0)
    assert outcome == want[-1], name
    scores.add(
      {
        "id": name,
        "mask": ((y[..., 0] + y[..., 1]) * 255).astype(np.uint8),
        "source_mask": (y[..., 1] * 255).astype(np.uint8),
        "target_mask": (y[..., 0] * 255).astype(np.uint8),
      },
      prediction,
    )
  assert want == ["correct", "swapped", "opt_out", "opt_out", "miss"]
  # A negative image: no protocol-B row and no discernment (the notebooks score positives).
  empty = np.zeros((8, 8), np.uint8)
  scores.add({"id": "neg", "mask": empty}, {"cmfd_mask": np.ones((8, 8), bool), "classes": empty})
  summary, details = scores.summary(), scores.details()
  assert details == {
    "num_positive": 5,
    "total": 5,
    "correct": 1,
    "swapped": 1,
    "opt_out": 2,
    "miss": 1,
  }
  assert summary["discern_accuracy"] == pytest.approx(1 / 5)  # The paper's overall accuracy.
  assert summary["discern_optin_accuracy"] == pytest.approx(1 / 2)
  # Protocol B: sklearn's binary scores, 0 where nothing is predicted (no epsilon), averaged
  # over positive images only; pristine <= 0.5 counts as forged (0.5 itself included).
  assert copy_move.protocol_b(np.zeros((4, 4), bool), np.eye(4, dtype=bool)) == (0.0, 0.0, 0.0)
  p, r, f = copy_move.protocol_b(
    np.eye(4, dtype=bool) | np.eye(4, k=1, dtype=bool), np.eye(4, dtype=bool)
  )
  assert (p, r, f) == pytest.approx((4 / 7, 1.0, 8 / 11))
  half = task.finish(
    {"probs": np.full((4, 4, 3), [0.25, 0.25, 0.5], np.float32), "image_score": np.nan},
    {"original_hw": (4, 4)},
  )
  assert half["cmfd_mask"].all() and (half["prob"] == 0.5).all()
  # The class labels: channel 0 target -> 2, channel 1 source -> 1, channel 2 pristine -> 0.
  assert task.finish(
    {"probs": np.eye(3, dtype=np.float32)[None], "image_score": np.nan}, {"original_hw": (1, 3)}
  )["classes"].tolist() == [[2, 1, 0]]


def test_copy_move_loss_terms_against_numpy():
  """Fused CE over the labelled pixels in the original's channel order, and the optional Dice
  of 1 - P(pristine) against every copy-move pixel (IGNORE pixels take no part in either)."""
  config = config_lib.load_config(f"{EXPERIMENT}:tiny")
  config.loss.dice_weight = 0.5
  config.loss.fusion_weight, config.loss.similarity_weight = 1.0, 0.0
  config.loss.manipulation_weight = 0.0
  task = tasks.build(config)
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  label = rng.choice(np.array([0, 1, 2, copy_move.IGNORE], np.uint8), size=(2, 4, 5))
  total, terms = task.loss({"logits": jnp.asarray(logits)}, {"label": jnp.asarray(label)})
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  valid = label != copy_move.IGNORE
  channel = {k: bn.CHANNELS.index(name) for k, name in enumerate(copy_move.CLASSES)}
  nll = [
    -np.log(probs[i][channel[int(v)]]) for i, v in np.ndenumerate(label) if v != copy_move.IGNORE
  ]
  forged = 1.0 - probs[..., bn.CHANNELS.index("pristine")]
  target = (label > 0) & valid
  dice = 1 - (2 * (forged * target).sum() + 1) / ((forged * valid).sum() + target.sum() + 1)
  assert float(terms["loss_fusion"]) == pytest.approx(np.mean(nll), rel=1e-5)
  assert float(terms["loss_dice"]) == pytest.approx(dice, rel=1e-5)
  assert float(total) == pytest.approx(np.mean(nll) + 0.5 * dice, rel=1e-5)


def test_three_class_label_and_the_task_refuses_binary_data(tmp_path, capsys):
  target = np.array([[1, 0, 255, 0, 1]], np.uint8)
  source = np.array([[0, 1, 0, 255, 1]], np.uint8)
  assert copy_move.three_class_label(target, source).tolist() == [[2, 1, 255, 255, 2]]
  code, _, err = run(
    capsys,
    "train",
    "--config",
    f"{EXPERIMENT}:tiny",
    "--workdir",
    tmp_path / "w",
    "--config.data.train=synthetic:8",
  )
  assert code == 2 and "needs each copy-move's source region ('source_mask')" in err
  assert len(err.strip().splitlines()) == 1


# ---- data ---------------------------------------------------------------------------------
def test_copy_move_forgeries_carry_their_source():
  image = noise(64, 80, 1)
  objects = np.stack([ellipse(64, 80, (20, 20), (10, 8)), ellipse(64, 80, (60, 44), (9, 7))])
  made = [
    instance_forgery.copy_move(
      image, objects, np.random.default_rng(s), instance_forgery.InstanceForgeryConfig(min_area=64)
    )
    for s in range(6)
  ]
  made = [m for m in made if m is not None]
  assert made
  for forgery in made:
    source = forgery.source_mask > 0
    np.testing.assert_array_equal(source, objects[forgery.object_index] > 0)
    assert not (source & (forgery.mask > 0)).any()
    assert forgery.mask.any() and set(np.unique(forgery.source_mask)) <= {0, 255}


def test_coco_copymove_samples_have_both_regions(coco_root):  # noqa: F811
  from miml_jax.input import sources

  source = sources.make_source(f"coco_copymove:{coco_root}", "train", image_size=64)
  for index in range(len(source)):
    sample = source[index]
    assert sample["source_mask"].shape == sample["mask"].shape == (64, 64)
    if sample["kind"] == "copy_move":
      assert sample["source_mask"].any() and not (sample["source_mask"] & sample["mask"]).any()
    else:
      assert not sample["source_mask"].any()


def test_real_coco_copymoves_have_sources(shared_data):
  from miml_jax.input import sources

  source = sources.make_source(
    f"coco_copymove:{os.path.join(shared_data, 'coco_mini')}", "validation", image_size=128
  )
  kinds = [source[i]["kind"] for i in range(8)]
  assert "copy_move" in kinds
  assert all(source[i]["source_mask"].any() == (k == "copy_move") for i, k in enumerate(kinds))


# ---- end to end ---------------------------------------------------------------------------
def test_tiny_busternet_trains_both_stages_evaluates_and_predicts(coco_root, tmp_path, capsys):  # noqa: F811
  data = [
    f"--config.data.train=coco_copymove:{coco_root}",
    f"--config.data.validation=coco_copymove:{coco_root}",
  ]
  stage1 = tmp_path / "branches"
  code, out, err = run(
    capsys,
    "train",
    "--config",
    f"{EXPERIMENT}:branches:tiny",
    "--workdir",
    stage1,
    "--json",
    *data,
    "--config.train.steps=2",
    "--config.train.eval_every=0",
  )
  assert code == 0, err[-3000:]
  history = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
  losses = [r for r in history if "loss" in r]
  assert losses and all(np.isfinite(r["loss"]) for r in losses)
  # Stage 1 trains the branches' auxiliary tasks only (the fused loss is reported, weight 0).
  last = losses[-1]
  assert last["loss"] == pytest.approx(last["loss_similarity"] + last["loss_manipulation"])
  init = tmp_path / "stage1.msgpack"
  assert bn.main(["checkpoint", str(stage1), "--out", str(init)]) == 0
  stage2 = tmp_path / "fusion"
  code, out, err = run(
    capsys,
    "train",
    "--config",
    f"{EXPERIMENT}:fusion:tiny",
    "--workdir",
    stage2,
    "--json",
    "--init",
    init,
    *data,
    "--config.train.steps=2",
    "--config.train.eval_every=2",
  )
  assert code == 0, err[-3000:]
  from miml_jax import checkpoint

  before = checkpoint.load_model(str(stage1))[2]
  after = checkpoint.load_model(str(stage2))[2]
  # The branches (and their BatchNorm statistics) are frozen; the fusion trains.
  for collection in ("params", "batch_stats"):
    for branch in ("simiDet", "maniDet"):
      for a, b in zip(
        jax.tree_util.tree_leaves(before[collection][branch]),
        jax.tree_util.tree_leaves(after[collection][branch]),
        strict=True,
      ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(
    before["params"]["fusion"]["c1"]["kernel"], after["params"]["fusion"]["c1"]["kernel"]
  )
  code, out, err = run(capsys, "eval", "--checkpoint", stage2, "--json")
  assert code == 0, err[-3000:]
  summary = json.loads(out)["summary"]
  for key in ("iou", "f1", "pixel_auc", *copy_move.BUSTERNET_SCORES):
    assert key in summary
  assert 0.0 <= summary["cmfd_f1"] <= 1.0 and 0.0 <= summary["discern_accuracy"] <= 1.0
  photo = tmp_path / "photo.png"
  io.write_image(str(photo), noise(50, 70, 9))
  code, out, err = run(
    capsys, "predict", photo, "--checkpoint", stage2, "--out", tmp_path / "p", "--json"
  )
  assert code == 0, err[-3000:]
  [record] = json.loads(out)["predictions"]
  for kind in ("heatmap", "overlay", "mask", "classes"):
    assert os.path.isfile(record["files"][kind]), kind
  assert io.read_image(record["files"]["classes"]).shape == (50, 70, 3)
  assert io.read_image(record["files"]["mask"]).shape[:2] == (50, 70)
