"""The standard image manipulation localization benchmarks as one TFDS dataset, one config per
benchmark, built without TensorFlow from each release as users download it:

    miml-jax data build iml_benchmarks --config casia1 --manual-dir /data
    miml-jax eval --checkpoint W --data tfds:iml_benchmarks/casia1@test

Each config reads one folder under manual_dir (the first of the names listed that exists),
searched recursively, so double nesting from unzipping (`4cam_auth/4cam_auth/`) does not matter:

  config    folder under manual_dir                   holds
  casia1    CASIA1 | CASIAv1 | CASIA 1.0 dataset      Au/, Tp/{CM,Sp}/ (or "Modified Tp/Tp/.."),
                                                      and Pham's "CASIA 1.0 groundtruth/"
                                                      unzipped into it ({CM,Sp}/<stem>_gt.png)
  casia2    CASIA2 | CASIAv2 | CASIA2.0 | CASIA 2.0   Au/, Tp/, and the ground truth (Gt/ or
                                                      "CASIA 2 Groundtruth/", <stem>_gt.png)
  columbia  Columbia | Columbia Uncompressed Image    4cam_auth/*.tif, 4cam_splc/*.tif,
            Splicing Detection                        4cam_splc/edgemask/<stem>_edgemask.jpg
  coverage  COVERAGE | coverage | Coverage            image/<N>.tif, image/<N>t.tif,
                                                      mask/<N>forged.tif
  nist16    NC2016_Test0613 | NC2016_Test | NIST16    probe/, reference/manipulation/
                                                      NC2016-manipulation-ref.csv and mask/
  imd2020   IMD2020                                   <folder>/<x>_orig.jpg (authentic),
                                                      <folder>/<y>.{jpg,png} + <y>_mask.png
  dso1      tifs-database | DSO1                      DSO-1/{normal,splicing}-<N>.png,
                                                      DSO-1-Fake-Images-Masks/splicing-<N>.png
  korus     realistic-tampering-dataset | Korus       <camera>/tampered-realistic/<stem>.TIF,
                                                      <camera>/pristine/<stem>.TIF,
                                                      <camera>/ground-truth/<stem>.PNG

Every example holds
  image         the image file's own bytes (TIFF, BMP, PNG or JPEG as released, never
                re-encoded: JPEG and resampling traces are what a detector looks at). Each is
                decoded at build time with io.decode_image, the decoder TfdsSource reads it back
                with (OpenCV: TIFF, BMP, PNG, JPEG, 8 or 16 bit), so a built example always
                decodes; a file it cannot decode stops the build, naming the file.
  mask          PNG, 0 / 255, of the image's height and width: 255 = manipulated, by the
                benchmark's rule below; all zero for authentic images.
  id            the image's path relative to the benchmark folder (NIST16: ProbeFileName).
  is_jpeg       whether the image bytes are a JPEG (read from the bytes, not the file name).
  is_authentic  True for pristine images (the detection half of a benchmark).
  manip_type    splice | copy_move | removal | unknown, 'none' for authentic images (NIST16 joins
                several with '+').
  group         examples made from one original share it (NIST16 BaseFileName, IMD2020 folder,
                Korus camera/stem, COVERAGE pair number); '' where the release does not say.

How each mask becomes binary (LAYOUTS.md gives the sources; published numbers differ with it):
  casia1, casia2, coverage, imd2020   grey > 127 (white = manipulated)
  nist16, dso1                        grey < 128 (inverted releases: black = manipulated)
  korus                               grey > 10 (the 3-level map: grey "collateral damage" and
                                      white both count as tampered, as the readme advises)
  columbia                            green channel > 120 of the colour-coded JPEG edgemask
                                      (the CAT-Net author's rule; photoholmes uses > 0)
Names are normalised on the way: CASIA v1's FileNameCorrection renames (Sp_D_ <-> Sp_S_ swaps,
the malformed `ani0054.0257`, four source/target fixes; "Modified Tp" needs none), CASIA v2's
(exact `<stem>_gt.png`, else the mask with the same unique 5-digit id, which also covers `_gt3`).

Problems. A tampered image without its mask, a mask of another size than its image (never
resized or rotated to fit) or a file that does not decode stops the build with an error naming
the file, EXCEPT for each benchmark's published known problems (`known_problems` below: CASIA v1
0542 has no mask and two odd-size masks, CASIA v2's 17 mismatched masks and 02437, COVERAGE ids
41 48 55-59 61 95, IMD2020 z14/00030_fake): those are left out when they fail, and the build logs
each with a count. Dropping corrected masks (SunnyHaze/IML-Dataset-Corrections) over the released
ones brings them back. To leave out any other example, list its id (one per line, # comments) in
`miml_jax_skip.txt` in the benchmark folder. A build whose tampered masks are mostly more than
half manipulated stops too: that is an inverted mask set (e.g. already-flipped NIST16 masks).

Splits: `test` = the whole benchmark (they are evaluation sets); casia2, the usual training set,
has `train` = the same examples too.
"""

