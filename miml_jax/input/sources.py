"""Random-access data sources: what a config's `data.train` / `data.validation` strings name.

A source has `__len__` and `__getitem__(i) -> {'image': uint8 (H, W, 3) RGB, 'mask': uint8 (H, W)
grey 0..255, 'id': str, 'is_jpeg': bool}`, which is what grain's `MapDataset.source` needs
(folder:, benco: and tfds: samples also hold 'path', the image file's path or tfds:NAME/<id>).

Source strings:
  synthetic                 the embedded procedural forgery set (no download), any split
  synthetic:N               the same with N examples
  folder:/path/to/root      the MIML layout: root/imgs/<k>.<ext> with root/masks/<k>.png
  benco:/path/to/root       IMDLBenCo's layout: root/Tp/<k>.<ext> with root/Gt/<k>[_gt].<ext>
  benco:/path/list.json     IMDLBenCo's JSON list [[image, mask or "Negative"], ...]
  tfds:NAME/CONFIG[@SPLIT]  a dataset built by `miml-jax data build` (datasets/), read from
                            $TFDS_DATA_DIR or ~/tensorflow_datasets; an absolute
                            tfds:/path/NAME/CONFIG names the folder itself. SPLIT defaults to
                            the role's (train, validation)
  coco:/path/to/coco        COCO images with instance masks, made into forgeries by Object
                            Jitter (crops of data.image_size; split train -> COCO 'train',
                            validation -> 'val'); see coco.ObjectJitterSource
  coco:tfds:coco_instances  the same from a built datasets/coco_instances (any tfds: name,
                            e.g. coco:tfds:/abs/path/coco_instances[@SPLIT]): identical samples
  coco_splice:PATH          synthetic splices: an object of another COCO image pasted by its
                            instance mask; PATH as for coco: (a folder or tfds:...)
  coco_copymove:PATH        synthetic copy-moves: an object copied within the image; both
                            deterministic per (seed, index), see instance_forgery.py
  coco_edit:PATH            the forged images of coco_spg:PATH alone, as single-image samples:
                            an object recoloured, removed (inpainted) or replaced in place
                            (recipe: data.spg); see EditedImageSource

Pair sources (samples {'authentic', 'forged', 'mask' in the forged frame, 'has_mask', 'id',
'is_jpeg', ...} instead of an image; see pairs.py):
  pairs:/path/to/root       real pairs in the CAAA layout: root/<pair_id>/0.<ext> authentic,
                            1.<ext> forged, optional mask.<ext> (no mask: has_mask False)
  tfds:/abs/path/ciml_pairs a built datasets/ciml_pairs (any tfds: name whose dataset has
                            'authentic' and 'forged' features): the same samples as pairs:
  coco_spg:PATH             synthetic SPG pairs, a COCO object recoloured, removed (inpainted)
                            or replaced in place; PATH as for coco: (recipe: data.spg)
  coco_sdg:PATH             synthetic SDG pairs, an object of one COCO photo pasted into
                            another, with 'donor_mask' on the authentic image (recipe:
                            data.instance_forgery); see sdg.py
  pair_synth:/path/photos   the CAAA pair classifier's self-supervised pairs from any folder of
                            photos (recursively), with same_source, aligned and box labels
                            (recipe: data.pair_synth)

Mixtures join sources with '+' (as TFDS joins splits), each optionally repeated `*N` times per
epoch, e.g. the paper's training mix:

  folder:/data/tampCOCO+folder:/data/MIML_Part1*6+folder:/data/MIML_Part2*4+coco:/data/coco*3
  +folder:/data/CASIAv2*80

Bad examples (unreadable or truncated images, masks missing or of another size): by default the
first one stops the run with an error naming the file (`data.on_error='raise'`). With
`data.on_error='skip'` a training example that cannot be read is replaced by the next one that
can, and evaluation leaves it out; either way every skip is counted and reported with its file
and reason (SkipUnreadable), never silently.

One epoch holds every example of each source N times (mmseg's ConcatDataset of
RepeatDatasets, which the official training used); the pipeline shuffles the whole epoch and
augments every copy differently. (Paths containing '+' cannot be named in a mixture.)
"""

