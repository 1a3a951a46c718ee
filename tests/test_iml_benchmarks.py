"""The iml_benchmarks TFDS builder: for each of its 8 configs, a tiny tree in that benchmark's own
quirky release layout is built with `miml-jax data build` and read back through the `tfds:`
source; masks must come back as exactly the binary masks drawn (polarity, colour coding and
3-level maps normalised), of the image's size, with the image files' own bytes. Then the errors:
no folder, a mask of another size, a missing mask, inverted masks."""

import json
import os

import cv2
import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax.input import sources

BUILDERS = os.path.join(os.path.dirname(__file__), "..", "datasets")
HEIGHT, WIDTH = 16, 24


def _write(path, array, params=()):
  """Writes uint8 RGB / grey `array` in the format of path's extension, whatever its case."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  extension = os.path.splitext(path)[1].lower()
  if array.ndim == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
  ok, data = cv2.imencode(extension, np.ascontiguousarray(array), list(params))
  assert ok, path
  with open(path, "wb") as f:
    f.write(data.tobytes())


def _image(path, seed, shape=(HEIGHT, WIDTH)):
  _write(path, np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


def _box(top, left, bottom, right, shape=(HEIGHT, WIDTH)):
  region = np.zeros(shape, bool)
  region[top:bottom, left:right] = True
  return region


def _grey(region, inside=255, outside=0):
  return np.where(region, inside, outside).astype(np.uint8)


# Each fixture writes a release under `manual` and returns (its folder, {id: (the expected
# binary mask, or None for an authentic image; manip_type)}, ids the build must leave out).
def _casia1(manual):
  root = os.path.join(manual, "CASIA1")
  gt = os.path.join(root, "CASIA 1.0 groundtruth")
  _image(os.path.join(root, "Au", "Au_ani_0001.jpg"), 0)
  expected = {"Au/Au_ani_0001.jpg": (None, "none")}
  splice = _box(2, 3, 9, 12)
  # RGBA mask with the stray grey levels (52/64/76) one real mask has: not tampered.
  rgba = np.dstack([np.repeat(_grey(splice)[:, :, None], 3, axis=2), np.full(splice.shape, 255)])
  rgba[12:14, :, :3] = (52, 64, 76)
  _image(os.path.join(root, "Tp", "Sp", "Sp_D_CND_A_pla0005_pla0023_0281.jpg"), 1)
  _write(os.path.join(gt, "Sp", "Sp_D_CND_A_pla0005_pla0023_0281_gt.png"), rgba.astype(np.uint8))
  expected["Tp/Sp/Sp_D_CND_A_pla0005_pla0023_0281.jpg"] = (splice, "splice")
  # Released as a splice; FileNameCorrection makes it copy-move (its mask is in CM, RGB).
  moved = _box(5, 0, 16, 6)
  _image(os.path.join(root, "Tp", "Sp", "Sp_D_NND_A_nat0054_nat0054_0189.jpg"), 2)
  _write(
    os.path.join(gt, "CM", "Sp_S_NND_A_nat0054_nat0054_0189_gt.png"),
    np.repeat(_grey(moved)[:, :, None], 3, axis=2),
  )
  expected["Tp/Sp/Sp_D_NND_A_nat0054_nat0054_0189.jpg"] = (moved, "copy_move")
  # The malformed name ('.' before the id), moved CM -> Sp.
  malformed = _box(0, 10, 4, 24)
  _image(os.path.join(root, "Tp", "CM", "Sp_S_NRD_A_ani0040_ani0054.0257.jpg"), 3)
  _write(os.path.join(gt, "Sp", "Sp_D_NRD_A_ani0040_ani0054_0257_gt.png"), _grey(malformed))
  expected["Tp/CM/Sp_S_NRD_A_ani0040_ani0054.0257.jpg"] = (malformed, "splice")
  # A source/target fix inside CM.
  fixed = _box(8, 8, 12, 20)
  _image(os.path.join(root, "Tp", "CM", "Sp_S_NNN_R_arc0003_arc0004_0051.jpg"), 4)
  _write(os.path.join(gt, "CM", "Sp_S_NNN_R_arc0003_arc0003_0051_gt.png"), _grey(fixed))
  expected["Tp/CM/Sp_S_NNN_R_arc0003_arc0004_0051.jpg"] = (fixed, "copy_move")
  # The one image without a mask: a known problem, left out.
  _image(os.path.join(root, "Tp", "Sp", "Sp_D_NRN_A_cha0011_sec0011_0542.jpg"), 5)
  return root, expected, ["Tp/Sp/Sp_D_NRN_A_cha0011_sec0011_0542.jpg"]


def _casia2(manual):
  root = os.path.join(manual, "CASIA2")
  _image(os.path.join(root, "Au", "Au_ani_00001.jpg"), 0)
  _image(os.path.join(root, "Au", "Au_arc_10120.bmp"), 1)
  expected = {"Au/Au_ani_00001.jpg": (None, "none"), "Au/Au_arc_10120.bmp": (None, "none")}
  splice = _box(1, 1, 7, 9)
  _image(os.path.join(root, "Tp", "Tp_D_CRN_S_N_nat00033_cha00086_11502.jpg"), 2)
  _write(os.path.join(root, "Gt", "Tp_D_CRN_S_N_nat00033_cha00086_11502_gt.png"), _grey(splice))
  expected["Tp/Tp_D_CRN_S_N_nat00033_cha00086_11502.jpg"] = (splice, "splice")
  # An image downloaded before the 2021 renames: its mask is found by the 5-digit id.
  renamed = _box(9, 4, 15, 22)
  _image(os.path.join(root, "Tp", "Tp_D_NNN_S_N_sec00085_sec00085_00816.tif"), 3)
  _write(os.path.join(root, "Gt", "Tp_S_NNN_S_N_ani00085_ani00085_00816_gt.png"), _grey(renamed))
  expected["Tp/Tp_D_NNN_S_N_sec00085_sec00085_00816.tif"] = (renamed, "copy_move")
  gt3 = _box(0, 20, 16, 24)
  _image(os.path.join(root, "Tp", "Tp_D_NRD_S_N_cha10002_cha10001_20094.tif"), 4)
  _write(os.path.join(root, "Gt", "Tp_D_NRD_S_N_cha10002_cha10001_20094_gt3.png"), _grey(gt3))
  expected["Tp/Tp_D_NRD_S_N_cha10002_cha10001_20094.tif"] = (gt3, "splice")
  # One of the 17 published size mismatches (384x256 vs 384x255 there): left out.
  _image(os.path.join(root, "Tp", "Tp_S_NNN_S_N_sec00074_sec00074_00751.tif"), 5)
  _write(
    os.path.join(root, "Gt", "Tp_S_NNN_S_N_sec00074_sec00074_00751_gt.png"),
    _grey(_box(0, 0, 4, 4, (HEIGHT, WIDTH - 1))),
  )
  return root, expected, ["Tp/Tp_S_NNN_S_N_sec00074_sec00074_00751.tif"]


def _columbia(manual):
  root = os.path.join(manual, "Columbia Uncompressed Image Splicing Detection")
  shape = (32, 48)  # Colour blocks on the 16-pixel grid, so JPEG keeps them pure.
  _image(os.path.join(root, "4cam_auth", "4cam_auth", "canonxt_29_sub_07.tif"), 0, shape)
  expected = {"4cam_auth/4cam_auth/canonxt_29_sub_07.tif": (None, "none")}
  for index, (name, region) in enumerate(
    [
      ("canong3_canonxt_sub_01.tif", _box(16, 16, 32, 48, shape)),
      ("nikond70_kodakdcs330_sub_22.bmp", _box(0, 0, 16, 16, shape)),
    ]
  ):
    _image(os.path.join(root, "4cam_splc", name), 1 + index, shape)
    edgemask = np.zeros((*shape, 3), np.uint8)
    # Red: the host camera's region. Green, pure or dark (0, 200, 0), darker than mid-grey: the
    # spliced one.
    edgemask[..., 0] = np.where(region, 0, 255)
    edgemask[..., 1] = np.where(region, 200 if index else 255, 0)
    _write(
      os.path.join(root, "4cam_splc", "edgemask", os.path.splitext(name)[0] + "_edgemask.jpg"),
      edgemask,
      (cv2.IMWRITE_JPEG_QUALITY, 75),
    )
    expected[f"4cam_splc/{name}"] = (region, "splice")
  return root, expected, []


def _coverage(manual):
  root = os.path.join(manual, "COVERAGE")
  forged, copy, paste = _box(2, 2, 8, 8), _box(9, 12, 15, 18), _box(2, 2, 8, 8) | _box(0, 0, 1, 24)
  _image(os.path.join(root, "image", "1.tif"), 0)
  _image(os.path.join(root, "image", "1t.tif"), 1)
  for name, region in (("1forged", forged), ("1copy", copy), ("1paste", paste)):
    _write(os.path.join(root, "mask", f"{name}.tif"), _grey(region))
  # Id 41: a published mask of another size than its image: left out, its original kept.
  _image(os.path.join(root, "image", "41.tif"), 2)
  _image(os.path.join(root, "image", "41t.tif"), 3)
  _write(os.path.join(root, "mask", "41forged.tif"), _grey(_box(0, 0, 3, 3, (HEIGHT + 2, WIDTH))))
  return (
    root,
    {
      "image/1.tif": (None, "none"),
      "image/1t.tif": (forged, "copy_move"),
      "image/41.tif": (None, "none"),
    },
    ["image/41t.tif"],
  )


_NIST_COLUMNS = (
  "TaskID|ProbeFileID|ProbeFileName|ProbeMaskFileName|DonorFileID|DonorFileName|"
  "DonorMaskFileName|IsTarget|ProbePostProcessed|DonorPostProcessed|"
  "ManipulationQuality|IsManipulationTypeRemoval|IsManipulationTypeSplice|"
  "IsManipulationTypeCopyClone|Collection|BaseFileName|Lighting|IsControl|"
  "CorrespondingControlFileName|SemanticConsistency"
)


def _nist16(manual):
  root = os.path.join(manual, "NC2016_Test0613")
  rows = [_NIST_COLUMNS]
  expected = {}
  # (probe, mask id, is target, removal, splice, copy-clone, region): the mask ids are not the
  # probe ids, and manipulated pixels are BLACK in the released masks.
  for probe, mask_id, target, removal, splice, clone, region in [
    ("0128", "3942", "Y", "N", "Y", "N", _box(3, 4, 10, 14)),
    ("0940", "6409", "Y", "Y", "N", "Y", _box(0, 0, 16, 5)),
    ("1111", "", "N", "N", "N", "N", None),
  ]:
    probe_name = f"probe/NC2016_{probe}.jpg"
    mask_name = f"reference/manipulation/mask/NC2016_{mask_id}.png" if mask_id else ""
    _image(os.path.join(root, probe_name), int(probe))
    if mask_name:
      _write(os.path.join(root, mask_name), _grey(region, inside=0, outside=255))
    rows.append(
      "|".join(
        [
          "manipulation",
          f"NC2016_{probe}",
          probe_name,
          mask_name,
          "",
          "",
          "",
          target,
          "none",
          "",
          "",
          removal,
          splice,
          clone,
          "Nimble-WEB",
          "NC2016_0001",
          "",
          "N",
          "",
          "",
        ]
      )
    )
    manip = "+".join(
      t
      for t, flag in (("splice", splice), ("removal", removal), ("copy_move", clone))
      if flag == "Y"
    )
    expected[probe_name] = (region, manip or "none")
  csv_path = os.path.join(root, "reference", "manipulation", "NC2016-manipulation-ref.csv")
  with open(csv_path, "w") as f:
    f.write("\n".join(rows) + "\n")
  return root, expected, []


def _imd2020(manual):
  root = os.path.join(manual, "IMD2020")
  _image(os.path.join(root, "1b8r7b", "1b8r7b_orig.jpg"), 0)
  _image(os.path.join(root, "z4", "00010_orig.jpg"), 1)
  expected = {"1b8r7b/1b8r7b_orig.jpg": (None, "none"), "z4/00010_orig.jpg": (None, "none")}
  # `_0` images are manipulated (not authentic), with `_0_mask.png` masks.
  comment = _box(4, 4, 12, 12)
  _image(os.path.join(root, "1b8r7b", "c94scmh_0.jpg"), 2)
  _write(os.path.join(root, "1b8r7b", "c94scmh_0_mask.png"), _grey(comment))
  expected["1b8r7b/c94scmh_0.jpg"] = (comment, "unknown")
  # A PNG fake with an RGB mask whose anti-aliased edge (grey 100) is not tampered, 200 is.
  fake = _box(6, 0, 10, 24)
  soft = _grey(fake, inside=200)
  soft[5] = 100
  _image(os.path.join(root, "z4", "00010_fake_02.png"), 3)
  _write(os.path.join(root, "z4", "00010_fake_02_mask.png"), np.repeat(soft[:, :, None], 3, 2))
  expected["z4/00010_fake_02.png"] = (fake, "unknown")
  # No mask, but the user's skip list names it.
  _image(os.path.join(root, "1b8r7b", "e12abcd_0.jpg"), 4)
  with open(os.path.join(root, "miml_jax_skip.txt"), "w") as f:
    f.write("# masks still missing\n1b8r7b/e12abcd_0.jpg\n")
  return root, expected, ["1b8r7b/e12abcd_0.jpg"]


def _dso1(manual, inverted=True):
  root = os.path.join(manual, "tifs-database")
  _image(os.path.join(root, "DSO-1", "normal-01.png"), 0)
  expected = {"DSO-1/normal-01.png": (None, "none")}
  for index, region in ((1, _box(2, 2, 14, 9)), (2, _box(0, 12, 8, 24))):
    name = f"splicing-{index:02d}.png"
    _image(os.path.join(root, "DSO-1", name), index)
    _write(
      os.path.join(root, "DSO-1-Fake-Images-Masks", name),
      _grey(region, inside=0, outside=255) if inverted else _grey(region),
    )
    expected[f"DSO-1/{name}"] = (region, "splice")
  return root, expected, []


def _korus(manual):
  root = os.path.join(manual, "realistic-tampering-dataset")
  expected = {}
  for index, (camera, stem) in enumerate([("Canon_60D", "DPP0078"), ("Nikon_D90", "r07ece355t")]):
    folder = os.path.join(root, "data-images", camera)
    _image(os.path.join(folder, "tampered-realistic", f"{stem}.TIF"), 2 * index)
    _image(os.path.join(folder, "pristine", f"{stem}.TIF"), 2 * index + 1)
    # The 3-level map: grey (collateral damage, darker than mid-grey) and white (the edit) are
    # tampered; a little dark noise (5) is not.
    levels = np.full((HEIGHT, WIDTH), 5 * index, np.uint8)
    levels[2:8, 2:10], levels[8:11, 2:10] = 255, 100
    _write(os.path.join(folder, "ground-truth", f"{stem}.PNG"), levels)
    prefix = f"data-images/{camera}"
    expected[f"{prefix}/tampered-realistic/{stem}.TIF"] = (_box(2, 2, 11, 10), "unknown")
    expected[f"{prefix}/pristine/{stem}.TIF"] = (None, "none")
  # A lower-case duplicate of a pristine TIFF, as one mirror has: read once.
  pristine = os.path.join(root, "data-images", "Canon_60D", "pristine")
  with open(os.path.join(pristine, "DPP0078.tif"), "wb") as f:
    f.write(open(os.path.join(pristine, "DPP0078.TIF"), "rb").read())
  return root, expected, ["data-images/Canon_60D/pristine/DPP0078.tif"]


FIXTURES = {
  "casia1": _casia1,
  "casia2": _casia2,
  "columbia": _columbia,
  "coverage": _coverage,
  "nist16": _nist16,
  "imd2020": _imd2020,
  "dso1": _dso1,
  "korus": _korus,
}


def _build(config, manual, data_dir, capsys):
  code = cli.main(
    [
      "data",
      "build",
      "iml_benchmarks",
      "--config",
      config,
      "--manual-dir",
      str(manual),
      "--data-dir",
      str(data_dir),
      "--builders",
      BUILDERS,
      "--json",
    ]
  )
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("config", sorted(FIXTURES))
def test_each_benchmark_builds_to_binary_aligned_masks(config, tmp_path, capsys, caplog):
  import tensorflow_datasets as tfds

  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  root, expected, left_out = FIXTURES[config](str(manual))
  code, out, err = _build(config, manual, data_dir, capsys)
  assert code == 0, err[-3000:]
  splits = ("train", "test") if config == "casia2" else ("test",)
  assert json.loads(out)["splits"] == {split: len(expected) for split in splits}
  built = sources.make_source(f"tfds:{data_dir}/iml_benchmarks/{config}@test", "validation")
  samples = {built[i]["id"]: built[i] for i in range(len(built))}
  assert sorted(samples) == sorted(expected)
  stored = tfds.builder_from_directory(
    os.path.join(data_dir, "iml_benchmarks", config, "1.0.0")
  ).as_data_source("test")
  stored_images = {r["id"].decode(): r["image"] for r in (stored[i] for i in range(len(stored)))}
  for example_id, (region, manip_type) in expected.items():
    sample = samples[example_id]
    with open(os.path.join(root, example_id), "rb") as f:
      file_bytes = f.read()
    # The file's own bytes (JPEG, TIFF, BMP, PNG), never re-encoded.
    assert stored_images[example_id] == file_bytes, example_id
    np.testing.assert_array_equal(sample["image"], io.decode_image(file_bytes, example_id))
    want = np.zeros(sample["image"].shape[:2], bool) if region is None else region
    assert sample["mask"].shape == sample["image"].shape[:2], example_id
    np.testing.assert_array_equal(sample["mask"], np.where(want, 255, 0), err_msg=example_id)
    assert sample["is_authentic"] is (region is None), example_id
    assert sample["manip_type"] == manip_type, example_id
    assert sample["is_jpeg"] == example_id.lower().endswith(".jpg"), example_id
  for example_id in left_out:
    assert example_id in caplog.text or example_id in err, (example_id, caplog.text)
  if config == "nist16":
    assert {s["group"] for s in samples.values()} == {"NC2016_0001"}
  if config == "korus":
    assert samples["data-images/Nikon_D90/pristine/r07ece355t.TIF"]["group"] == (
      "data-images/Nikon_D90/r07ece355t"
    )


def test_build_errors_name_the_folder_or_file(tmp_path, capsys):
  def build_fails(config, manual):
    code, _, err = _build(config, manual, tmp_path / "tfds", capsys)
    assert code == 2, err[-3000:]
    return err

  empty = tmp_path / "empty"
  empty.mkdir()
  assert "--manual-dir is empty" in build_fails("casia1", empty)
  (empty / "CASIA 2.0").mkdir()
  err = build_fails("casia1", empty)
  assert f"{empty}: no CASIA1 or CASIAv1 or CASIA 1.0 dataset folder" in err
  # A mask of another size than its image (not one of the published problems).
  manual = tmp_path / "casia1"
  root, _, _ = _casia1(str(manual))
  mask = os.path.join(root, "CASIA 1.0 groundtruth", "CM", "Sp_S_NNN_R_arc0003_arc0003_0051_gt.png")
  _write(mask, np.zeros((HEIGHT, WIDTH - 1), np.uint8))
  err = build_fails("casia1", manual)
  assert f"{mask}: mask is 23x16 but its image" in err and "Sp_S_NNN_R_arc0003_arc0004" in err
  # A missing mask.
  manual = tmp_path / "dso1"
  root, _, _ = _dso1(str(manual))
  os.remove(os.path.join(root, "DSO-1-Fake-Images-Masks", "splicing-02.png"))
  err = build_fails("dso1", manual)
  assert f"{os.path.join(root, 'DSO-1', 'splicing-02.png')}: no mask" in err
  assert "miml_jax_skip.txt" in err
  # Masks already flipped to white = spliced: DSO-1's rule would mark almost everything.
  manual = tmp_path / "dso1_flipped"
  _dso1(str(manual), inverted=False)
  assert "masks look inverted" in build_fails("dso1", manual)


def test_casia1_on_the_shared_real_samples(shared_data, tmp_path, capsys):
  """The 36 real CASIA v1 forgeries and official masks, laid out as the two releases are."""
  samples = os.path.join(shared_data, "casia1_samples")
  root = tmp_path / "manual" / "CASIA1"
  names = sorted(os.listdir(os.path.join(samples, "tampered")))
  for name in names:
    kind = "Sp" if name.startswith("Sp_D_") else "CM"
    stem = os.path.splitext(name)[0]
    for source, target in (
      (os.path.join(samples, "tampered", name), root / "Tp" / kind / name),
      (
        os.path.join(samples, "masks", name),
        root / "CASIA 1.0 groundtruth" / kind / f"{stem}_gt.png",
      ),
    ):
      target.parent.mkdir(parents=True, exist_ok=True)
      os.symlink(source, target)
  code, out, err = _build("casia1", tmp_path / "manual", tmp_path / "tfds", capsys)
  assert code == 0, err[-3000:]
  assert json.loads(out)["splits"] == {"test": 36}
  built = sources.make_source(f"tfds:{tmp_path / 'tfds'}/iml_benchmarks/casia1@test", "test")
  for i in range(len(built)):
    sample = built[i]
    name = os.path.basename(sample["id"])
    official = io.read_mask(os.path.join(samples, "masks", name))
    np.testing.assert_array_equal(sample["mask"], np.where(official > 127, 255, 0))
    assert 0 < sample["mask"].mean() < 255 / 2 and not sample["is_authentic"]
    assert sample["manip_type"] == ("splice" if name.startswith("Sp_D_") else "copy_move")
