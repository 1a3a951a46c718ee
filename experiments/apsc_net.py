"""APSC-Net, the MIML paper's (CVPR 2024) model and training recipe (METHODS.md section 5).

The same recipe on CPU-sized inputs for a few steps (what CI runs): `--config
experiments/apsc_net.py:tiny`.

Score the official weights (APSC-Net.pth, 578 tensors) after converting them:

    miml-jax convert APSC-Net.pth --config experiments/apsc_net.py --out apsc_net.msgpack
    miml-jax eval --init apsc_net.msgpack --config experiments/apsc_net.py \
        --data folder:/data/CASIA1 --resize miml --threshold image_head

Train it (the paper: 8 GPUs x 2 images; here `input.batch_size` is the global batch), starting
from the FAIR UPerNet-ConvNeXt-B ADE20k checkpoint (backbone and the UPerHead layers APSC-Net
shares; the 150-class classifier and APSC-Net's own layers keep their fresh init):

    miml-jax convert upernet_convnext_base_ade20k.pth --config experiments/apsc_net.py \
        --partial --out ade20k_init.msgpack
    miml-jax train --config experiments/apsc_net.py --workdir W --init ade20k_init.msgpack \
        --config.data.train=folder:/data/MIML_Part1 --config.data.validation=folder:/data/CASIA1

Expected: the paper reports APSC-Net's per-benchmark IoU (e.g. CASIAv1); no official weights or
benchmark data are available on the machines this project is developed on, so that number has
not been reproduced here yet. The paper's data mix, with its repeat factors, is a mixture
string (input/sources.py), e.g. for MIML-layout folders and COCO for Object Jitter:

    --config.data.train='folder:/data/tampCOCO+folder:/data/MIML_Part1*6+folder:/data/MIML_Part2*4+coco:/data/coco*3+folder:/data/CASIAv2*80'
"""

import dataclasses

import ml_collections

from miml_jax.input.instance_forgery import InstanceForgeryConfig
from miml_jax.input.object_jitter import ObjectJitterConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"experiments/apsc_net.py: unknown variant {arg!r} (have: tiny)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  steps = ml_collections.FieldReference(160_000)

  c.data = dict(train="synthetic", validation="synthetic", image_size=512, seed=0,
                # Unreadable examples: 'raise' stops with the file named; 'skip' leaves them
                # out and lists them in <workdir>/skipped_examples.txt.
                on_error="raise",
                # The recipes of the coco: (Object Jitter, METHODS section 4) and coco_splice: /
                # coco_copymove: sources, every field overridable (their docstrings say what
                # each is); the defaults are the spec's and this project's reconstruction.
                object_jitter=dataclasses.asdict(ObjectJitterConfig()),
                instance_forgery=dataclasses.asdict(InstanceForgeryConfig()))
  c.input = dict(
      batch_size=16, num_workers=8,
      # Batches made at once, and ready batches held, per worker (bounds host memory).
      read_threads=16, prefetch_batches=16,
      # Each side resized to [512, 768] independently, crop 512, flips, rot90, JPEG 50-100
      # (p 0.9), RGB shift +-20 (p 0.3); MIML soft masks: < 8 pristine, > 192 tampered.
      augment=dict(crop_size=512, resize_range=(1.0, 1.5), hflip=0.5, vflip=0.5, rot90=0.5,
                   jpeg_prob=0.9, jpeg_quality=(50, 100), rgb_shift_prob=0.3, rgb_shift=20,
                   mask_low=8, mask_high=192))

  # ConvNeXt-B (drop path 0.4) + the official head (512 channels, 3 self-correction passes,
  # 31x31 dynamic kernels, image head): the parameter tree of APSC-Net.pth.
  c.model = dict(name="apsc_net", dtype="float32",
                 backbone=dict(name="convnext", in_chans=3, drop_path_rate=0.4))

  # OHEM CE on the final output and the 3 aux outputs, each x 0.5.
  c.loss = dict(name="ohem", weights=(0.5, 0.5, 0.5, 0.5), ohem_thresh=0.7,
                ohem_min_kept=100_000, dice_weight=0.0, image_weight=1.0)

  # AdamW 1e-4, stage-wise LR decay 0.9, linear warm-up 1500 steps (ratio 1e-6) onto poly(1).
  c.optim = dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                 layer_decay=0.9, layer_decay_num_layers=12, schedule="poly", power=1.0,
                 min_lr=1e-6, warmup_steps=1500, warmup_ratio=1e-6, total_steps=steps,
                 grad_clip_norm=0.0, accumulate_steps=1)

  # Devices as a ('data', 'fsdp') mesh (sharding.py): pure data parallelism by default; set
  # fsdp > 1 to shard parameters and optimiser state of >= fsdp_min_size elements.
  c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**18)

  c.train = dict(steps=steps, log_every=50, checkpoint_every=4000, eval_every=16_000,
                 keep_checkpoints=3, nan_policy="stop",
                 # Also keep the checkpoint(s) with the best validation score ('' for none) in
                 # <workdir>/best/; eval / predict take --checkpoint <workdir>/best.
                 best_metric="iou", keep_best=1,
                 # TensorBoard event files in <workdir>/tensorboard (no TensorFlow needed).
                 tensorboard=True,
                 # MFU's denominator: 0 looks the device up (mfu.py); set it for other chips.
                 peak_flops_per_device=0.0)

  c.eval = dict(batch_size=8, threshold_policy="image_head", threshold=0.5, resize="miml",
                num_pictures=8)

  if arg == "tiny":
    # The real APSC-Net (its layout is fixed) on 64 x 64 crops of the embedded data for a few
    # steps: what CI runs to show the recipe trains, checkpoints and evaluates.
    steps.set(3)
    c.data.update(train="synthetic:8", validation="synthetic:2", image_size=64)
    c.input.update(batch_size=2, num_workers=0)
    c.input.augment.crop_size = 64
    c.loss.ohem_min_kept = 1000
    c.optim.warmup_steps = 1
    c.train.update(log_every=1, checkpoint_every=2, eval_every=0)
    c.eval.update(batch_size=2, resize="none", num_pictures=2)
  return c