import dataclasses
import json
import os
import re

import numpy as np

from miml_jax import io
from miml_jax.errors import UserInputError
from miml_jax.input import synthetic


class SyntheticSource:
  """The embedded forgery set, with its {0, 1} masks widened to the 0/255 convention."""

  def __init__(self, split: str, num_examples: int | None, image_size: int, seed: int):
    self._data = synthetic.SyntheticForgeries(
      split=split, num_examples=num_examples, image_size=image_size, seed=seed
    )

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    sample = self._data[index]
    return {
      "image": sample["image"],
      "mask": sample["mask"] * np.uint8(255),
      "id": sample["id"],
      "is_jpeg": False,
    }


class FolderSource:
  """MIML layout: `root/imgs/<k>.<ext>` and `root/masks/<k>.png` (any image extension)."""

  def __init__(self, root: str, skip_missing_masks: bool = False):
    self.root = root
    self.skipped: list[str] = []  # images left out for lack of a mask (skip mode)
    image_dir, mask_dir = os.path.join(root, "imgs"), os.path.join(root, "masks")
    if not os.path.isdir(image_dir):
      raise UserInputError(f"{root}: expected the MIML layout with an imgs/ and a masks/ folder")
    self.images = io.list_images(image_dir)
    if not self.images:
      raise UserInputError(f"{image_dir}: no images (extensions {', '.join(io.IMAGE_EXTENSIONS)})")
    masks_by_stem = {
      os.path.splitext(os.path.basename(p))[0]: p
      for p in (io.list_images(mask_dir) if os.path.isdir(mask_dir) else [])
    }
    self.masks = []
    kept = []
    for path in self.images:
      stem = os.path.splitext(os.path.basename(path))[0]
      if stem not in masks_by_stem:
        message = f"{path}: no mask {os.path.join(mask_dir, stem)}.png"
        if not skip_missing_masks:
          raise UserInputError(message)
        self.skipped.append(message)
        continue
      kept.append(path)
      self.masks.append(masks_by_stem[stem])
    self.images = kept
    if not self.images:
      raise UserInputError(f"{image_dir}: no image has a mask in {mask_dir}")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    image_path, mask_path = self.images[index], self.masks[index]
    image, mask = io.read_image(image_path), io.read_mask(mask_path)
    io.check_same_size(image, mask, image_path, mask_path)
    return {
      "image": image,
      "mask": mask,
      "id": os.path.relpath(image_path, self.root),
      "path": image_path,  # What the official threshold rule tests for '/imd' (evaluate.py).
      "is_jpeg": image_path.lower().endswith((".jpg", ".jpeg")),
    }


