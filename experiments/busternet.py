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

Measured (this project's 2-core CPU VM, shared with five other jobs, load 17-21; 0.23 M
parameters, 64 px, 5.2 GFLOP per step, 0.25-0.55 steps/s):

    miml-jax train --config experiments/busternet.py:joint:cpu --workdir workdirs/busternet_cpu

11 min 14 s wall (138 s of it compiling), 160 steps of 8. The training losses fall (per-step
values, noisy): total 2.77 at step 10 -> 1.29 at step 160; fused 3-class CE 1.10 -> 0.56 (the
class prior alone gives 0.77), manipulation BCE 0.93 -> 0.28, similarity BCE 0.74 -> 0.45. It
does not localise yet: on the 220 held-out copy-moves of coco_mini's 'val' photos (80 more
found no object and stay authentic), per-image IoU 0.0001 against 0.270 for the all-one
predictor, pixel AUC 0.550, protocol-B F1 0.0001; the map stays below 0.5 almost everywhere, so
every image's source and target read "none" (discernment 0 of 220, all misses). With Keras'
BatchNorm momentum 0.99 (the run before this one, identical losses) pixel AUC was 0.484: the
running statistics of step 160 still held a fifth of their initial values, hence
`model.bn_momentum=0.9` here. A copy-move model this narrow, at 4 x 4 correlation positions and
160 steps, is a check that the code paths train, not a result; the full recipe needs an
accelerator.
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
    steps.set({"branches": 200, "fusion": 100}.get(stage, 160))
    c.data.update(image_size=64)
    c.input.update(batch_size=8, num_workers=0)
    c.input.augment.update(crop_size=64)
    # Running statistics that forget their initial values within the run's 160 steps.
    c.model.update(input_size=64, vgg_widths=(8, 16, 32, 32), bn_momentum=0.9)
    c.optim.update(lr=2e-3, warmup_steps=20)
    c.train.update(log_every=10, checkpoint_every=80, eval_every=steps)
    c.eval.update(batch_size=8, num_pictures=4)
  return c
