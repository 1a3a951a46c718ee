"""The optimiser against mmcv's formulas and PyTorch AdamW semantics, restated in NumPy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from miml_jax import optim


def _config(**kw):
  base = dict(
    name="adamw",
    lr=1e-4,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.05,
    layer_decay=0.9,
    layer_decay_num_layers=12,
    schedule="poly",
    power=1.0,
    min_lr=1e-6,
    warmup_steps=1500,
    warmup_ratio=1e-6,
    total_steps=160_000,
    grad_clip_norm=0.0,
    accumulate_steps=1,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def mmcv_lr(t, base, config):
  """mmcv PolyLrUpdaterHook + linear warm-up, as in its source: regular lr then warm-up."""
  coeff = (1 - t / config.total_steps) ** config.power
  regular = (base - config.min_lr) * coeff + config.min_lr
  if t < config.warmup_steps:
    k = (1 - t / config.warmup_steps) * (1 - config.warmup_ratio)
    return regular * (1 - k)
  return regular


@pytest.mark.parametrize("t", [0, 1, 700, 1499, 1500, 80_000, 159_999])
@pytest.mark.parametrize("scale", [1.0, 0.9**13])
def test_poly_warmup_is_mmcv(t, scale):
  config = _config()
  got = float(optim.learning_rate(t, scale, config))
  np.testing.assert_allclose(got, mmcv_lr(t, scale * config.lr, config), rtol=1e-5)


def test_cosine_endpoints():
  config = _config(schedule="cosine", warmup_steps=0)
  assert float(optim.learning_rate(0, 1.0, config)) == pytest.approx(config.lr)
  assert float(optim.learning_rate(config.total_steps, 1.0, config)) == pytest.approx(config.min_lr)


def test_stage_wise_scales():
  params = {
    "backbone": {
      "downsample_layers_0_0": {"kernel": 0},
      "stages_0_0": {"gamma": 0},
      "stages_3_1": {"gamma": 0},
      "norm3": {"scale": 0},
    },
    "decode_head": {"conv_seg": {"kernel": 0}},
  }
  scales = optim.stage_wise_lr_scales(params, 0.9, 12)
  assert scales["backbone"]["downsample_layers_0_0"]["kernel"] == pytest.approx(0.9**13)
  assert scales["backbone"]["stages_0_0"]["gamma"] == pytest.approx(0.9**12)
  assert scales["backbone"]["stages_3_1"]["gamma"] == pytest.approx(0.9**9)
  assert scales["backbone"]["norm3"]["scale"] == 1.0
  assert scales["decode_head"]["conv_seg"]["kernel"] == 1.0


def test_adamw_step_matches_pytorch_semantics():
  """One step of AdamW with per-group lr and no decay on 1-D params, restated in NumPy."""
  config = _config(lr=1e-2, warmup_steps=0, schedule="constant", min_lr=0.0)
  params = {
    "backbone": {"stages_1_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
    "head": {"kernel": jnp.full((3, 2), 2.0)},
  }
  grads = jax.tree_util.tree_map(lambda p: 0.5 * jnp.ones_like(p), params)
  opt = optim.make_optimizer(config, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  new = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)

  def torch_adamw(p, g, lr, wd):
    m, v = 0.1 * g, 0.001 * g * g
    m_hat, v_hat = m / 0.1, v / 0.001
    return p - lr * wd * p - lr * m_hat / (np.sqrt(v_hat) + 1e-8)

  lr_stage1 = 1e-2 * 0.9 ** (13 - 2)
  np.testing.assert_allclose(
    new["backbone"]["stages_1_0"]["kernel"], torch_adamw(1.0, 0.5, lr_stage1, 0.05), rtol=1e-5
  )
  np.testing.assert_allclose(
    new["backbone"]["stages_1_0"]["bias"], torch_adamw(1.0, 0.5, lr_stage1, 0.0), rtol=1e-5
  )
  np.testing.assert_allclose(new["head"]["kernel"], torch_adamw(2.0, 0.5, 1e-2, 0.05), rtol=1e-5)


def test_frozen_parameters_stay_put_and_the_rest_train_as_before():
  """optim.frozen: matched parameters get a zero update and no Adam state; the others get
  exactly the update they get without freezing (clipping counts only them)."""
  params = {
    "backbone": {"stages_1_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
    "head": {"kernel": jnp.full((3, 2), 2.0)},
  }
  grads = {
    "backbone": {"stages_1_0": {"kernel": jnp.full((2, 3), 50.0), "bias": jnp.ones((3,))}},
    "head": {"kernel": jnp.full((3, 2), 0.5)},
  }
  config = _config(lr=1e-2, warmup_steps=0, schedule="constant", min_lr=0.0, grad_clip_norm=1.0)
  frozen = optim.make_optimizer(
    ml_collections.ConfigDict(dict(config, frozen=("backbone/*",))), params
  )
  state = frozen.init(params)
  updates, state = frozen.update(grads, state, params)
  updates, _ = frozen.update(grads, state, params)  # A second step: the state is consistent.
  assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates["backbone"]))
  # Adam moments exist for the head only.
  moment_sizes = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
  assert moment_sizes == 2 * 6
  # The head's update equals training the head alone.
  head_only = optim.make_optimizer(config, {"head": params["head"]})
  head_state = head_only.init({"head": params["head"]})
  head = {"head": params["head"]}
  expected, head_state = head_only.update({"head": grads["head"]}, head_state, head)
  expected, _ = head_only.update({"head": grads["head"]}, head_state, head)
  np.testing.assert_allclose(updates["head"]["kernel"], expected["head"]["kernel"], rtol=1e-6)


def test_frozen_pattern_matching_nothing_is_an_error():
  from miml_jax.errors import UserInputError

  config = ml_collections.ConfigDict(dict(_config(), frozen=("bakbone/*",)))
  with pytest.raises(UserInputError, match="optim.frozen: 'bakbone/\\*' matches no parameter"):
    optim.make_optimizer(config, {"backbone": {"kernel": jnp.ones((2, 2))}})