from collections.abc import Callable
import csv
import dataclasses
import logging
import os
import re
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from miml_jax import io
from miml_jax.errors import UserInputError

SKIP_FILE = "miml_jax_skip.txt"


@dataclasses.dataclass
class BenchmarkConfig(tfds.core.BuilderConfig):
  folders: tuple[str, ...] = ()  # accepted names of its folder under manual_dir, first wins
  layout: str = ""  # what that folder holds, for instructions and errors
  splits: tuple[str, ...] = ("test",)
  # Regexes over ids without extension, matched at a path-component boundary: published
  # problems, left out (and logged) when they fail, an error for every other file.
  known_problems: tuple[str, ...] = ()


_CASIA2_MISMATCHED = (  # SunnyHaze/CASIA2.0-Corrected-Groundtruth: 17 size mismatches, by id
  "11227|12437|11524|01602|11912|11913|10508|01654|01883|01778|11230|00751|01719|01971|20010|"
  "02316|01980"
)

CONFIGS = [
  BenchmarkConfig(
    name="casia1",
    description="CASIA v1.0 with Pham's ground truth: 921 tampered / 800 authentic JPEGs",
    folders=("CASIA1", "CASIAv1", "CASIA 1.0 dataset"),
    layout="Au/*.jpg, Tp/{CM,Sp}/*.jpg (or 'Modified Tp/Tp/...') and Pham's 'CASIA 1.0 "
    "groundtruth' unzipped into it ({CM,Sp}/<stem>_gt.png)",
    known_problems=(
      r"Sp_D_\w+_0542",  # identical to Au_cha_0011, no mask
      r"Sp_D_CRN_A_sec0069_ani0081_0400",
      r"Sp_D_NRN_A_ani0077_ani0095_0439",
    ),
  ),
  BenchmarkConfig(
    name="casia2",
    description="CASIA v2.0 with Pham's ground truth: 5123 tampered / 7491 "
    "authentic (JPEG, TIFF, BMP); the usual training set",
    folders=("CASIA2", "CASIAv2", "CASIA2.0", "CASIA 2.0"),
    layout="Au/*.{jpg,bmp}, Tp/*.{jpg,tif} and the ground truth (Gt/ or 'CASIA 2 "
    "Groundtruth/', <stem>_gt.png)",
    splits=("train", "test"),
    known_problems=(rf"Tp_[DS]_\w+_({_CASIA2_MISMATCHED}|02437)",),
  ),
  BenchmarkConfig(
    name="columbia",
    description="Columbia Uncompressed Image Splicing Detection: 180 spliced / 183 authentic TIFFs",
    folders=("Columbia", "Columbia Uncompressed Image Splicing Detection"),
    layout="4cam_auth/*.tif, 4cam_splc/*.tif, 4cam_splc/edgemask/<stem>_edgemask.jpg",
  ),
  BenchmarkConfig(
    name="coverage",
    description="COVERAGE: 100 copy-move forgeries of similar objects / 100 originals (TIFF)",
    folders=("COVERAGE", "coverage", "Coverage"),
    layout="image/<N>.tif (original), image/<N>t.tif (tampered), mask/<N>forged.tif",
    known_problems=(r"(41|48|55|56|57|58|59|61|95)t",),
  ),
  BenchmarkConfig(
    name="nist16",
    description="NIST Nimble 2016 (NC2016_Test0613): 564 manipulated / 560 "
    "unmanipulated JPEG probes",
    folders=("NC2016_Test0613", "NC2016_Test", "NIST16"),
    layout="probe/*.jpg, reference/manipulation/NC2016-manipulation-ref.csv and its mask/",
  ),
  BenchmarkConfig(
    name="imd2020",
    description="IMD2020 real-life manipulations: 2010 manipulated / 414 originals",
    folders=("IMD2020",),
    layout="<folder>/<x>_orig.jpg (original), <folder>/<y>.{jpg,png} + <y>_mask.png",
    known_problems=(r"z14/00030_fake",),
  ),
  BenchmarkConfig(
    name="dso1",
    description="DSO-1 (Carvalho et al.): 100 spliced / 100 normal PNGs",
    folders=("tifs-database", "DSO1"),
    layout="DSO-1/{normal,splicing}-<N>.png, DSO-1-Fake-Images-Masks/splicing-<N>.png",
  ),
  BenchmarkConfig(
    name="korus",
    description="Korus realistic tampering: 220 tampered / 220 pristine TIFFs from 4 cameras",
    folders=("realistic-tampering-dataset", "Korus", "korus"),
    layout="<camera>/tampered-realistic/<stem>.TIF, <camera>/pristine/<stem>.TIF, "
    "<camera>/ground-truth/<stem>.PNG",
  ),
]