class BencoSource:
  """IMDLBenCo's layouts: a folder with `Tp/` (images) and `Gt/` (masks), or a JSON list.

  Tp/Gt: the mask of `Tp/<k>.<ext>` is `Gt/<k>.*`, `Gt/<k>_gt.*` or `Gt/<k>_mask.*`, paired by
  name (IMDLBenCo pairs by sorted order, where one missing mask shifts every later pair).
  JSON (IMDLBenCo's JsonDataset): `[[image, mask], ...]` with mask "Negative" for an authentic
  image (an all-zero mask, `is_authentic`); relative paths are relative to the JSON file.
  A sample's `id` is its image's path relative to the deepest folder holding all the images
  (`Tp/`), so that lists whose images share a name (`<pair>/1.jpg`) still tell them apart.
  """

  MASK_SUFFIXES = ("", "_gt", "_mask")

  def __init__(self, path: str, skip_missing_masks: bool = False):
    self.root = path
    self.skipped: list[str] = []
    self.pairs = (
      self._read_list(path)
      if os.path.isfile(path)
      else self._pair_folders(path, skip_missing_masks)
    )
    if not self.pairs:
      raise UserInputError(f"{path}: no image has a mask")
    self.id_root = os.path.commonpath([os.path.dirname(image) for image, _ in self.pairs])

  @staticmethod
  def _read_list(path: str) -> list[tuple[str, str | None]]:
    try:
      with open(path) as f:
        entries = json.load(f)
    except (OSError, ValueError) as e:
      raise UserInputError(f"{path}: not a readable JSON list ({e})") from e
    base = os.path.dirname(os.path.abspath(path))
    pairs = []
    for number, entry in enumerate(entries if isinstance(entries, list) else [None]):
      if not (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and all(isinstance(v, str) for v in entry)
      ):
        raise UserInputError(
          f'{path}: entry {number} is {entry!r}; expected [image_path, mask_path or "Negative"]'
        )
      image, mask = (os.path.join(base, os.path.expanduser(v)) for v in entry)
      pairs.append((image, None if entry[1] == "Negative" else mask))
    return pairs

  def _pair_folders(self, root: str, skip: bool) -> list[tuple[str, str | None]]:
    image_dir, mask_dir = os.path.join(root, "Tp"), os.path.join(root, "Gt")
    if not os.path.isdir(image_dir) or not os.path.isdir(mask_dir):
      raise UserInputError(f"{root}: expected IMDLBenCo's Tp/ and Gt/ folders, or a JSON list")
    masks = {os.path.splitext(os.path.basename(p))[0]: p for p in io.list_images(mask_dir)}
    pairs = []
    for image in io.list_images(image_dir):
      stem = os.path.splitext(os.path.basename(image))[0]
      found = [masks[stem + s] for s in self.MASK_SUFFIXES if stem + s in masks]
      if not found:
        message = f"{image}: no mask {os.path.join(mask_dir, stem)}[_gt|_mask].<ext>"
        if not skip:
          raise UserInputError(message)
        self.skipped.append(message)
        continue
      pairs.append((image, found[0]))
    return pairs

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    image_path, mask_path = self.pairs[index]
    image = io.read_image(image_path)
    if mask_path is None:
      mask = np.zeros(image.shape[:2], np.uint8)
    else:
      mask = io.read_mask(mask_path)
      io.check_same_size(image, mask, image_path, mask_path)
    return {
      "image": image,
      "mask": mask,
      "id": os.path.relpath(image_path, self.id_root),
      "path": image_path,
      "is_jpeg": image_path.lower().endswith((".jpg", ".jpeg")),
      "is_authentic": mask_path is None,
    }


