"""Quickstart: a tiny Web-IML trained on the embedded synthetic forgeries, on CPU, in minutes.

    miml-jax train --config experiments/quickstart.py --workdir workdirs/quickstart

Expected (2-core CPU, ~1.5 steps/s, about 4 minutes of training after ~1 minute of compile):
validation IoU about 0.49, F1 0.55, pixel AUC 0.88 at step 300, against 0.128 IoU for the
all-one and 0 for the all-zero predictor. Same code as the full model; widths, depths and sizes
shrink, and three choices differ from the pod recipe to learn within a CPU budget, each a config
switch: a Dice term in the loss (the tampered class is ~12% of pixels, and CE/OHEM alone left
the model predicting all-authentic at 400 steps, IoU 0.000), a full-resolution `trace_stem` in
front of ConvNeXt's patchify stem, and one self-rectification pass instead of three.
"""

import dataclasses

import ml_collections

from miml_jax.input.instance_forgery import InstanceForgeryConfig
from miml_jax.input.object_jitter import ObjectJitterConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  steps = ml_collections.FieldReference(300)

  c.data = dict(train="synthetic", validation="synthetic", image_size=128, seed=0,
                # Unreadable examples: 'raise' stops with the file named; 'skip' leaves them
                # out and lists them in <workdir>/skipped_examples.txt.
                on_error="raise",
                # The recipes of the coco: (Object Jitter, METHODS section 4) and coco_splice: /
                # coco_copymove: sources, every field overridable (their docstrings say what
                # each is); the defaults are the spec's and this project's reconstruction.
                object_jitter=dataclasses.asdict(ObjectJitterConfig()),
                instance_forgery=dataclasses.asdict(InstanceForgeryConfig()))
  c.input = dict(
      batch_size=8, num_workers=0,
      # Batches made at once, and ready batches held (bounds host memory).
      read_threads=16, prefetch_batches=16,
      augment=dict(crop_size=128, resize_range=(1.0, 1.0), hflip=0.5, vflip=0.5, rot90=0.5,
                   # Recompression would wash out the faint traces a tiny model learns first.
                   jpeg_prob=0.0, jpeg_quality=(70, 100), rgb_shift_prob=0.3, rgb_shift=10,
                   mask_low=8, mask_high=192))

  c.model = dict(
      name="web_iml",
      dtype="float32",
      # The stem also sees SRM noise residuals: the synthetic forgeries (like real ones) differ
      # in noise and compression traces, which a tiny network finds far faster this way.
      noise_view="srm", noise_view_gain=10.0,
      # Two full-resolution 3x3 convs before the 4x4 patchify stem, so local noise energy
      # survives the stem's LayerNorm (see WebIML.trace_stem).
      trace_stem=(16, 16),
      backbone=dict(name="convnext", preset=None, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1),
                    in_chans=3, drop_path_rate=0.0, layer_scale_init_value=1.0),
      head=dict(channels=32, pool_scales=(1, 2, 3, 6), fusion="se", se_reduction=8,
                feat0_channels=16, c1_channels=8, aspp_dilations=(1, 2, 4, 6),
                # One self-rectification pass (the pod configs use 3): the passes are most of
                # the head's cost, and one already gives the refined prediction.
                rectify_passes=1, kernel_size=7, kernel_gen_size=16,
                kernel_gen_dims=(8, 16, 32, 32, 32), cse_reduction=8, dropout=0.1,
                image_head=True, image_head_dims=(32, 32, 32), num_classes=2))

  # Dice next to OHEM: with ~12% tampered pixels, CE alone is content to predict all-authentic
  # for the first few hundred steps; Dice is not.
  c.loss = dict(name="ohem", weights=(0.5, 0.5, 0.5, 0.5), ohem_thresh=0.7,
                ohem_min_kept=16_384, dice_weight=1.0, image_weight=1.0)

  c.optim = dict(name="adamw", lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                 layer_decay=1.0, layer_decay_num_layers=12, schedule="poly", power=1.0,
                 min_lr=1e-6, warmup_steps=50, warmup_ratio=1e-6, total_steps=steps,
                 grad_clip_norm=0.0, accumulate_steps=1)

  # Devices as a ('data', 'fsdp') mesh (sharding.py): pure data parallelism by default; set
  # fsdp > 1 to shard parameters and optimiser state of >= fsdp_min_size elements.
  c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**18)

  c.train = dict(steps=steps, log_every=25, checkpoint_every=100, eval_every=100,
                 keep_checkpoints=2, nan_policy="stop",
                 # Also keep the checkpoint(s) with the best validation score ('' for none) in
                 # <workdir>/best/; eval / predict take --checkpoint <workdir>/best.
                 best_metric="iou", keep_best=1,
                 # TensorBoard event files in <workdir>/tensorboard (no TensorFlow needed).
                 tensorboard=True,
                 # MFU's denominator: 0 looks the device up (mfu.py); set it for other chips.
                 peak_flops_per_device=0.0)

  # threshold_policy 'fixed' uses eval.threshold; 'image_head' the official clamp(1 - p, .3, .7).
  c.eval = dict(batch_size=8, threshold_policy="fixed", threshold=0.5, resize="none",
                num_pictures=8)
  return c