class Builder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Original image bytes; binary 0/255 PNG masks by each benchmark's rule "
    "(module docstring); is_authentic, manip_type, group."
  }
  BUILDER_CONFIGS = CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Unpack each benchmark into its folder under manual_dir: " + (
    "; ".join(f"{c.name}: {' or '.join(c.folders)}/ with {c.layout}" for c in CONFIGS)
  )

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # the file's bytes
          "mask": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG, 0 / 255
          "id": tfds.features.Text(),
          "is_jpeg": np.bool_,
          "is_authentic": np.bool_,
          "manip_type": tfds.features.Text(),
          "group": tfds.features.Text(),
        }
      )
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)  # tfds_build refuses a missing or empty one.
    root = next(
      (
        os.path.join(manual_dir, f)
        for f in config.folders
        if os.path.isdir(os.path.join(manual_dir, f))
      ),
      None,
    )
    if root is None:
      raise UserInputError(
        f"{manual_dir}: no {' or '.join(config.folders)} folder for "
        f"{config.name}; it should hold {config.layout}"
      )
    return {split: self._generate_examples(root) for split in config.splits}

  def _generate_examples(self, root):
    config = self.builder_config
    examples = LISTERS[config.name](root)
    if not any(not e.is_authentic for e in examples):
      raise UserInputError(
        f"{root}: no tampered {config.name} images found; expected {config.layout}"
      )
    user_skips = _read_skip_list(os.path.join(root, SKIP_FILE))
    skipped, fractions = [], []
    for example in examples:
      if example.id in user_skips:
        skipped.append(f"{example.id}: listed in {os.path.join(root, SKIP_FILE)}")
        continue
      try:
        features, fraction = _features(example)
      except UserInputError as e:
        if not _is_known_problem(example.id, config.known_problems):
          raise UserInputError(
            f"{e} (to leave it out, add the line '{example.id}' to {os.path.join(root, SKIP_FILE)})"
          ) from None
        skipped.append(f"{e} (a known problem of {config.name})")
        continue
      if not example.is_authentic:
        fractions.append(fraction)
      yield example.id, features
    if len(fractions) >= 2 and np.mean(np.asarray(fractions) > 0.5) > 0.5:
      raise UserInputError(
        f"{root}: {np.sum(np.asarray(fractions) > 0.5)} of {len(fractions)} {config.name} masks "
        f"mark more than half of their image as manipulated: the masks look inverted (this "
        f"builder expects the release's own polarity; see its docstring)"
      )
    unused = sorted(user_skips - {e.id for e in examples})
    if unused:
      logging.warning(
        "%s: %s lists ids that are not in %s: %s", SKIP_FILE, config.name, root, ", ".join(unused)
      )
    if skipped:
      logging.warning(
        "iml_benchmarks/%s: left out %d examples:\n  %s",
        config.name,
        len(skipped),
        "\n  ".join(skipped),
      )


