"""Robustness sweeps (docs/evaluation.md): the evaluation data degraded before the model sees it.

    miml-jax eval --checkpoint W --data SOURCE --perturb jpeg:50,60,70,80,90,100 \
        --perturb blur:3,7,11,15,19,23 --perturb noise:3,7,11 --perturb resize:0.5,0.75,1.5

Kinds and their values (one evaluation per value, plus the clean data):
  jpeg:Q      re-encode as JPEG at quality Q (1..100, OpenCV's libjpeg, 4:2:0)
  blur:K      Gaussian blur with a K x K kernel (odd K >= 3; sigma from K as OpenCV's default,
              0.3 * ((K - 1) / 2 - 1) + 0.8, the convention of the robustness tables)
  noise:S     additive Gaussian noise of standard deviation S (0..255 scale), clipped to 0..255,
              the same noise for an image at every run (seeded by its index)
  resize:F    both sides scaled by F (bilinear for the image, nearest for the mask, so the model
              is scored at the size it saw)

The mask is untouched except by `resize`. The example keeps its `is_jpeg` flag, so the MIML
test-time resize rule treats an image as the file it came from, not as its degraded copy.
"""

import cv2
import numpy as np

from miml_jax.errors import UserInputError

KINDS = ("jpeg", "blur", "noise", "resize")


def parse(specs: list[str]) -> list[tuple[str, float]]:
  """['jpeg:50,70', 'blur:3'] -> [('jpeg', 50), ('jpeg', 70), ('blur', 3)], validated."""
  points = []
  for spec in specs:
    kind, _, values = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS or not values.strip():
      raise UserInputError(
        f"--perturb {spec}: expected KIND:V1,V2,... with KIND one of {', '.join(KINDS)}"
      )
    for text in values.split(","):
      try:
        value = float(text)
      except ValueError:
        raise UserInputError(f"--perturb {spec}: '{text}' is not a number") from None
      _check(kind, value, spec)
      points.append((kind, int(value) if kind in ("jpeg", "blur") else value))
  return points


def _check(kind: str, value: float, spec: str):
  problems = {
    "jpeg": not (1 <= value <= 100 and value == int(value)),
    "blur": not (value >= 3 and value == int(value) and int(value) % 2 == 1),
    "noise": not value >= 0,
    "resize": not value > 0,
  }
  if problems[kind]:
    rule = {
      "jpeg": "an integer quality 1..100",
      "blur": "an odd kernel size >= 3",
      "noise": "a standard deviation >= 0",
      "resize": "a scale factor > 0",
    }[kind]
    raise UserInputError(f"--perturb {spec}: {value:g} is not {rule}")


def apply(image: np.ndarray, mask: np.ndarray, kind: str, value, seed: int):
  """One degraded (image, mask); `seed` fixes the noise."""
  if kind == "jpeg":
    ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(value)])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1], mask
  if kind == "blur":
    return cv2.GaussianBlur(image, (int(value), int(value)), 0), mask
  if kind == "noise":
    noise = np.random.default_rng(seed).normal(0.0, value, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8), mask
  if kind == "resize":
    height, width = image.shape[:2]
    size = (max(1, round(width * value)), max(1, round(height * value)))
    return (
      cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
      cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST),
    )
  raise UserInputError(f"perturbation '{kind}': expected one of {', '.join(KINDS)}")


class Perturbed:
  """A source view whose examples are degraded by one (kind, value): the image `field` (the
  one the model's map belongs to, e.g. a pair's forged image) and its mask."""

  def __init__(self, source, kind: str, value, seed: int = 0, field: str = "image"):
    self.source, self.kind, self.value, self.seed = source, kind, value, seed
    self.field = field

  @property
  def skipped(self) -> list[str]:
    return list(getattr(self.source, "skipped", []))

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    sample = self.source[index]
    if sample is None:  # Left out by data.on_error='skip'.
      return None
    image, mask = apply(
      sample[self.field],
      sample["mask"],
      self.kind,
      self.value,
      seed=self.seed * 1_000_003 + int(index),
    )
    return dict(sample, **{self.field: image, "mask": mask})
