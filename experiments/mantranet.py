"""ManTra-Net (CVPR 2019, official Keras ISICV/ManTraNet) trained on synthetic forgeries of the
four kinds its paper trains on: splicing, copy-move, removal and enhancement.

    miml-jax train --config experiments/mantranet.py --workdir workdirs/mantranet
    miml-jax convert ManTraNet_Ptrain4.h5 --config experiments/mantranet.py --out mantranet.msgpack
    miml-jax train --config experiments/mantranet.py --workdir W --init mantranet.msgpack

The model is Ptrain4's architecture (featex_type 2, Z-pool windows 7/15/31, 3,805,078
parameters with bnorm's statistics); `model.featex_type=0..3` and `model.windows=(7,15,31,63)`
give the other released variants. The mixture: `synthetic` (splices from another simulated
camera, copy-moves, and local edits: noise, recompression, blur, median filter), and from COCO
photos `coco_splice:` (an object pasted from another photo), `coco_copymove:` (an object copied
within the photo) and `coco_edit:` (an object recoloured, i.e. a local hue / saturation /
brightness / contrast enhancement, removed by inpainting, or replaced in place). The COCO path is
relative to the repository root (this project's development data); point it at any COCO-format
folder. Loss: the two-class CE on [0, z], i.e. binary cross-entropy on ManTra-Net's logit.
Validation: the held-out streams of the same kinds.

Variants: `:cpu` is the same recipe with narrow widths (base 4, 8 anomaly features, 4 LSTM
filters) at 48 px for a CPU run; `:tiny` is a few steps on the embedded synthetic set, what
CI trains.

Measured on this project's 2-core CPU VM, shared with other jobs (load average 10-15):

    nice -n 5 miml-jax train --config experiments/mantranet.py:cpu --workdir workdirs/mantranet_cpu

This took 10.5 min wall for 300 steps at about 0.5 steps/s, 60 s of which was compilation
(0.07 M parameters, 10.5 GFLOP a step). The logged training loss (CE + Dice) fell from a mean
of 1.266 over steps 10-50 to 1.155 over steps 260-300. On the 128 held-out synthetic forgeries
it scored per-image IoU 0.229, F1 0.321 and pixel AUC 0.737 at step 300 (IoU 0.234 at step
150). The all-one predictor scores IoU 0.119 there, and the all-zero predictor 0.

The COCO kinds were not learnt at this size and length. On the held-out `coco_edit:` images
(188 scored) the run reached IoU 0.159 and pixel AUC 0.434, against 0.245 for the all-one
predictor; on `coco_splice:` (296 scored) it reached IoU 0.167 and AUC 0.500, against 0.187.
Those are `miml-jax eval --checkpoint workdirs/mantranet_cpu --data coco_edit:../shared/data/
coco_mini` and the same with `coco_splice:`. They make up 18% of the mixture, and a 0.07 M
parameter network trained for 300 steps picks up the strong synthetic traces first.
"""

import ml_collections

import common

COCO = "../shared/data/coco_mini"
VARIANTS = ("tiny", "cpu")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", *VARIANTS):
    raise ValueError(f"experiments/mantranet.py: unknown variant {arg!r} (have: tiny, cpu)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "segmentation"
  steps = ml_collections.FieldReference(20_000)

  mixture = f"synthetic+coco_splice:{COCO}+coco_copymove:{COCO}+coco_edit:{COCO}"
  c.data = common.data(train=mixture, validation=mixture, image_size=256)
  c.input = common.input_pipeline(
    batch_size=16,
    num_workers=4,
    augment=common.augment(
      crop_size=256, resize_range=(1.0, 1.25), jpeg_prob=0.5, jpeg_quality=(70, 100), rgb_shift=10
    ),
  )
  # Ptrain4's architecture (mantranet.ManTraNetConfig): the official widths.
  c.model = dict(
    name="mantranet",
    dtype="float32",
    featex_type=2,
    windows=(7, 15, 31),
    base=32,
    features=64,
    lstm_filters=8,
  )
  # One logit per pixel: CE over [0, z] is the numerically stable BCE on z; no aux outputs, no
  # image head.
  c.loss = common.loss(name="ce", weights=(1.0,), dice_weight=0.0, image_weight=0.0)
  # Adam without weight decay (the Keras training had none), constant after a short warm-up.
  c.optim = common.optim(
    steps, lr=1e-4, weight_decay=0.0, layer_decay=1.0, warmup_steps=500, min_lr=1e-4
  )
  c.mesh = common.mesh()
  c.train = common.train(steps, log_every=100, checkpoint_every=2000, eval_every=2000)
  # No image head: a fixed threshold; images at their own size (the model is fully
  # convolutional at full resolution).
  c.eval = common.evaluation(threshold_policy="fixed", resize="none", batch_size=4)

  if arg == "cpu":
    steps.set(300)
    # Validation on the 128 held-out synthetic forgeries (all three of its kinds) keeps the
    # periodic evaluation short; the COCO kinds are scored after training with `eval --data`.
    c.data.update(validation="synthetic", image_size=48)
    c.input.update(batch_size=8, num_workers=0)
    c.input.augment.update(crop_size=48)
    c.model.update(base=4, features=8, lstm_filters=4)
    # A Dice term next to the CE: with ~12% tampered pixels, CE alone left the model predicting
    # all-authentic at step 200 (IoU 0.000, pixel AUC 0.54) in a first run.
    c.loss.dice_weight = 1.0
    c.optim.update(lr=2e-3, min_lr=2e-3, warmup_steps=25)
    c.train.update(log_every=10, checkpoint_every=150, eval_every=150, keep_checkpoints=2)
    c.eval.update(batch_size=8, num_pictures=4)
  if arg == "tiny":
    steps.set(3)
    c.data.update(train="synthetic:8", validation="synthetic:4", image_size=32)
    c.input.update(batch_size=2, num_workers=0)
    c.input.augment.update(crop_size=32)
    # One window (a 2-step ConvLSTM): the same code paths, a smaller program to compile.
    c.model.update(base=4, features=8, lstm_filters=4, windows=(3,))
    c.optim.warmup_steps = 1
    c.train.update(log_every=1, checkpoint_every=2, eval_every=2)
    c.eval.update(batch_size=2, num_pictures=2)
  return c