class _Example(NamedTuple):
  id: str  # the image's path relative to the benchmark folder
  image: str  # absolute paths
  mask: str | None  # None: authentic, or a tampered image whose mask is missing
  is_authentic: bool
  manip_type: str
  group: str = ""
  binarize: Callable[[bytes, str], np.ndarray] | None = None  # mask bytes -> bool (H, W)
  expected_mask: str = ""  # what a missing mask was looked for as, for the error


def _features(example: _Example) -> tuple[dict, float]:
  """The stored example, and the fraction of its pixels marked manipulated."""
  image_bytes = io.read_bytes(example.image)
  image = io.decode_image(image_bytes, example.image)  # Also proves TfdsSource can read it.
  if example.is_authentic:
    mask = np.zeros(image.shape[:2], bool)
  elif example.mask is None:
    raise UserInputError(
      f"{example.image}: no mask for this tampered image ({example.expected_mask})"
    )
  else:
    mask = example.binarize(io.read_bytes(example.mask), example.mask)
    io.check_same_size(image, mask, example.image, example.mask)
  return {
    "image": image_bytes,
    "mask": io.encode_image(np.where(mask, 255, 0).astype(np.uint8), ".png"),
    "id": example.id,
    "is_jpeg": image_bytes[:3] == b"\xff\xd8\xff",
    "is_authentic": example.is_authentic,
    "manip_type": "none" if example.is_authentic else example.manip_type,
    "group": example.group,
  }, float(mask.mean())


def _grey_above(threshold: int):
  return lambda data, name: io.decode_mask(data, name) > threshold


def _grey_below(threshold: int):
  return lambda data, name: io.decode_mask(data, name) < threshold


def _green_above(threshold: int):
  return lambda data, name: io.decode_image(data, name)[:, :, 1] > threshold


def _is_known_problem(example_id: str, patterns) -> bool:
  name = os.path.splitext(example_id)[0]
  return any(re.search(rf"(?:^|/)(?:{p})$", name) for p in patterns)


def _read_skip_list(path: str) -> set[str]:
  if not os.path.isfile(path):
    return set()
  with open(path) as f:
    return {line.split("#")[0].strip() for line in f} - {""}