class TfdsSource:
  """A TFDS dataset built by this project's builders (datasets/), read without TensorFlow.

  Examples hold the image file's bytes and a PNG mask; they are decoded here, as FolderSource
  decodes files, so both give the same arrays. Extra fields (qes, source, is_authentic, ...)
  pass through as Python scalars.
  """

  def __init__(self, directory: str, split: str, name: str):
    import tensorflow_datasets as tfds  # Only when a tfds: source is used.

    self.name = name
    versions = sorted(
      (
        v
        for v in (os.listdir(directory) if os.path.isdir(directory) else [])
        if re.fullmatch(r"\d+\.\d+\.\d+", v)
      ),
      key=lambda v: tuple(map(int, v.split("."))),
    )
    if not versions:
      raise UserInputError(
        f"{directory}: no built dataset here; build it with `miml-jax data "
        f"build NAME --config CONFIG --manual-dir DIR` (datasets/README.md)"
      )
    builder = tfds.builder_from_directory(os.path.join(directory, versions[-1]))
    if split not in builder.info.splits:
      raise UserInputError(
        f"{name}: no split '{split}' (has {', '.join(builder.info.splits)});"
        f" name one with {name}@SPLIT"
      )
    # Raw records (bytes and scalars), e.g. for coco_instances, whose readers decode them.
    self.records = builder.as_data_source(split)
    self.has_masks = "mask" in builder.info.features
    # datasets/ciml_pairs and the like hold pairs, read by pairs.BuiltPairSource instead.
    self.is_pairs = all(key in builder.info.features for key in ("authentic", "forged"))

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    record = self.records[index]
    sample_id = _text(record["id"])
    where = f"{self.name}[{sample_id}]"
    image = io.decode_image(record["image"], where + " image")
    mask = io.decode_mask(record["mask"], where + " mask")
    io.check_same_size(image, mask, where + " image", where + " mask")
    sample = {"image": image, "mask": mask, "id": sample_id, "is_jpeg": bool(record["is_jpeg"])}
    sample["path"] = f"{self.name}/{sample_id}"  # e.g. tfds:iml_benchmarks/imd2020/<id>
    for key, value in record.items():  # Extra fields (qes, source, is_authentic, ...).
      if key not in sample and key not in ("image", "mask"):
        sample[key] = _text(value) if isinstance(value, (bytes, str)) else np.asarray(value).item()
    return sample


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _tfds_source(arg: str, split: str) -> TfdsSource:
  name, _, split_name = arg.partition("@")
  if os.path.isabs(os.path.expanduser(name)):
    directory = os.path.expanduser(name)
  else:
    data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    directory = os.path.join(data_dir, name)
  return TfdsSource(directory, split_name or split, f"tfds:{name}")


class EditedImageSource:
  """A pair source's forged images as single-image samples ({'image', 'mask', 'id',
  'is_jpeg', 'kind'}): coco_edit: is coco_spg:'s in-place edits for single-image tasks."""

  def __init__(self, pairs_source):
    self.pairs = pairs_source

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    sample = self.pairs[index]
    out = {"image": sample["forged"], "mask": sample["mask"], "id": sample["id"]}
    out.update(is_jpeg=sample.get("is_jpeg", False), kind=sample.get("kind", ""))
    return out


class MixtureSource:
  """Sources concatenated, each repeated `repeat` times; ids are prefixed with their source."""

  def __init__(self, parts: list[tuple[str, object, int]]):
    self.parts = parts
    self.skipped = [m for _, source, _ in parts for m in getattr(source, "skipped", [])]
    self._offsets = np.cumsum([0] + [len(source) * repeat for _, source, repeat in parts])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a mixture of {len(self)}")
    part = int(np.searchsorted(self._offsets, index, side="right")) - 1
    name, source, _ = self.parts[part]
    sample = dict(source[(index - int(self._offsets[part])) % len(source)])
    sample["id"] = f"{name}/{sample['id']}"
    return sample

  def describe(self) -> str:
    return " + ".join(f"{name} ({len(source)} x {repeat})" for name, source, repeat in self.parts)


class SkipUnreadable:
  """`data.on_error='skip'`: examples whose files cannot be read are skipped and reported.

  replace=True (training): example i that fails is replaced by the next readable one (i+1, ...),
  so the pipeline's index arithmetic is unchanged; the returned sample lists what it replaced in
  'skipped' (newline-separated messages, '' when nothing was). replace=False (evaluation): a
  failing example comes back as None, and `skipped` lists its message (once).
  """

  MAX_CONSECUTIVE = 100

  def __init__(self, source, replace: bool):
    self.source, self.replace = source, replace
    # What the source itself left out when listing its files (e.g. images without masks).
    self._listed = list(getattr(source, "skipped", []))
    self._failed: dict[int, str] = {}  # evaluation: index -> why (each once, however often read)

  @property
  def skipped(self) -> list[str]:
    return self._listed + [self._failed[i] for i in sorted(self._failed)]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    messages = []
    for offset in range(min(self.MAX_CONSECUTIVE, len(self.source))):
      try:
        sample = dict(self.source[(index + offset) % len(self.source)])
      except UserInputError as e:
        messages.append(str(e))
        if not self.replace:
          self._failed[index] = str(e)
          return None
        continue
      sample["skipped"] = "\n".join(messages)
      return sample
    raise UserInputError(
      f"data.on_error='skip': {len(messages)} examples in a row from index "
      f"{index} cannot be read; the last: {messages[-1]}"
    )


