"""The optimiser of the paper's recipe (docs/methods.md, Training recipe), built with optax.

AdamW (no weight decay on 1-D parameters and biases), a per-parameter learning-rate scale from
the ConvNeXt stage-wise decay rule, mmcv's poly (or cosine) curve with linear warm-up, gradient
clipping and accumulation.

The learning rate of a parameter group with scale s at step t is mmcv's, exactly:
    lr(t) = warmup(t) * ((s * base_lr - min_lr) * curve(t) + min_lr)
    curve(t) = (1 - t/T)^power                 (poly)   or (1 + cos(pi t/T)) / 2 (cosine)
    warmup(t) = 1 - (1 - t/W) * (1 - ratio)    for t < W, else 1
mmcv multiplies the warm-up factor onto the curve (it is not a join of two schedules), and
min_lr is absolute, not scaled with the group.
"""

import fnmatch
from typing import NamedTuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

from miml_jax.errors import UserInputError


def _poly(progress, power):
  return (1.0 - progress) ** power


def _cosine(progress, power):
  del power
  return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def _constant(progress, power):
  del power
  return jnp.ones_like(progress)


# optim.schedule -> curve(progress in [0, 1], power); config.OptimConfig checks the name.
SCHEDULES = {"poly": _poly, "cosine": _cosine, "constant": _constant}


def lr_curve(step, *, total_steps: int, schedule: str, power: float = 1.0):
  progress = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
  curve = SCHEDULES.get(schedule)
  if curve is None:
    raise UserInputError(
      f"optim.schedule: unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})"
    )
  return curve(progress, power)


def warmup_factor(step, *, warmup_steps: int, warmup_ratio: float):
  if warmup_steps <= 0:
    return jnp.ones_like(step, jnp.float32)
  # 1 - (1 - t/W)(1 - r) rearranged to r + (1 - r) t/W: the same number without the float32
  # cancellation that turns ratio 1e-6 into 1.19e-7 noise at t = 0.
  factor = warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
  return jnp.where(step < warmup_steps, factor, 1.0)


def learning_rate(step, scale, config):
  """The learning rate of a group with lr scale `scale` at optimiser step `step`."""
  step = jnp.asarray(step, jnp.float32)
  curve = lr_curve(
    step, total_steps=config.total_steps, schedule=config.schedule, power=config.power
  )
  warm = warmup_factor(step, warmup_steps=config.warmup_steps, warmup_ratio=config.warmup_ratio)
  return warm * ((scale * config.lr - config.min_lr) * curve + config.min_lr)


def stage_wise_lr_scales(params, decay_rate: float, num_layers: int = 12):
  """ConvNeXt stage-wise decay (mmcv LearningRateDecayOptimizerConstructor, 'stage_wise').

  Layer ids: backbone downsample layers (stem included) 0, backbone stage i -> i + 1, everything
  else (decoder, backbone output norms) num_layers + 1; scale = decay ** (num_layers + 1 - id).
  """
  top = num_layers + 1

  def scale(path):
    if path[0] == "backbone" and path[1].startswith("downsample_layers"):
      layer = 0
    elif path[0] == "backbone" and path[1].startswith("stages_"):
      layer = int(path[1].split("_")[1]) + 1
    else:
      layer = top
    return decay_rate ** (top - layer)

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: scale(k) for k in flat})


def weight_decay_mask(params):
  """True where weight decay applies: not on 1-D parameters (norms, biases, layer scales)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


class ScheduledScaleState(NamedTuple):
  count: jnp.ndarray


def scale_by_group_schedule(lr_scales, config) -> optax.GradientTransformation:
  """updates *= -lr_group(t), the per-group mmcv rule above."""

  def init_fn(params):
    del params
    return ScheduledScaleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree_util.tree_map(
      lambda u, s: -learning_rate(state.count, s, config).astype(u.dtype) * u, updates, lr_scales
    )
    return updates, ScheduledScaleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _adamw(config) -> list[optax.GradientTransformation]:
  """Adam's moments, then decoupled weight decay (not on 1-D parameters), as torch's AdamW."""
  return [
    optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
    optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
  ]


# optim.name -> the transformations between clipping and the learning rate (which every
# optimiser shares: scale_by_group_schedule); config.OptimConfig checks the name.
OPTIMIZERS = {"adamw": _adamw}


def frozen_mask(params, patterns) -> dict:
  """True for the parameters whose '/'-joined path matches one of the glob patterns.

  A pattern that matches nothing is an error: a typo would otherwise silently train what the
  user meant to freeze."""
  flat = traverse_util.flatten_dict(params)
  paths = {key: "/".join(key) for key in flat}
  for pattern in patterns:
    if not any(fnmatch.fnmatchcase(path, pattern) for path in paths.values()):
      examples = ", ".join(sorted({path.split("/")[0] + "/*" for path in paths.values()}))
      raise UserInputError(
        f"optim.frozen: {pattern!r} matches no parameter (top-level groups: {examples})"
      )
  return traverse_util.unflatten_dict(
    {key: any(fnmatch.fnmatchcase(path, p) for p in patterns) for key, path in paths.items()}
  )


def make_optimizer(config, params) -> optax.GradientTransformation:
  """config: the `optim` ConfigDict (see experiments/*.py).

  Parameters matched by `optim.frozen` get a zero update and no optimiser state: they are
  outside the clipping norm, Adam's moments and weight decay alike."""
  frozen = tuple(config.get("frozen", ()) or ())
  if frozen:
    mask = frozen_mask(params, frozen)
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "trained", mask)
    trained = _make_trainable_optimizer(config, params, mask)
    return optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()}, labels)
  return _make_trainable_optimizer(config, params)


def _make_trainable_optimizer(config, params, frozen=None) -> optax.GradientTransformation:
  """The optimiser of the trained parameters; under multi_transform the frozen ones reach it as
  optax.MaskedNode, so the per-parameter lr scales are masked the same way."""
  direction = OPTIMIZERS.get(config.name)
  if direction is None:
    raise UserInputError(
      f"optim.name: unknown optimiser {config.name!r} (known: {', '.join(OPTIMIZERS)})"
    )
  if config.layer_decay < 1.0:
    lr_scales = stage_wise_lr_scales(params, config.layer_decay, config.layer_decay_num_layers)
  else:
    lr_scales = jax.tree_util.tree_map(lambda _: 1.0, params)
  if frozen is not None:
    lr_scales = jax.tree_util.tree_map(
      lambda scale, is_frozen: optax.MaskedNode() if is_frozen else scale, lr_scales, frozen
    )
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts += [*direction(config), scale_by_group_schedule(lr_scales, config)]
  optimizer = optax.chain(*parts)
  if config.accumulate_steps > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulate_steps)
  return optimizer
