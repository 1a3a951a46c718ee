"""`miml-jax data show`: Object Jitter rows (before | after | training crop) on a tiny COCO folder
the test writes, mixtures with other sources, and the refusal to overwrite."""

import json

import cv2
import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax.input import sources

SIZE = 64  # Image, jitter crop and training crop size: a row is 3 x 64 px, shown 5x (1024 // 192).
SCALE = 5
# Rows at the top of a 64 px panel that its label may cover (text of scale 0.3 from y = 0).
LABEL_ROWS = 12
# How far outside the mask (alpha > 0.5) the paste may still change pixels: the bilinear alpha's
# edge (1 px) plus the widest blur a box under 64 px gets (kernel 5, radius 2).
ALPHA_REACH = 4
OVERRIDES = [f"--config.data.image_size={SIZE}", f"--config.input.augment.crop_size={SIZE}"]


@pytest.fixture
def coco_root(tmp_path):
  """Three 64x64 noise images, each with polygon objects in its lower half (out of the labels)."""
  root = tmp_path / "coco"
  (root / "images").mkdir(parents=True)
  (root / "annotations").mkdir()
  images, annotations = [], []
  for k, name in enumerate(("a.png", "b.png", "c.png")):
    pixels = np.random.default_rng(k).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    io.write_image(str(root / "images" / name), pixels)
    images.append({"id": k, "file_name": name, "height": SIZE, "width": SIZE})
    x = 6 + 8 * k
    annotations.append(
      {
        "id": 10 * k + 1,
        "image_id": k,
        "iscrowd": 0,  # A rectangle.
        "segmentation": [[x, 30, x + 26, 30, x + 26, 56, x, 56]],
      }
    )
    annotations.append(
      {
        "id": 10 * k + 2,
        "image_id": k,
        "iscrowd": 0,  # A triangle.
        "segmentation": [[40, 28, 60, 60, 36, 60]],
      }
    )
  (root / "annotations" / "instances.json").write_text(
    json.dumps({"images": images, "annotations": annotations, "categories": []})
  )
  return root


def _show(argv, capsys):
  code = cli.main(["data", "show", *argv, "--json", *OVERRIDES])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  return json.loads(captured.out)


def _panels(sheet: np.ndarray, top: int, count: int) -> list[np.ndarray]:
  """The `count` 64 px panels of the row starting at sheet row `top`, back at their own size."""
  row = sheet[top : top + SIZE * SCALE, : count * SIZE * SCALE]
  small = row[::SCALE, ::SCALE]
  # Shown by pixel repetition, never resampled: the seams stay exactly as the jitter left them.
  np.testing.assert_array_equal(np.repeat(np.repeat(small, SCALE, 0), SCALE, 1), row)
  return [small[:, k * SIZE : (k + 1) * SIZE] for k in range(count)]


def test_object_jitter_rows_show_the_crop_before_and_after(coco_root, tmp_path, capsys):
  out = tmp_path / "sheet.png"
  result = _show([f"coco:{coco_root}", "--out", str(out), "--num", "3"], capsys)
  assert result["shown"] == 3 and result["object_jitter_rows"] == 3
  assert sorted(result["ids"]) == ["a.png", "b.png", "c.png"]
  sheet = io.read_image(str(out))
  assert sheet.shape == (3 * SIZE * SCALE, 3 * SIZE * SCALE, 3)

  # The same forgeries, read as training reads them (quickstart's data.seed 0): no host image.
  source = sources.make_source(f"coco:{coco_root}", "train", image_size=SIZE, seed=0)
  assert "host_image" not in source[0]
  source.transform.keep_host = True
  items = {item["id"]: item for item in (source[i] for i in range(len(source)))}
  below_labels = np.zeros((SIZE, SIZE), bool)
  below_labels[LABEL_ROWS:] = True
  changed_inside = 0
  for row, name in enumerate(result["ids"]):
    item = items[name]
    before, after, training = _panels(sheet, row * SIZE * SCALE, 3)
    mask = item["mask"] > 0
    assert mask.any(), f"{name}: the jitter found no object"
    reach = cv2.dilate(mask.astype(np.uint8), np.ones((2 * ALPHA_REACH + 1,) * 2, np.uint8)) > 0
    differ = (before != after).any(axis=-1) & below_labels
    assert not (differ & ~reach).any(), f"{name}: before and after differ away from the paste"
    changed_inside += int((differ & mask).sum())
    # Panel 1 is the host crop itself; panel 2 the forgery, whose outline lies on its mask.
    np.testing.assert_array_equal(before[LABEL_ROWS:], item["host_image"][LABEL_ROWS:])
    assert not ((after != item["image"]).any(axis=-1) & below_labels & ~mask).any()
    assert (after != item["image"]).any(axis=-1)[mask].any(), f"{name}: mask not outlined"
    # Panel 3 is the augmented crop: another picture than the forgery.
    assert training.shape == (SIZE, SIZE, 3) and (training != after).any()
  assert changed_inside > 100


def test_mixture_keeps_other_rows_and_overwrite_is_refused(coco_root, tmp_path, capsys):
  out = tmp_path / "sheet.png"
  spec = f"coco:{coco_root}+synthetic:2"
  result = _show([spec, "--out", str(out), "--num", "5"], capsys)
  assert result["shown"] == 5 and result["object_jitter_rows"] == 3
  sheet = io.read_image(str(out))
  # Jitter rows: 3 panels of 64 px, 5x; synthetic rows keep their 2 panels (stored | training
  # crop, 128 px wide), 8x, and set the sheet's width; the narrower rows are padded with black.
  heights = [SIZE * SCALE if i.startswith("coco:") else SIZE * 1024 // 128 for i in result["ids"]]
  assert sheet.shape == (sum(heights), 1024, 3)
  top = 0
  for name, height in zip(result["ids"], heights):
    if name.startswith("coco:"):
      _panels(sheet, top, 3)
      assert not sheet[top : top + height, 3 * SIZE * SCALE :].any()
    else:
      assert name.startswith("synthetic:2/")
      row = sheet[top : top + height]
      np.testing.assert_array_equal(np.repeat(np.repeat(row[::8, ::8], 8, 0), 8, 1), row)
    top += height

  written = out.read_bytes()
  code = cli.main(["data", "show", f"coco:{coco_root}", "--out", str(out), *OVERRIDES])
  assert code == 2 and "exists" in capsys.readouterr().err
  assert out.read_bytes() == written
  result = _show([f"coco:{coco_root}", "--out", str(out), "--num", "2", "--overwrite"], capsys)
  assert io.read_image(str(out)).shape[0] == 2 * SIZE * SCALE