_REPEAT = re.compile(r"^(.*?)\*(\d+)$")


def make_source(
  spec: str,
  split: str,
  *,
  image_size: int = 128,
  seed: int = 0,
  on_error: str = "raise",
  for_training: bool = False,
  object_jitter=None,
  instance_forgery=None,
  spg=None,
  pair_synth=None,
):
  """Builds the source or mixture a config string names (see the module docstring).

  object_jitter / instance_forgery / spg / pair_synth: settings (dicts, e.g.
  `data.object_jitter`) of the synthetic sources' recipes (ObjectJitterConfig,
  InstanceForgeryConfig, pairs.SPGConfig, pairs.PairSynthConfig); None: the defaults.
  """
  if on_error not in ("raise", "skip"):
    raise UserInputError(f"data.on_error='{on_error}': expected 'raise' or 'skip'")
  settings = _Settings(
    image_size,
    seed,
    on_error == "skip",
    dict(object_jitter or {}),
    dict(instance_forgery or {}),
    dict(spg or {}),
    dict(pair_synth or {}),
  )
  source = _make_source(spec, split, settings)
  return SkipUnreadable(source, replace=for_training) if on_error == "skip" else source


def source_from_config(
  spec: str, split: str, data_config, for_training: bool = False, on_error: str | None = None
):
  """make_source with the settings of a config's `data` block (image_size, seed, on_error
  unless given, object_jitter, instance_forgery, spg, pair_synth)."""
  return make_source(
    spec,
    split,
    image_size=data_config.image_size,
    seed=data_config.seed,
    on_error=on_error or data_config.get("on_error", "raise"),
    for_training=for_training,
    object_jitter=data_config.get("object_jitter"),
    instance_forgery=data_config.get("instance_forgery"),
    spg=data_config.get("spg"),
    pair_synth=data_config.get("pair_synth"),
  )


@dataclasses.dataclass(frozen=True)
class _Settings:
  image_size: int
  seed: int
  skip: bool  # data.on_error='skip': sources leave out what they cannot pair (and say so).
  object_jitter: dict
  instance_forgery: dict
  spg: dict = dataclasses.field(default_factory=dict)
  pair_synth: dict = dataclasses.field(default_factory=dict)


def _make_source(spec: str, split: str, settings: _Settings):
  items = [item.strip() for item in spec.split("+")]
  if len(items) == 1 and not _REPEAT.match(items[0]):
    return _make_one(items[0], split, settings)
  parts = []
  for item in items:
    match = _REPEAT.match(item)
    name, repeat = (match.group(1).strip(), int(match.group(2))) if match else (item, 1)
    if not name or repeat < 1 or "*" in name:
      raise UserInputError(
        f"data source '{spec}': cannot read '{item}' (expected SOURCE or "
        f"SOURCE*N with N >= 1, joined by '+')"
      )
    source = _make_one(name, split, settings)
    if len(source) == 0:
      raise UserInputError(f"data source '{spec}': {name} has no examples")
    parts.append((name, source, repeat))
  return MixtureSource(parts)


