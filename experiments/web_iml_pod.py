"""Web-IML pretraining at MIMLv2 scale on a TPU pod or a GPU cluster (our reconstruction of the
unpublished recipe, METHODS.md section 6).

Start the same command on every host (JAX finds the pod's hosts itself; the workdir must be a
filesystem all hosts share, e.g. a GCS FUSE or NFS mount):

    miml-jax train --multihost --config experiments/web_iml_pod.py --workdir /mnt/runs/web_iml \
        --config.data.train=folder:/mnt/data/MIMLv2 --config.data.validation=folder:/mnt/data/CASIA1

The same recipe shrunk to CPU size (what CI runs for a few steps; 2 min 43 s on 2 cores with an
empty compilation cache, most of it compiling):

    miml-jax train --config experiments/web_iml_pod.py:tiny --workdir /tmp/web_iml_tiny

Expected: no pod run has been made from this repository yet, so there is no number to quote;
the `tiny` variant only shows the recipe trains, checkpoints and evaluates end to end.

Choices (each a config field):
* Global batch 256 at 512 x 512 (16x APSC-Net's 16), bf16 compute with fp32 parameters and
  loss. The learning rate grows with the square root of the batch (1e-4 at 16 -> 4e-4 at 256),
  the usual rule for Adam at this scale; warm-up 1500 steps, then poly(1) to 1e-6 as in APSC-Net.
* 48k steps = 50 epochs of MIMLv2's 246,212 images.
* Gradients clipped at global norm 1.0: a guard for bf16 at a large batch (APSC-Net used none).
* Pure data parallelism: a ConvNeXt-B Web-IML (143 M parameters, 1.7 GB with Adam's moments)
  fits every accelerator, and FSDP's gathers would only cost time. For ConvNeXt-L or memory-tight
  chips set --config.mesh.fsdp=4 (or 8).
"""

import dataclasses

import ml_collections

from miml_jax.input.instance_forgery import InstanceForgeryConfig
from miml_jax.input.object_jitter import ObjectJitterConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"experiments/web_iml_pod.py: unknown variant {arg!r} (have: tiny)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  steps = ml_collections.FieldReference(48_000)

  c.data = dict(train="folder:/data/MIMLv2", validation="folder:/data/CASIA1", image_size=512,
                seed=0,
                # Unreadable examples: 'raise' stops with the file named; 'skip' leaves them
                # out and lists them in <workdir>/skipped_examples.txt.
                on_error="raise",
                # The recipes of the coco: (Object Jitter, METHODS section 4) and coco_splice: /
                # coco_copymove: sources, every field overridable (their docstrings say what
                # each is); the defaults are the spec's and this project's reconstruction.
                object_jitter=dataclasses.asdict(ObjectJitterConfig()),
                instance_forgery=dataclasses.asdict(InstanceForgeryConfig()))
  c.input = dict(
      batch_size=256, num_workers=16,
      # Batches made at once, and ready batches held, per worker (bounds host memory: each
      # holds this host's 256 / num_hosts crops).
      read_threads=16, prefetch_batches=8,
      augment=dict(crop_size=512, resize_range=(1.0, 1.5), hflip=0.5, vflip=0.5, rot90=0.5,
                   jpeg_prob=0.9, jpeg_quality=(50, 100), rgb_shift_prob=0.3, rgb_shift=20,
                   mask_low=8, mask_high=192))

  c.model = dict(
      name="web_iml", dtype="bfloat16", noise_view="none", trace_stem=(),
      backbone=dict(name="convnext", preset="base", in_chans=3, drop_path_rate=0.4,
                    layer_scale_init_value=1e-6),
      head=dict(channels=512, rectify_passes=3, image_head=True))

  c.loss = dict(name="ohem", weights=(0.5, 0.5, 0.5, 0.5), ohem_thresh=0.7,
                ohem_min_kept=100_000, dice_weight=0.0, image_weight=1.0)

  c.optim = dict(name="adamw", lr=4e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                 layer_decay=0.9, layer_decay_num_layers=12, schedule="poly", power=1.0,
                 min_lr=1e-6, warmup_steps=1500, warmup_ratio=1e-6, total_steps=steps,
                 grad_clip_norm=1.0, accumulate_steps=1)

  c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**18)

  c.train = dict(steps=steps, log_every=100, checkpoint_every=2000, eval_every=4000,
                 keep_checkpoints=3, nan_policy="stop", best_metric="iou", keep_best=1,
                 tensorboard=True, peak_flops_per_device=0.0)

  c.eval = dict(batch_size=64, threshold_policy="image_head", threshold=0.5, resize="miml",
                num_pictures=16)

  if arg == "tiny":
    # Same code paths (bf16, the image head, rectification, OHEM, layer decay, clipping),
    # CPU-sized shapes and the embedded data.
    steps.set(3)
    c.data.update(train="synthetic:16", validation="synthetic:4", image_size=64)
    c.input.update(batch_size=4, num_workers=0)
    c.input.augment.update(crop_size=64, jpeg_prob=0.5)
    c.model.backbone.update(preset=None, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))
    c.model.head.update(channels=8, feat0_channels=8, c1_channels=8, kernel_gen_size=16,
                        kernel_gen_dims=(4, 4, 4, 4, 4), image_head_dims=(8, 8, 8),
                        rectify_passes=2)
    c.loss.ohem_min_kept = 1000
    c.optim.warmup_steps = 1
    c.train.update(log_every=1, checkpoint_every=2, eval_every=2)
    c.eval.update(batch_size=4, resize="none", num_pictures=2)
  return c
