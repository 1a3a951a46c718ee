"""Quickstart: a tiny Web-IML trained on the embedded synthetic forgeries, on CPU, in minutes.

    miml-jax train --config experiments/quickstart.py --workdir workdirs/quickstart

Goal: validation IoU well above the all-one (0.128) and all-zero (0) predictors. Measured so far
(2-core CPU, ~0.6 steps/s): IoU 0.000, pixel AUC 0.657 after 400 steps -- the tiny model does not
yet learn the synthetic traces in this budget (README "Known gap"). Same code as the full model;
only widths, depths and sizes shrink.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  steps = ml_collections.FieldReference(400)

  c.data = dict(train="synthetic", validation="synthetic", image_size=128, seed=0)
  c.input = dict(
      batch_size=8, num_workers=0,
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
      backbone=dict(name="convnext", preset=None, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1),
                    in_chans=3, drop_path_rate=0.0, layer_scale_init_value=1.0),
      head=dict(channels=32, pool_scales=(1, 2, 3, 6), fusion="se", se_reduction=8,
                feat0_channels=16, c1_channels=8, aspp_dilations=(1, 2, 4, 6),
                rectify_passes=3, kernel_size=7, kernel_gen_size=16,
                kernel_gen_dims=(8, 16, 32, 32, 32), cse_reduction=8, dropout=0.1,
                image_head=True, image_head_dims=(32, 32, 32), num_classes=2))

  c.loss = dict(name="ohem", weights=(0.5, 0.5, 0.5, 0.5), ohem_thresh=0.7,
                ohem_min_kept=16_384, image_weight=1.0)

  c.optim = dict(name="adamw", lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                 layer_decay=1.0, layer_decay_num_layers=12, schedule="poly", power=1.0,
                 min_lr=1e-6, warmup_steps=50, warmup_ratio=1e-6, total_steps=steps,
                 grad_clip_norm=0.0, accumulate_steps=1)

  c.train = dict(steps=steps, log_every=25, checkpoint_every=200, eval_every=200,
                 keep_checkpoints=2, nan_policy="stop")

  # threshold_policy 'fixed' uses eval.threshold; 'image_head' the official clamp(1 - p, .3, .7).
  c.eval = dict(batch_size=8, threshold_policy="fixed", threshold=0.5, resize="none",
                num_pictures=8)
  return c
