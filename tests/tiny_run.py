"""The tiny quickstart run the end-to-end tests share (same flags, so they share compiled XLA
programs through the session's compilation cache)."""

import os

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")
TINY = [
  "--config.data.image_size=64",
  "--config.input.augment.crop_size=64",
  "--config.input.batch_size=4",
  "--config.data.train=synthetic:16",
  "--config.data.validation=synthetic:6",
  "--config.model.backbone.dims=(8,16,16,16)",
  "--config.model.head.channels=8",
  "--config.model.head.feat0_channels=8",
  "--config.model.head.kernel_gen_dims=(4,4,4,4,4)",
  "--config.model.head.kernel_gen_size=16",
  "--config.model.head.image_head_dims=(8,8,8)",
  "--config.loss.ohem_min_kept=1000",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=2",
  "--config.train.eval_every=0",
  "--config.eval.batch_size=4",
  "--config.eval.num_pictures=2",
]