def _make_one(spec: str, split: str, settings: _Settings):
  kind, _, arg = spec.partition(":")
  if kind == "coco_edit":
    if not arg:
      raise UserInputError(f"data source '{spec}': give a path, coco_edit:/path/to/coco")
    return EditedImageSource(_make_one(f"coco_spg:{arg}", split, settings))
  image_size, seed, skip = settings.image_size, settings.seed, settings.skip
  if kind == "synthetic":
    num = int(arg) if arg else None
    return SyntheticSource(split, num, image_size, seed)
  if kind == "folder":
    if not arg:
      raise UserInputError(f"data source '{spec}': give a path, folder:/path/to/root")
    return FolderSource(os.path.expanduser(arg), skip_missing_masks=skip)
  if kind == "benco":
    if not arg:
      raise UserInputError(
        f"data source '{spec}': give a path, benco:/path/to/dataset or benco:/path/to/list.json"
      )
    return BencoSource(os.path.expanduser(arg), skip_missing_masks=skip)
  if kind == "tfds":
    if not arg:
      raise UserInputError(f"data source '{spec}': give a dataset, tfds:NAME/CONFIG")
    source = _tfds_source(arg, split)
    if source.is_pairs:
      from miml_jax.input import pairs

      return pairs.BuiltPairSource(source.records, source.name)
    if not source.has_masks:
      raise UserInputError(
        f"{source.name}: this dataset has no 'mask' feature; a coco_instances "
        f"dataset is read through coco:{arg} (or coco_splice:, coco_copymove:)"
      )
    return source
  if kind in ("pairs", "pair_synth"):
    if not arg:
      raise UserInputError(
        f"data source '{spec}': give a path, {kind}:/path/to/"
        f"{'root' if kind == 'pairs' else 'photos'}"
      )
    from miml_jax.input import pairs

    if kind == "pairs":
      return pairs.PairFolderSource(os.path.expanduser(arg), skip=skip)
    # Training and validation pairs come from disjoint photos (PairSynthConfig.holdout).
    return pairs.PairSynthSource(
      os.path.expanduser(arg),
      image_size,
      seed,
      synthetic.SPLIT_IDS.get(split, 0),
      config=pairs.PairSynthConfig.from_config(settings.pair_synth),
      holdout_split=split != "train",
    )
  if kind in ("coco", "coco_splice", "coco_copymove", "coco_spg", "coco_sdg"):
    if not arg:
      raise UserInputError(
        f"data source '{spec}': give a path, {kind}:/path/to/coco or {kind}:tfds:coco_instances"
      )
    # grain and the COCO index only when asked for.
    from miml_jax.input import coco, instance_forgery

    def open_built(name, role):  # A built coco_instances split, through the tfds: reader.
      built = _tfds_source(name, role)
      return built.records, built.name

    instances = coco.open_instances(arg, split, open_built)
    split_id = synthetic.SPLIT_IDS.get(split, 0)
    if kind == "coco":
      from miml_jax.input.object_jitter import ObjectJitterConfig

      return coco.ObjectJitterSource(
        instances,
        crop_size=image_size,
        seed=seed,
        split_id=split_id,
        config=ObjectJitterConfig.from_config(settings.object_jitter),
      )
    if kind == "coco_sdg":
      from miml_jax.input import sdg

      # The paste is coco_splice's (data.instance_forgery); donor and host from one split.
      return sdg.SDGSource(
        instances,
        crop_size=image_size,
        seed=seed,
        split_id=split_id,
        config=instance_forgery.InstanceForgeryConfig.from_config(settings.instance_forgery),
      )
    if kind == "coco_spg":
      from miml_jax.input import pairs

      return pairs.SPGSource(
        instances,
        crop_size=image_size,
        seed=seed,
        split_id=split_id,
        config=pairs.SPGConfig.from_config(settings.spg),
      )
    return instance_forgery.InstanceForgerySource(
      instances,
      "splice" if kind == "coco_splice" else "copy_move",
      crop_size=image_size,
      seed=seed,
      split_id=split_id,
      config=instance_forgery.InstanceForgeryConfig.from_config(settings.instance_forgery),
    )
  raise UserInputError(
    f"data source '{spec}': unknown kind '{kind}' (known: synthetic, folder:PATH, benco:PATH, "
    f"tfds:NAME/CONFIG, coco:PATH, coco_splice:PATH, coco_copymove:PATH, pairs:PATH, "
    f"coco_spg:PATH, pair_synth:PATH, coco_edit:PATH, coco_sdg:PATH)"
  )