def _image_files(root: str) -> list[str]:
  """Image files under root, recursively, as sorted '/'-separated relative paths (hidden files
  such as macOS's '._x.jpg' left out)."""
  found = []
  for directory, subdirectories, names in os.walk(root, followlinks=True):
    subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
    for name in names:
      if not name.startswith(".") and name.lower().endswith(io.IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
  return sorted(found)


def _stem(relative: str) -> str:
  return os.path.splitext(os.path.basename(relative))[0]


def _folders(relative: str) -> list[str]:
  """The lower-cased folder names on a relative path."""
  return [part.lower() for part in relative.split("/")[:-1]]


def _unique(root: str, pairs, what: str) -> dict:
  """{key: relative path} from (key, path) pairs; a key found twice is an error."""
  index = {}
  for key, relative in pairs:
    if key in index:
      raise UserInputError(
        f"{root}: two {what} for '{key}': {index[key]} and {relative}; keep one copy of the release"
      )
    index[key] = relative
  return index


def _splice_or_copy_move(name: str) -> str:
  """CASIA's second name token: D = region from a different image, S = the same image."""
  tokens = name.split("_")
  return {"D": "splice", "S": "copy_move"}.get(tokens[1] if len(tokens) > 1 else "", "unknown")


# ---- CASIA v1 --------------------------------------------------------------------------------
# FileNameCorrection.xlsx renames that change more than the Sp_D_ / Sp_S_ prefix.
_CASIA1_RENAMES = {
  "Sp_D_NNN_A_sec0049_sec0049_0117": "Sp_D_NNN_A_sec0049_sec0050_0117",
  "Sp_D_NRN_A_cha0037_cha0037_0513": "Sp_D_NRN_A_cha0037_cha0043_0513",
  "Sp_D_NRN_A_cha0041_cha0041_0514": "Sp_D_NRN_A_cha0041_cha0038_0514",
  "Sp_S_NNN_R_arc0003_arc0004_0051": "Sp_S_NNN_R_arc0003_arc0003_0051",
}


def _casia1_names(stem: str) -> list[str]:
  """The ground-truth names a released tampered image may go by: its own, the renamed one, and
  either with Sp_D_ / Sp_S_ swapped (the 29 images the correction moved between Sp and CM)."""
  fixed = _CASIA1_RENAMES.get(stem, stem.replace(".", "_"))  # ani0054.0257 -> ani0054_0257
  swapped = {"Sp_D_": "Sp_S_", "Sp_S_": "Sp_D_"}.get(fixed[:5], fixed[:5]) + fixed[5:]
  return [fixed, swapped]


def _list_casia1(root: str) -> list[_Example]:
  files = _image_files(root)
  masks = _unique(
    root, ((_stem(f)[:-3], f) for f in files if _stem(f).endswith("_gt")), "ground-truth masks"
  )
  if not masks:
    raise UserInputError(
      f"{root}: no <stem>_gt.png masks; unzip Pham's 'CASIA 1.0 groundtruth' into it"
    )
  examples, images_of = [], {}
  for relative in files:
    stem = _stem(relative)
    if stem.startswith("Au_"):
      examples.append(_Example(relative, os.path.join(root, relative), None, True, "none"))
    elif stem.startswith("Sp_") and not stem.endswith("_gt"):
      name = next((n for n in _casia1_names(stem) if n in masks), None)
      if name is not None and images_of.setdefault(name, relative) != relative:
        raise UserInputError(
          f"{root}: {images_of[name]} and {relative} are both CASIA v1 image "
          f"{name} (after the FileNameCorrection renames); keep one release"
        )
      examples.append(
        _Example(
          relative,
          os.path.join(root, relative),
          name and os.path.join(root, masks[name]),
          False,
          _splice_or_copy_move(name or stem),
          binarize=_grey_above(127),
          expected_mask=f"looked for {stem}_gt.png and its corrected names",
        )
      )
  return examples


# ---- CASIA v2 --------------------------------------------------------------------------------
def _list_casia2(root: str) -> list[_Example]:
  files = _image_files(root)
  mask_names = {f: re.fullmatch(r"(.+)_gt\d*", _stem(f)) for f in files}
  masks = _unique(root, ((m[1], f) for f, m in mask_names.items() if m), "ground-truth masks")
  if not masks:
    raise UserInputError(
      f"{root}: no <stem>_gt.png masks; put the CASIA 2.0 ground truth (Gt/) into it"
    )
  by_id: dict[str, list[str]] = {}  # The 5-digit id is unique across CASIA v2's tampered set.
  for name in masks:
    by_id.setdefault(name.rsplit("_", 1)[-1], []).append(name)
  examples = []
  for relative in files:
    stem = _stem(relative)
    if mask_names[relative]:
      continue
    if stem.startswith("Au_"):
      examples.append(_Example(relative, os.path.join(root, relative), None, True, "none"))
    elif stem.startswith("Tp_"):
      same_id = by_id.get(stem.rsplit("_", 1)[-1], [])
      name = stem if stem in masks else (same_id[0] if len(same_id) == 1 else None)
      examples.append(
        _Example(
          relative,
          os.path.join(root, relative),
          name and os.path.join(root, masks[name]),
          False,
          _splice_or_copy_move(name or stem),
          binarize=_grey_above(127),
          expected_mask=f"looked for {stem}_gt.png and a mask with its id",
        )
      )
  return examples


# ---- Columbia --------------------------------------------------------------------------------
def _list_columbia(root: str) -> list[_Example]:
  files = _image_files(root)
  edgemask = [f for f in files if "edgemask" in _folders(f) or _stem(f).endswith("_edgemask")]
  masks = _unique(root, ((_stem(f).removesuffix("_edgemask"), f) for f in edgemask), "edgemasks")
  examples = []
  for relative in sorted(set(files) - set(edgemask)):
    folders, stem = _folders(relative), _stem(relative)
    if "4cam_auth" in folders:
      examples.append(_Example(relative, os.path.join(root, relative), None, True, "none"))
    elif "4cam_splc" in folders:
      mask = masks.get(stem)
      examples.append(
        _Example(
          relative,
          os.path.join(root, relative),
          mask and os.path.join(root, mask),
          False,
          "splice",
          binarize=_green_above(120),
          expected_mask=f"looked for 4cam_splc/edgemask/{stem}_edgemask.jpg",
        )
      )
  return examples


# ---- COVERAGE --------------------------------------------------------------------------------
def _list_coverage(root: str) -> list[_Example]:
  files = _image_files(root)
  names = {f: re.fullmatch(r"(\d+)(t|forged|copy|paste)?", _stem(f), re.IGNORECASE) for f in files}
  masks = _unique(
    root,
    ((m[1], f) for f, m in names.items() if m and (m[2] or "").lower() == "forged"),
    "forged masks",
  )
  examples = []
  for relative, match in names.items():
    if not match or (match[2] or "").lower() not in ("", "t"):
      continue
    number, tampered = match[1], bool(match[2])
    mask = masks.get(number) if tampered else None
    examples.append(
      _Example(
        relative,
        os.path.join(root, relative),
        mask and os.path.join(root, mask),
        not tampered,
        "copy_move",
        group=number,
        binarize=_grey_above(127),
        expected_mask=f"looked for mask/{number}forged.tif",
      )
    )
  return examples


# ---- NIST16 ----------------------------------------------------------------------------------
_NIST_TYPES = (
  ("IsManipulationTypeSplice", "splice"),
  ("IsManipulationTypeRemoval", "removal"),
  ("IsManipulationTypeCopyClone", "copy_move"),
)


def _list_nist16(root: str) -> list[_Example]:
  path = os.path.join(root, "reference", "manipulation", "NC2016-manipulation-ref.csv")
  if not os.path.isfile(path):
    raise UserInputError(f"{path}: no such file (the probe -> mask table of NC2016)")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="|"))
  needed = ["ProbeFileName", "ProbeMaskFileName", "IsTarget", "BaseFileName"]
  missing = [c for c in needed + [c for c, _ in _NIST_TYPES] if rows and c not in rows[0]]
  if not rows or missing:
    raise UserInputError(
      f"{path}: expected a '|'-separated table with the columns {', '.join(missing or needed)}"
    )
  examples, seen = [], set()
  for number, row in enumerate(rows, 2):
    probe, target = row["ProbeFileName"], row["IsTarget"]
    if target not in ("Y", "N"):
      raise UserInputError(f"{path}:{number}: IsTarget is '{target}', not Y or N")
    if probe in seen:
      raise UserInputError(f"{path}:{number}: probe {probe} is listed twice")
    seen.add(probe)
    mask = row["ProbeMaskFileName"] if target == "Y" else ""
    mask_path = os.path.join(root, mask) if mask else ""
    types = "+".join(name for column, name in _NIST_TYPES if row[column] == "Y")
    examples.append(
      _Example(
        probe,
        os.path.join(root, probe),
        mask_path if os.path.isfile(mask_path) else None,
        target == "N",
        types or "unknown",
        group=row["BaseFileName"],
        binarize=_grey_below(128),
        expected_mask=f"{path}:{number} names '{mask}'",
      )
    )
  return examples


