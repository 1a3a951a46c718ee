"""Web-IML pretraining at MIMLv2 scale on a TPU pod or a GPU cluster (our reconstruction of the
unpublished recipe, docs/methods.md, Web-IML).

Start the same command on every host (JAX finds the pod's hosts itself; the workdir must be a
filesystem all hosts share, e.g. a GCS FUSE or NFS mount):

    miml-jax train --multihost --config experiments/web_iml_pod.py --workdir /mnt/runs/web_iml \
        --config.data.train=folder:/mnt/data/MIMLv2 --config.data.validation=folder:/mnt/data/CASIA1

The same recipe shrunk to CPU size (what CI runs for a few steps; 2 min 43 s on 2 cores with an
empty compilation cache, most of it compiling):

    miml-jax train --config experiments/web_iml_pod.py:tiny --workdir workdirs/web_iml_tiny

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

import ml_collections

import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"experiments/web_iml_pod.py: unknown variant {arg!r} (have: tiny)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "segmentation"
  steps = ml_collections.FieldReference(48_000)

  c.data = common.data(train="folder:/data/MIMLv2", validation="folder:/data/CASIA1")
  # Each of the prefetched batches holds this host's 256 / num_hosts crops.
  c.input = common.input_pipeline(batch_size=256, num_workers=16, prefetch_batches=8)

  c.model = dict(
    name="web_iml",
    dtype="bfloat16",
    noise_view="none",
    trace_stem=(),
    backbone=dict(
      name="convnext", preset="base", in_chans=3, drop_path_rate=0.4, layer_scale_init_value=1e-6
    ),
    head=dict(channels=512, rectify_passes=3, image_head=True),
  )

  c.loss = common.loss()
  c.optim = common.optim(steps, lr=4e-4, grad_clip_norm=1.0)
  c.mesh = common.mesh()
  c.train = common.train(steps, log_every=100, checkpoint_every=2000, eval_every=4000)
  c.eval = common.evaluation(batch_size=64, num_pictures=16)

  if arg == "tiny":
    # Same code paths (bf16, the image head, rectification, OHEM, layer decay, clipping),
    # CPU-sized shapes and the embedded data.
    steps.set(3)
    c.data.update(train="synthetic:16", validation="synthetic:4", image_size=64)
    c.input.update(batch_size=4, num_workers=0)
    c.input.augment.update(crop_size=64, jpeg_prob=0.5)
    c.model.backbone.update(preset=None, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))
    c.model.head.update(
      channels=8,
      feat0_channels=8,
      c1_channels=8,
      kernel_gen_size=16,
      kernel_gen_dims=(4, 4, 4, 4, 4),
      image_head_dims=(8, 8, 8),
      rectify_passes=2,
    )
    c.loss.ohem_min_kept = 1000
    c.optim.warmup_steps = 1
    c.train.update(log_every=1, checkpoint_every=2, eval_every=2)
    c.eval.update(batch_size=4, resize="none", num_pictures=2)
  return c
