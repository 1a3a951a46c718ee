"""The config sections every experiment shares, as functions returning their defaults.

An experiment builds its config from these and overrides what differs, by keyword (an unknown
keyword is an error, so a typo cannot add a key nobody reads):

    import common

    c.data = common.data(image_size=128)
    c.optim = common.optim(steps, lr=2e-3, warmup_steps=50)

The defaults are the paper's recipe (APSC-Net, MIML CVPR 2024; docs/methods.md). The config
loader (miml_jax/config.py) puts a config file's folder on the import path while it runs the
file, so `import common` finds this file next to the experiment, from any working directory.
This file itself has no `get_config`: it is not an experiment.
"""

import dataclasses

from miml_jax.input.instance_forgery import InstanceForgeryConfig
from miml_jax.input.object_jitter import ObjectJitterConfig
from miml_jax.input.pairs import PairSynthConfig, SPGConfig


def _override(section: str, defaults: dict, overrides: dict) -> dict:
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise TypeError(f"{section}: unknown key(s) {unknown} (known: {sorted(defaults)})")
  return {**defaults, **overrides}


def data(**overrides) -> dict:
  """`data`: the train / validation sources (input/sources.py) and the forgery recipes."""
  return _override(
    "data",
    dict(
      train="synthetic",
      validation="synthetic",
      image_size=512,
      seed=0,
      # Unreadable examples: 'raise' stops with the file named; 'skip' leaves them out and
      # lists them in <workdir>/skipped_examples.txt.
      on_error="raise",
      # Images with more pixels are refused from their header before decoding (decompression
      # bombs); 2**28 = 16384^2 admits any camera photo.
      max_image_pixels=2**28,
      # The recipes of the coco: (Object Jitter, docs/methods.md) and coco_splice: /
      # coco_copymove: sources, every field overridable (their docstrings say what each is);
      # the defaults are the spec's and this project's reconstruction.
      object_jitter=dataclasses.asdict(ObjectJitterConfig()),
      instance_forgery=dataclasses.asdict(InstanceForgeryConfig()),
      # The pair sources' recipes: coco_spg: (in-place edits) and pair_synth: (the pair
      # classifier's self-supervised pairs), input/pairs.py.
      spg=dataclasses.asdict(SPGConfig()),
      pair_synth=dataclasses.asdict(PairSynthConfig()),
    ),
    overrides,
  )


def augment(**overrides) -> dict:
  """`input.augment`, the paper's: each side resized to [512, 768] independently, crop 512,
  flips, rot90, JPEG 50-100 (p 0.9), RGB shift +-20 (p 0.3); MIML soft masks: < 8 pristine,
  > 192 tampered."""
  return _override(
    "input.augment",
    dict(
      crop_size=512,
      resize_range=(1.0, 1.5),
      hflip=0.5,
      vflip=0.5,
      rot90=0.5,
      jpeg_prob=0.9,
      jpeg_quality=(50, 100),
      rgb_shift_prob=0.3,
      rgb_shift=20,
      mask_low=8,
      mask_high=192,
    ),
    overrides,
  )


def input_pipeline(**overrides) -> dict:
  """`input`: the training pipeline (input/pipeline.py); `batch_size` is the global batch,
  `augment` a section from `augment()`."""
  return _override(
    "input",
    dict(
      batch_size=16,
      num_workers=8,
      # Batches made at once, and ready batches held, per worker (bounds host memory).
      read_threads=16,
      prefetch_batches=16,
      augment=augment(),
    ),
    overrides,
  )


def loss(**overrides) -> dict:
  """`loss`: OHEM CE on the final output and the 3 aux outputs, each x 0.5 (losses.py)."""
  return _override(
    "loss",
    dict(
      name="ohem",
      weights=(0.5, 0.5, 0.5, 0.5),
      ohem_thresh=0.7,
      ohem_min_kept=100_000,
      dice_weight=0.0,
      image_weight=1.0,
    ),
    overrides,
  )


def optim(steps, **overrides) -> dict:
  """`optim` (optim.py): AdamW 1e-4, stage-wise LR decay 0.9, linear warm-up 1500 steps (ratio
  1e-6) onto poly(1) down to 1e-6 at `steps` (pass the FieldReference of `train.steps`, so an
  override of one moves both), no clipping, nothing frozen (`frozen`: glob patterns over
  parameter paths the optimiser leaves unchanged, e.g. ('backbone/*',))."""
  return _override(
    "optim",
    dict(
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
      total_steps=steps,
      grad_clip_norm=0.0,
      accumulate_steps=1,
      frozen=(),
    ),
    overrides,
  )


def mesh(**overrides) -> dict:
  """`mesh`: devices as a ('data', 'fsdp') mesh (sharding.py): pure data parallelism by
  default; set fsdp > 1 to shard parameters and optimiser state of >= fsdp_min_size
  elements."""
  return _override("mesh", dict(data=-1, fsdp=1, fsdp_min_size=2**18), overrides)


def train(steps, **overrides) -> dict:
  """`train`: the loop (train.py), `steps` long (a FieldReference shared with optim)."""
  return _override(
    "train",
    dict(
      steps=steps,
      log_every=50,
      checkpoint_every=4000,
      eval_every=16_000,
      keep_checkpoints=3,
      nan_policy="stop",
      # An update over this times the weights (||update|| / ||params||) counts as non-finite.
      max_update_ratio=1.0,
      # Also keep the checkpoint(s) with the best validation score ('' for none) in
      # <workdir>/best/; eval / predict take --checkpoint <workdir>/best.
      best_metric="iou",
      keep_best=1,
      # TensorBoard event files in <workdir>/tensorboard (no TensorFlow needed).
      tensorboard=True,
      # MFU's denominator: 0 looks the device up (mfu.py); set it for other chips.
      peak_flops_per_device=0.0,
    ),
    overrides,
  )


def evaluation(**overrides) -> dict:
  """`eval`: validation and `miml-jax eval`. threshold_policy 'fixed' uses `threshold`,
  'image_head' the official clamp(1 - p, .3, .7); resize 'miml' is the official test-time
  resize. A batch holds at most max_batch_pixels padded pixels per device; an image over it is
  predicted in overlapping tiles (large_image 'tile') or downscaled to fit ('downscale')."""
  return _override(
    "eval",
    dict(
      batch_size=8,
      threshold_policy="image_head",
      threshold=0.5,
      resize="miml",
      num_pictures=8,
      max_batch_pixels=2**22,
      large_image="tile",
      tile_size=1024,
      tile_overlap=128,
    ),
    overrides,
  )