# ---- IMD2020 ---------------------------------------------------------------------------------
def _list_imd2020(root: str) -> list[_Example]:
  files = _image_files(root)
  is_mask = {f: _stem(f).lower().endswith("_mask") for f in files}
  masks = _unique(root, ((os.path.splitext(f)[0][:-5], f) for f in files if is_mask[f]), "masks")
  examples = []
  for relative in files:
    if is_mask[relative]:
      continue
    folder, key = os.path.dirname(relative), os.path.splitext(relative)[0]
    authentic = "_orig" in _stem(relative).lower()
    mask = None if authentic else masks.get(key)
    examples.append(
      _Example(
        relative,
        os.path.join(root, relative),
        mask and os.path.join(root, mask),
        authentic,
        "unknown",
        group=folder,
        binarize=_grey_above(127),
        expected_mask=f"looked for {key}_mask.png",
      )
    )
  return examples


# ---- DSO-1 -----------------------------------------------------------------------------------
def _list_dso1(root: str) -> list[_Example]:
  files = _image_files(root)

  def in_folder(relative, name):  # directly inside a folder of that name
    return _folders(relative)[-1:] == [name.lower()]

  masks = _unique(
    root, ((_stem(f), f) for f in files if in_folder(f, "DSO-1-Fake-Images-Masks")), "masks"
  )
  examples = []
  for relative in files:
    match = re.fullmatch(r"(normal|splicing)-\d+", _stem(relative))
    if not (match and in_folder(relative, "DSO-1")):
      continue
    authentic = match[1] == "normal"
    mask = None if authentic else masks.get(_stem(relative))
    examples.append(
      _Example(
        relative,
        os.path.join(root, relative),
        mask and os.path.join(root, mask),
        authentic,
        "splice",
        binarize=_grey_below(128),
        expected_mask=f"looked for DSO-1-Fake-Images-Masks/{os.path.basename(relative)}",
      )
    )
  return examples


