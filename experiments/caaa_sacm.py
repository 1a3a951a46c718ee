"""SACM (CAAA's annotator of SDG pairs, MIML CVPR 2024) on synthetic SDG pairs from COCO: an
object of one photo pasted into another; the model segments the shared object in both images
(tasks/sdg_segmentation.py, models/sacm.py).

    miml-jax train --config experiments/caaa_sacm.py --workdir workdirs/sacm
    miml-jax convert SAFM.pth --config experiments/caaa_sacm.py --out sacm.msgpack
    miml-jax eval --init sacm.msgpack --config experiments/caaa_sacm.py --data pairs:/data/sdg

The default is the official model (ConvNeXt-B UPerNet, 512 x 512 inputs, 130,936,870
parameters, the key layout of the released SAFM.pth) with our reconstruction of its training
(the official train_sacm.py does not run; docs/caaa.md): AdamW 1e-4 constant, batch 16, the
official per-image augmentation (flips, rot90, a resize to 512, JPEG 50-99 with p 0.5, RGB shift
with p 0.3), CE on both images' outputs + 0.4 x CE on the aux logits. Training pairs are
`coco_sdg:` pastes between the COCO 'train' photos, validation pairs between the held-out 'val'
photos, scored with the MIML protocol on the forged image (and the donor mask on the authentic
one). The COCO path is relative to the repository root (this project's development data);
point both at any COCO-format folder or a built coco_instances dataset.

`:tiny` is the same code at CPU size (64 x 64 inputs, an 8 x 8 correlation grid, 83,062
parameters, both images as one batch: `model.joint_batch`, and a Dice term), what CI trains for
a few steps and what the measurement below ran longer.

Measured (this project's 2-core CPU VM, shared with other jobs):

    nice -n 5 miml-jax train --config experiments/caaa_sacm.py:tiny --workdir W \\
        --config.train.steps=500 --config.train.eval_every=500 \\
        --config.train.checkpoint_every=500 --config.optim.lr=0.006 --config.optim.warmup_steps=20

9 min in all (load average ~19 from other jobs; 203 s of it compiling the step, then ~2
steps/s). On the 300 held-out 'val' pastes of coco_mini (232 with a paste; the other 68 found no
pasteable object and stay unrelated pairs): forged-mask IoU 0.019 (pooled precision 0.50,
recall 0.02) at the 0.5 threshold, pixel AUC 0.675, against IoU 0.145 for the all-one and 0 for
the all-zero predictor; donor-mask pixel AUC 0.655. So at this budget the tiny SACM ranks shared
pixels well above chance but marks few of them: it has not yet learned SDG localisation, and
it is below the all-one IoU. Shorter runs were weaker: the config as it is, 400 steps, IoU
0.000 and pixel AUC 0.606; 300 steps without the Dice term, with rescaled pastes and 8 FPN
channels, IoU 0.000 and pixel AUC 0.586. The numbers show the pipeline runs and learns a
signal; they are no evidence of what the full recipe reaches.
"""

import ml_collections

import common

COCO = "../shared/data/coco_mini"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"experiments/caaa_sacm.py: unknown variant {arg!r} (have: tiny)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "sdg_segmentation"
  steps = ml_collections.FieldReference(40_000)

  c.data = common.data(train=f"coco_sdg:{COCO}", validation=f"coco_sdg:{COCO}", image_size=512)
  # The paste's recipe (coco_sdg shares coco_splice's): no occlusion by the host's objects, so
  # the donor mask is the whole visible object (the official DMAC-COCO pairs paste on top).
  c.data.instance_forgery.update(occlude_prob=0.0)
  c.input = common.input_pipeline(
    batch_size=16,
    augment=common.augment(
      crop_size=512,
      resize_range=(1.0, 1.0),  # A.Resize(512, 512): the whole image, no crop.
      jpeg_prob=0.5,
      jpeg_quality=(50, 99),
      rgb_shift_prob=0.3,
      rgb_shift=20,
    ),
  )
  c.model = dict(
    name="sacm",
    dtype="float32",
    image_size=512,
    backbone=dict(
      preset="base", dims=None, depths=None, drop_path_rate=0.4, layer_scale_init_value=1e-6
    ),
    channels=512,
    pool_scales=(1, 2, 3, 6),
    aux_channels=256,
    num_learned=14,
    aspp_channels=512,
    dilations=(1, 12, 24, 36),
    c1_channels=48,
    up_channels=(128, 32),
    dropout=0.1,
    joint_batch=False,  # The official two passes (each image's own BatchNorm statistics).
  )
  c.loss = dict(name="ce", aux_weight=0.4, authentic_weight=1.0, dice_weight=0.0)
  # The official optimiser: torch AdamW(lr=1e-4) defaults (weight decay 0.01), constant rate.
  c.optim = common.optim(
    steps,
    lr=1e-4,
    weight_decay=0.01,
    layer_decay=1.0,
    schedule="constant",
    warmup_steps=0,
    min_lr=0.0,
  )
  c.mesh = common.mesh()
  c.train = common.train(steps, log_every=50, checkpoint_every=2000, eval_every=2000)
  c.eval = common.evaluation(threshold_policy="fixed", resize="none", batch_size=8)

  if arg == "tiny":
    steps.set(3)
    size = 64
    c.data.update(image_size=size)
    c.input.update(batch_size=4, num_workers=0)
    c.input.augment.update(crop_size=size)
    c.model.update(
      image_size=size,
      channels=16,
      pool_scales=(1, 2),
      aux_channels=4,
      num_learned=6,
      aspp_channels=16,
      dilations=(1, 2),
      c1_channels=8,
      up_channels=(8, 8),
      dropout=0.0,
      # One pass over both images: the CPU compile of the training step is the bottleneck.
      joint_batch=True,
    )
    c.model.backbone.update(
      preset=None,
      dims=(16, 16, 32, 32),
      depths=(1, 1, 1, 1),
      drop_path_rate=0.0,
      layer_scale_init_value=1.0,
    )
    # A Dice term per output: at this size CE alone settles on "nothing shared" first.
    c.loss.update(dice_weight=1.0)
    # Pastes at the donor's own scale: on an 8 x 8 grid a rescaled object shares few features
    # with its source, more than a few hundred CPU steps can learn to match.
    c.data.instance_forgery.update(scale_range=(1.0, 1.0))
    c.optim.update(lr=2e-3, schedule="poly", warmup_steps=1, min_lr=1e-5)
    c.train.update(log_every=1, checkpoint_every=2, eval_every=2, keep_checkpoints=2)
    c.eval.update(batch_size=4, num_pictures=2)
  return c
