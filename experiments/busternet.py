"""BusterNet (ECCV 2018), copy-move localisation with source / target discernment, trained in
the paper's two stages on synthetic copy-moves of COCO photos (`coco_copymove:`: an object
copied elsewhere in its own image; the sample knows both the copied object, the source, and the
pixels the copy wrote, the target). docs/baselines.md (BusterNet) describes the model.

Variants, `:STAGE[:SIZE]`:

* `:branches` (the default): stage 1, each branch on its own auxiliary task (similarity: every
  copy-move pixel; manipulation: the target), the fusion module frozen and without a loss;
* `:fusion`: stage 2, the 3-class fusion alone (`optim.frozen` holds both branches, whose
  BatchNorms keep their running statistics, `model.branch_bn='running'`), from stage 1's
  weights;
* `:joint`: every loss at once, nothing frozen (end-to-end; not the paper's recipe, but one
  run, which is what fits a CPU's minutes: the measured `:joint:cpu` below);
* `:released`: the released inference model (no auxiliary heads), to score converted weights;
* SIZE `tiny` (what CI trains: 64 px, narrow, 3 steps) or `cpu` (a few minutes on a CPU).

    miml-jax train --config experiments/busternet.py:branches --workdir W1
    python -m miml_jax.models.busternet checkpoint W1/best --out stage1.msgpack
    miml-jax train --config experiments/busternet.py:fusion --workdir W2 --init stage1.msgpack
    miml-jax eval --checkpoint W2/best     # MIML protocol + BusterNet's protocol B, discernment

Start stage 1 from ImageNet VGG16 (Keras' file, both trunks):

    python -m miml_jax.models.busternet vgg16 vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --config experiments/busternet.py:branches --out vgg16.msgpack
    miml-jax train --config experiments/busternet.py:branches --workdir W1 --init vgg16.msgpack

Score the released weights (Model/pretrained_busterNet.hd5 of isi-vista/BusterNet):

    miml-jax convert pretrained_busterNet.hd5 --config experiments/busternet.py:released \
        --out busternet.msgpack
    miml-jax eval --init busternet.msgpack --config experiments/busternet.py:released \
        --data coco_copymove:../shared/data/coco_mini

The release holds no training script: the optimiser, learning rates, batch sizes and step
counts here are this project's choices, not the paper's.

Measured on this project's 2-core CPU VM (0.57 M parameters, 128 px, batch 8, 38 GFLOP a
step; about 0.7 steps/s on the quiet machine, 0.45 while another job ran):

    miml-jax train --config experiments/busternet.py:joint:cpu --workdir workdirs/busternet_cpu2

600 steps in about 17 min. The total loss (fused CE + Dice + both branches' BCE) fell from 2.4
at step 40 to 1.6-2.2 over the last 100 steps (per-step values, noisy). On the 276 held-out
copy-moves of coco_mini's 'val' photos (24 more found no object and stay authentic): per-image
IoU 0.072 against 0.170 for the all-one predictor, pixel AUC 0.645, protocol-B F1 0.114;
discernment 0 of 276 (267 misses: the map rarely crosses 0.5 on both regions). The previous
recipe (64 px, so a 4 x 4 correlation grid; widths 8-32; CE only; 160 steps) scored IoU 0.0001
against 0.270 and pixel AUC 0.550: the larger grid and Dice move the map, but this run does
not localise copy-moves better than marking everything. Nor do exact copies help: the same run
with `--config.data.instance_forgery.scale_range='(1.0,1.0)'
--config.data.instance_forgery.flip_prob=0.0` (translation only) scored IoU 0.033 against
0.173, pixel AUC 0.636. Features that match a copy across the 16-pixel grid of the correlation
are not learnt from scratch in 600 CPU steps; start from ImageNet VGG16 (above) or train the
full recipe on an accelerator.

Why the similarity branch has nothing to start from: with randomly initialised trunks, a
copy-move cell's best correlation with another position ranks no higher than a pristine
cell (`python experiments/reports/similarity_probe.py [--exact]`: cell AUC 0.44-0.57 over 54
copy-moves of coco_mini 'train' photos, exact translation-only copies or the recipe's, widths
16-64 and VGG16's, the trunk's 4 blocks or 3, 3 inits each):
flat and repetitive regions correlate with themselves as well as a copy with its source. A loss
on the self-correlation itself (a softmax over positions plus a "no match" option at
correlation 0.5: a copy's cells answered by its source's and the other way round, pristine
cells by "no match"), tried on top of the auxiliary BCE, moved that cell AUC only to about
0.58 on 64 held-out copy-moves in 550 trunk-only steps (0.53 after 1000 without the "no match"
option; a throwaway trunk-only script, not kept), and the full `:joint:cpu` run with it
(1000 steps, 42 min beside another training) scored held-out IoU 0.042 against 0.170, pixel
AUC 0.638: no better, so it is not part of the library.

Nor does matching pretraining of the trunk on the photos themselves rescue the ranking
(`python experiments/reports/similarity_probe.py --pretrain 300 --widths 16-32-64-64 --inits 2
--images 120`: each trunk first learns, for 300 steps, to find every cell of a 'train' photo in
a rescaled, mirrored, shifted second view that keeps that content only inside a random ellipse,
another photo around it; then 107 copy-moves of 'validation' photos are probed). It learns to
match: a target cell's best match lies in its source for 0.19-0.21 of the cells with 4 blocks
(chance 0.09) and 0.31-0.33 with 3 (chance 0.10). But the cell AUC stays at 0.46-0.48: a
copy's best correlation is no higher than a pristine cell's with its neighbours. The trunk's
receptive field after 4 blocks is 100 px, most of a 128 px image, so neighbouring cells see
nearly the same pixels, while a copy sees other surroundings than its source. Percentile
pooling keeps how strong the matches are, not where they lie, so it cannot tell the two apart.
"""