# ---- Korus -----------------------------------------------------------------------------------
def _list_korus(root: str) -> list[_Example]:
  files = _image_files(root)
  kinds = ("tampered-realistic", "pristine", "ground-truth")
  by_key: dict[tuple[str, str, str], str] = {}  # (camera, kind, lower-case stem) -> path
  for relative in files:
    folders = _folders(relative)
    if folders and folders[-1] in kinds:
      camera = os.path.dirname(os.path.dirname(relative))
      key = (camera, folders[-1], _stem(relative).lower())
      if key in by_key:  # `X.TIF` next to a lower-case `X.tif` copy: the first is kept.
        logging.warning("korus: %s duplicates %s; left out", relative, by_key[key])
        continue
      by_key[key] = relative
  examples = []
  for (camera, kind, stem), relative in sorted(by_key.items(), key=lambda item: item[1]):
    if kind == "ground-truth":
      continue
    tampered = kind == "tampered-realistic"
    mask = by_key.get((camera, "ground-truth", stem)) if tampered else None
    examples.append(
      _Example(
        relative,
        os.path.join(root, relative),
        mask and os.path.join(root, mask),
        not tampered,
        "unknown",
        group=f"{camera}/{_stem(relative)}",
        binarize=_grey_above(10),
        expected_mask=f"looked for {camera}/ground-truth/{_stem(relative)}.PNG",
      )
    )
  return examples


LISTERS = {
  "casia1": _list_casia1,
  "casia2": _list_casia2,
  "columbia": _list_columbia,
  "coverage": _list_coverage,
  "nist16": _list_nist16,
  "imd2020": _list_imd2020,
  "dso1": _list_dso1,
  "korus": _list_korus,
}
