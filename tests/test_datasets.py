"""TFDS builders (datasets/) built TF-free from fixture trees the tests write, read back through
the `tfds:` source, and `miml-jax data build|show` end to end."""

import json
import os

import numpy as np
import pytest

from miml_jax import cli, io, qes
from miml_jax.errors import UserInputError
from miml_jax.input import sources, tfds_build

BUILDERS = os.path.join(os.path.dirname(__file__), "..", "datasets")


def _miml_folder(root, n=5, seed=0):
  """The MIML layout with soft masks (0..255, a band of uncertain pixels) and one PNG image."""
  rng = np.random.default_rng(seed)
  os.makedirs(root / "imgs")
  os.makedirs(root / "masks")
  for k in range(n):
    height, width = 24 + 4 * k, 32
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[4:12, 6:20] = 255
    mask[12:14, 6:20] = 128  # The soft band QES looks at.
    io.write_image(str(root / "imgs" / f"{k}.{'png' if k == 0 else 'jpg'}"), image)
    io.write_image(str(root / "masks" / f"{k}.png"), mask)


def test_mimlv2_builds_and_reads_back_like_the_folder(tmp_path, capsys):
  manual = tmp_path / "manual"
  _miml_folder(manual / "MIML_Part1")
  (manual / "MIML_Part1" / "annotations.jsonl").write_text(
    json.dumps({"id": "3", "qes": 0.25}) + "\n"
  )
  data_dir = tmp_path / "tfds"
  code = cli.main(
    [
      "data",
      "build",
      "mimlv2",
      "--config",
      "miml_part1",
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
  assert code == 0, err[-2000:]
  assert json.loads(out)["splits"] == {"train": 5}
  built = sources.make_source(f"tfds:{data_dir}/mimlv2/miml_part1", "train")
  folder = sources.make_source(f"folder:{manual / 'MIML_Part1'}", "train")
  by_id = {built[i]["id"]: built[i] for i in range(len(built))}
  assert sorted(by_id) == ["0", "1", "2", "3", "4"]
  for i in range(len(folder)):
    want = folder[i]
    got = by_id[os.path.splitext(os.path.basename(want["id"]))[0]]
    # The very same pixels: JPEG bytes are stored as they were, never re-encoded.
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["mask"], want["mask"])
    assert got["is_jpeg"] == want["is_jpeg"] and got["source"] == "spg"
  # QES: from annotations.jsonl where given, else computed from the soft mask.
  assert by_id["3"]["qes"] == 0.25
  expected = qes.qes_files([str(manual / "MIML_Part1" / "masks" / "1.png")])[0]
  assert by_id["1"]["qes"] == pytest.approx(expected) and 0 < expected < 1
  # A named split that is not there, and a dataset that was never built.
  with pytest.raises(UserInputError, match="no split 'test'"):
    sources.make_source(f"tfds:{data_dir}/mimlv2/miml_part1@test", "train")
  with pytest.raises(UserInputError, match="no built dataset here"):
    sources.make_source(f"tfds:{data_dir}/mimlv2/miml_part2", "train")
  # Any source can be looked at.
  sheet = tmp_path / "sheet.png"
  code = cli.main(
    [
      "data",
      "show",
      f"tfds:{data_dir}/mimlv2/miml_part1",
      "--out",
      str(sheet),
      "--num",
      "3",
      "--config.input.augment.crop_size=32",
    ]
  )
  assert code == 0, capsys.readouterr().err
  assert io.read_image(str(sheet)).shape[1] == 1024
  code = cli.main(["data", "show", "synthetic:4", "--out", str(sheet)])
  assert code == 2 and "exists" in capsys.readouterr().err


def test_mimlv2_annotations_build_with_beam_like_without(tmp_path, capsys):
  """`--beam-runner DirectRunner`: the same examples from Beam workers (TFDS's Beam support)
  as from the plain build, on the layout `miml-jax annotate` writes."""
  pytest.importorskip("apache_beam")
  manual = tmp_path / "annotated"
  _miml_folder(manual)
  records = [
    {"index": k, "id": f"p{k}", "name": str(k), "status": "kept", "qes": 0.5} for k in (0, 2)
  ]
  records.append({"index": 9, "status": "error", "reason": "unreadable"})
  (manual / "annotations-00000-of-00001.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in records)
  )
  built = {}
  for runner in (None, "DirectRunner"):
    data_dir = tmp_path / f"tfds_{runner}"
    argv = ["data", "build", "mimlv2", "--config", "annotations", "--manual-dir", str(manual)]
    argv += ["--data-dir", str(data_dir), "--builders", BUILDERS]
    code = cli.main(argv + (["--beam-runner", runner] if runner else []))
    assert code == 0, capsys.readouterr().err[-2000:]
    source = sources.make_source(f"tfds:{data_dir}/mimlv2/annotations", "train")
    built[runner] = {source[i]["id"]: source[i] for i in range(len(source))}
  plain, beam = built[None], built["DirectRunner"]
  assert sorted(plain) == sorted(beam) == ["0", "1", "2", "3", "4"]
  for key, example in plain.items():
    for field in ("image", "mask"):
      np.testing.assert_array_equal(beam[key][field], example[field])
    assert beam[key]["qes"] == example["qes"]
  assert plain["0"]["qes"] == 0.5
  computed = qes.qes_files([str(manual / "masks" / "1.png")])[0]
  assert plain["1"]["qes"] == pytest.approx(computed)


def test_build_errors_name_the_problem(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  (tmp_path / "README").write_text("not a dataset")
  cases = [
    (["data", "build", "nosuch", "--manual-dir", str(tmp_path)], "no dataset 'nosuch'"),
    (
      [
        "data",
        "build",
        "mimlv2",
        "--config",
        "miml_part2",
        "--manual-dir",
        str(tmp_path / "empty"),
      ],
      "--manual-dir is empty; Put each release in the MIML layout",
    ),
    (
      ["data", "build", "mimlv2", "--config", "part9", "--manual-dir", str(tmp_path)],
      "--config must be one of miml_part1",
    ),
    (
      ["data", "build", "mimlv2", "--config", "miml_part2", "--manual-dir", str(tmp_path)],
      "MIML_Part2: no such folder",
    ),
  ]
  for argv, message in cases:
    code = cli.main(argv + ["--data-dir", str(tmp_path / "out"), "--builders", BUILDERS])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-2000:]
  (tmp_path / "MIML_Part1" / "imgs").mkdir(parents=True)
  (tmp_path / "MIML_Part1" / "masks").mkdir()
  code = cli.main(
    [
      "data",
      "build",
      "mimlv2",
      "--config",
      "miml_part1",
      "--manual-dir",
      str(tmp_path),
      "--data-dir",
      str(tmp_path / "out"),
      "--builders",
      BUILDERS,
    ]
  )
  assert code == 2 and "no images" in capsys.readouterr().err
  with pytest.raises(UserInputError, match="no builders folder"):
    tfds_build.builders_dir(str(tmp_path / "missing"))


def _built(data_dir, name, config, split):
  import tensorflow_datasets as tfds

  directory = os.path.join(data_dir, name, *([config] if config else []), "1.0.0")
  return tfds.builder_from_directory(directory).as_data_source(split)


def test_synthetic_builds_to_the_embedded_set(tmp_path, capsys):
  code = cli.main(
    [
      "data",
      "build",
      "synthetic",
      "--config",
      "tiny",
      "--manual-dir",
      str(tmp_path),
      "--data-dir",
      str(tmp_path / "tfds"),
      "--builders",
      BUILDERS,
      "--json",
    ]
  )
  assert code == 0, capsys.readouterr().err[-2000:]
  assert json.loads(capsys.readouterr().out)["splits"] == {"train": 16, "validation": 8}
  for split in ("train", "validation"):
    built = sources.make_source(f"tfds:{tmp_path / 'tfds'}/synthetic/tiny", split)
    embedded = sources.make_source(
      "synthetic:16" if split == "train" else "synthetic:8", split, image_size=64
    )
    by_id = {built[i]["id"]: built[i] for i in range(len(built))}
    assert len(by_id) == len(embedded)
    for i in range(len(embedded)):
      want = embedded[i]
      np.testing.assert_array_equal(by_id[want["id"]]["image"], want["image"])
      np.testing.assert_array_equal(by_id[want["id"]]["mask"], want["mask"])


def test_ciml_pairs_build(tmp_path, capsys):
  rng = np.random.default_rng(1)
  manual = tmp_path / "pairs"
  for pair, (size_0, size_1) in {"a": ((20, 30), (20, 30)), "b": ((20, 30), (24, 18))}.items():
    (manual / pair).mkdir(parents=True)
    io.write_image(str(manual / pair / "0.jpg"), rng.integers(0, 256, (*size_0, 3), np.uint8))
    io.write_image(str(manual / pair / "1.png"), rng.integers(0, 256, (*size_1, 3), np.uint8))
  io.write_image(str(manual / "a" / "mask.png"), np.full((20, 30), 255, np.uint8))
  argv = [
    "data",
    "build",
    "ciml_pairs",
    "--manual-dir",
    str(manual),
    "--data-dir",
    str(tmp_path / "tfds"),
    "--builders",
    BUILDERS,
  ]
  assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
  pairs = _built(tmp_path / "tfds", "ciml_pairs", None, "train")
  records = {r["id"].decode(): r for r in (pairs[i] for i in range(len(pairs)))}
  assert records["a"]["same_size"] and records["a"]["has_mask"]
  assert not records["b"]["same_size"] and records["b"]["mask"] == b""
  # The files' own bytes, JPEG included.
  assert records["a"]["authentic"] == (manual / "a" / "0.jpg").read_bytes()
  (manual / "c").mkdir()
  io.write_image(str(manual / "c" / "0.png"), np.zeros((4, 4, 3), np.uint8))
  code = cli.main(argv[:-4] + ["--data-dir", str(tmp_path / "tfds2"), "--builders", BUILDERS])
  assert code == 2 and "no 1.<ext> (forged image)" in capsys.readouterr().err


def test_ciml_pairs_on_the_shared_web_pairs(shared_data, tmp_path, capsys):
  argv = [
    "data",
    "build",
    "ciml_pairs",
    "--manual-dir",
    os.path.join(shared_data, "web_pairs"),
    "--data-dir",
    str(tmp_path),
    "--builders",
    BUILDERS,
    "--json",
  ]
  assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
  assert json.loads(capsys.readouterr().out)["splits"] == {"train": 71}
  pairs = _built(tmp_path, "ciml_pairs", None, "train")
  assert sum(bool(pairs[i]["same_size"]) for i in range(len(pairs))) == 25