import ml_collections

import common

COCO = "../shared/data/coco_mini"
STAGES = ("branches", "fusion", "joint", "released")
SIZES = ("full", "tiny", "cpu")


def _variant(arg: str | None) -> tuple[str, str]:
  parts = [p for p in (arg or "").split(":") if p]
  stage = next((p for p in parts if p in STAGES), "branches")
  size = next((p for p in parts if p in SIZES), "full")
  unknown = [p for p in parts if p not in STAGES + SIZES]
  if unknown or len(parts) > 2 or len(set(parts)) < len(parts):
    raise ValueError(
      f"experiments/busternet.py: unknown variant {arg!r} (have: STAGE[:SIZE], STAGE one of "
      f"{', '.join(STAGES)}, SIZE one of tiny, cpu)"
    )
  return stage, size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  stage, size = _variant(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "copy_move"
  steps = ml_collections.FieldReference(10_000 if stage == "fusion" else 20_000)

  c.data = common.data(
    train=f"coco_copymove:{COCO}", validation=f"coco_copymove:{COCO}", image_size=256
  )
  # No rescaling beyond the crop (the model resizes to 256 anyway) and no JPEG / colour shifts:
  # the copy must stay a copy of its source for the similarity branch.
  c.input = common.input_pipeline(
    batch_size=16,
    num_workers=4,
    augment=common.augment(
      crop_size=256, resize_range=(1.0, 1.25), rot90=0.0, jpeg_prob=0.0, rgb_shift_prob=0.0
    ),
  )
  c.model = dict(
    name="busternet",
    dtype="float32",
    input_size=256,
    nb_pools=256,
    vgg_widths=(64, 128, 256, 512),
    aux_heads=stage != "released",
    branch_bn="running" if stage == "fusion" else "batch",
  )
  if stage == "branches":
    c.loss = dict(fusion_weight=0.0, similarity_weight=1.0, manipulation_weight=1.0)
    frozen = ("fusion/*", "pred_mask/*")
  elif stage == "joint":
    c.loss = dict(fusion_weight=1.0, similarity_weight=1.0, manipulation_weight=1.0)
    frozen = ()
  else:
    c.loss = dict(fusion_weight=1.0, similarity_weight=0.0, manipulation_weight=0.0)
    frozen = ("simiDet/*", "maniDet/*") if stage == "fusion" else ()
  c.optim = common.optim(
    steps,
    lr=1e-3,
    weight_decay=1e-4,
    layer_decay=1.0,
    warmup_steps=500,
    frozen=frozen,
  )
  c.mesh = common.mesh()
  # Stage 1 has no fused output to rank by; its auxiliary tasks show in the losses.
  c.train = common.train(
    steps,
    log_every=50,
    checkpoint_every=2000,
    eval_every=2000,
    keep_checkpoints=2,
    best_metric="iou" if stage != "branches" else "",
  )
  c.eval = common.evaluation(threshold_policy="fixed", resize="none", batch_size=8)

  if size == "tiny":
    steps.set(3)
    c.data.update(image_size=64)
    c.input.update(batch_size=2, num_workers=0)
    c.input.augment.update(crop_size=64)
    c.model.update(input_size=64, vgg_widths=(4, 4, 8, 8))
    c.optim.warmup_steps = 1
    c.train.update(log_every=1, checkpoint_every=2, eval_every=2)
    c.eval.update(batch_size=2, num_pictures=2)
  elif size == "cpu":
    steps.set({"branches": 400, "fusion": 200}.get(stage, 600))
    # 128 px: the correlation grid is 8 x 8 positions (at 64 px its 4 x 4 cells were each
    # larger than most copied objects, and the run learnt nothing).
    c.data.update(image_size=128)
    c.input.update(batch_size=8, num_workers=0)
    c.input.augment.update(crop_size=128)
    # Running statistics that forget their initial values within the run.
    c.model.update(input_size=128, vgg_widths=(16, 32, 64, 64), bn_momentum=0.9)
    # Dice on the binary map (not in the paper): with CE alone a short run settles on the
    # pristine prior (the map stays under 0.5 everywhere).
    c.loss.dice_weight = 1.0 if stage != "branches" else 0.0
    c.optim.update(lr=2e-3, warmup_steps=30)
    c.train.update(log_every=20, checkpoint_every=200, eval_every=steps)
    c.eval.update(batch_size=8, num_pictures=4)
  return c
