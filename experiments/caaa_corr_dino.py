"""Corr-DINO (CAAAv2's SDG annotator, Web-IML arXiv 2508.20987; our reconstruction, since no
code is public) on synthetic SDG pairs from COCO: an object of one photo pasted into another;
frozen DINO ViT features of both images are correlated (SACM's correlation and pooling) and a
light decoder turns that prior into the mask of the pasted object in the forged image and of
the donor object in the authentic one (models/corr_dino.py, tasks/sdg_segmentation.py).

Real use needs DINO weights (the hub files of facebookresearch/dino or dinov2; the model keeps
its ViT frozen, so a random one is all it would ever see). Convert them into an init file (the
decoder is missing from them: --partial), then train from it:

    miml-jax convert dino_vits16_pretrain.pth --config experiments/caaa_corr_dino.py \\
        --partial --out corr_dino_init.msgpack
    miml-jax train --config experiments/caaa_corr_dino.py --workdir workdirs/corr_dino \\
        --init corr_dino_init.msgpack

For DINOv2 ViT-S/14 (dinov2_vits14_pretrain.pth) add `--config.model.backbone.family=dinov2`
(patch 14, the 518 px position table, LayerScale) to both commands; image_size 448 is a
multiple of 14 and of 16. ViT-B: `--config.model.backbone.size=base`.

The default: DINO ViT-S/16 at 448 x 448 (a 28 x 28 patch grid), the outputs of blocks 8 and 11
(after the final LayerNorm), cross and self correlations pooled to 16 channels each, a 128 /
64 / 32 decoder; the ViT frozen (stop_gradient in the model and `optim.frozen`); AdamW 1e-3
with poly decay on the decoder, CE on both images + 0.4 x CE on the aux logits. Validation
pairs are `coco_sdg:` pastes between the held-out COCO 'val' photos, scored with the MIML
protocol on the forged image and on the donor mask. The COCO path is relative to the
repository root (this project's development data).

`:tiny` is the same code at CPU size: a random-init 2-block ViT (width 48, patch 8) at 64 x 64
(an 8 x 8 grid), still frozen, with a trainable 16-channel projection before the correlation
(`corr_channels`: random ViT features are not DINO features); what CI trains for three steps and
what the measurement below ran longer.

Measured (this project's 2-core CPU VM, shared with other jobs; random-init frozen ViT, so this
shows the pipeline learns, not what DINO features give):

    nice -n 5 miml-jax train --config experiments/caaa_corr_dino.py:tiny --workdir W \\
        --config.train.steps=600 --config.train.eval_every=600 \\
        --config.train.checkpoint_every=600 --config.model.backbone.patch_size=4 \\
        --config.loss.dice_weight=1.0

(patch 4: a 16 x 16 grid; Dice against the 15 % positive pixels.) About 12 min in all: 600
steps at ~1 step/s; 82,714 parameters, of which 11,338 (all but the ViT) train, and the ViT
came out bit-identical to its initialisation. On the 248 held-out 'val' pastes of coco_mini
that found an object (52 more stay authentic), the forged image: per-image IoU 0.243, F1
0.335, pixel AUC 0.790, against IoU 0.147 for the all-one and 0 for the all-zero predictor;
the donor mask on the authentic image: IoU 0.126, pixel AUC 0.717. The tiny defaults (patch 8,
CE only) at 300 steps learned no mask at 0.5 (IoU 0, pixel AUC 0.700).
"""

import ml_collections

import common

COCO = "../shared/data/coco_mini"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"experiments/caaa_corr_dino.py: unknown variant {arg!r} (have: tiny)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "sdg_segmentation"
  steps = ml_collections.FieldReference(20_000)
  size = 448

  c.data = common.data(train=f"coco_sdg:{COCO}", validation=f"coco_sdg:{COCO}", image_size=size)
  # As SACM's recipe: no occlusion by the host's objects (the donor mask is the whole object).
  c.data.instance_forgery.update(occlude_prob=0.0)
  c.input = common.input_pipeline(
    batch_size=16,
    augment=common.augment(
      crop_size=size,
      resize_range=(1.0, 1.0),
      jpeg_prob=0.5,
      jpeg_quality=(50, 99),
      rgb_shift_prob=0.3,
      rgb_shift=20,
    ),
  )
  c.model = dict(
    name="corr_dino",
    dtype="float32",
    image_size=size,
    backbone=dict(family="dino", size="small"),
    layers=(8, 11),
    norm_features=True,
    frozen_backbone=True,
    corr_channels=0,
    self_correlation=True,
    num_learned=14,
    context_channels=0,
    decoder_channels=(128, 64, 32),
    aux=True,
    donor=True,
  )
  c.loss = dict(name="ce", aux_weight=0.4, authentic_weight=1.0, dice_weight=0.0)
  c.optim = common.optim(
    steps,
    lr=1e-3,
    weight_decay=0.01,
    layer_decay=1.0,
    warmup_steps=200,
    min_lr=1e-6,
    # The ViT keeps its (DINO) weights: no update, no Adam state, no weight decay.
    frozen=("backbone/*",),
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
      layers=(0, 1),
      corr_channels=16,
      num_learned=6,
      decoder_channels=(16, 16, 8),
    )
    c.model.backbone.update(embed_dim=48, depth=2, num_heads=3, patch_size=8, img_size=size)
    c.optim.update(lr=2e-3, warmup_steps=1, min_lr=1e-5)
    c.train.update(log_every=1, checkpoint_every=2, eval_every=2, keep_checkpoints=2)
    c.eval.update(batch_size=4, num_pictures=2)
  return c
