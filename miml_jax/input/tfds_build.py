"""Building the TFDS datasets of `datasets/<name>/` from Python (the `tfds build` CLI needs
TensorFlow; these builders do not): `miml-jax data build NAME --config C --manual-dir D`.

Builders are read from a directory of builder folders (`./datasets` of a checkout by default),
by path, as experiment configs are; a built dataset is then read by `tfds:NAME/CONFIG` without
its builder code (sources.TfdsSource).
"""

import contextlib
import importlib.util
import os
import shlex
import sys

from miml_jax.errors import UserInputError


def builders_dir(explicit: str | None = None) -> str:
  """`explicit`, else ./datasets, else the datasets/ folder next to this package's checkout."""
  candidates = (
    [explicit]
    if explicit
    else [
      os.path.join(os.getcwd(), "datasets"),
      os.path.join(os.path.dirname(__file__), "..", "..", "datasets"),
    ]
  )
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, "README.md")) or (
      explicit and os.path.isdir(candidate)
    ):
      return os.path.abspath(candidate)
  raise UserInputError(
    f"no builders folder at {' or '.join(map(os.path.abspath, candidates))}; "
    f"run from the miml-jax checkout or pass --builders DIR"
  )


def available(directory: str) -> list[str]:
  return sorted(
    name
    for name in os.listdir(directory)
    if os.path.isfile(os.path.join(directory, name, f"{name}_dataset_builder.py"))
  )


def load_builder_class(name: str, directory: str):
  """The `Builder` class of `<directory>/<name>/<name>_dataset_builder.py`."""
  path = os.path.join(directory, name, f"{name}_dataset_builder.py")
  if not os.path.isfile(path):
    raise UserInputError(
      f"no dataset '{name}' in {directory} (have: {', '.join(available(directory)) or 'none'})"
    )
  # Imported as a package module (TFDS locates a builder's files through its module).
  package = f"miml_jax_datasets_{name}"
  if package not in sys.modules:
    spec = importlib.util.spec_from_file_location(
      package,
      os.path.join(directory, name, "__init__.py"),
      submodule_search_locations=[os.path.join(directory, name)],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
  module_name = f"{package}.{name}_dataset_builder"
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
  return sys.modules[module_name].Builder


def build(
  name: str,
  config: str | None,
  manual_dir: str,
  data_dir: str,
  builders: str | None = None,
  beam_runner: str | None = None,
  beam_options: str = "",
) -> dict:
  """Builds NAME/CONFIG into data_dir; returns {'directory', 'splits': {split: examples}}.

  beam_runner ('DirectRunner', 'DataflowRunner', 'FlinkRunner', 'SparkRunner', ...): the
  examples are made by an Apache Beam pipeline on that runner, through TFDS's Beam support,
  for builders that offer it (`use_beam`); beam_options are the runner's command-line flags
  (e.g. '--project=P --region=R --temp_location=gs://B/tmp' for Dataflow, or
  '--direct_num_workers=8 --direct_running_mode=multi_processing' locally)."""
  import tensorflow_datasets as tfds

  builder_class = load_builder_class(name, builders_dir(builders))
  configs = [c.name for c in getattr(builder_class, "BUILDER_CONFIGS", [])]
  if configs and config not in configs:
    raise UserInputError(f"dataset '{name}': --config must be one of {', '.join(configs)}")
  if not os.path.isdir(manual_dir):
    raise UserInputError(f"{manual_dir}: --manual-dir is not a folder")
  instructions = getattr(builder_class, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if instructions and not os.listdir(manual_dir):  # TFDS would fail with an AssertionError.
    raise UserInputError(f"{manual_dir}: --manual-dir is empty; {instructions}")
  builder = builder_class(
    config=config, data_dir=os.path.expanduser(data_dir), file_format="array_record"
  )
  beam = {}
  if beam_runner:
    if not hasattr(builder, "use_beam"):
      raise UserInputError(f"dataset '{name}': its builder does not build with Apache Beam")
    try:
      from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
      raise UserInputError(
        "--beam-runner needs Apache Beam: pip install 'miml-jax[beam]'"
      ) from None
    builder.use_beam = True
    beam = dict(beam_runner=beam_runner, beam_options=PipelineOptions(shlex.split(beam_options)))
  # TFDS narrates on stdout, which belongs to the command's --json output.
  with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir), **beam)
    )
  splits = {split: info.num_examples for split, info in builder.info.splits.items()}
  if not any(splits.values()):
    raise UserInputError(f"{manual_dir}: dataset '{name}' built with no examples")
  return {"directory": os.fspath(builder.data_dir), "splits": splits}


def miml_example(item):
  """One (key, example) of the mimlv2 builder from (stem, image file, mask file, QES or None,
  category): the pure function its Beam workers run (here, so that they can import it)."""
  from miml_jax import io, qes

  stem, image_path, mask_path, score, source = item
  image_bytes = io.read_bytes(image_path)
  image = io.decode_image(image_bytes, image_path)
  mask = io.read_mask(mask_path)
  io.check_same_size(image, mask, image_path, mask_path)
  if score is None:
    score = qes.qes_numpy(io.read_soft_mask(mask_path))
  return (
    stem,
    {
      "image": image_bytes,
      "mask": io.encode_image(mask, ".png"),
      "id": stem,
      "is_jpeg": image_path.lower().endswith((".jpg", ".jpeg")),
      "qes": float(score),
      "source": source,
    },
  )
