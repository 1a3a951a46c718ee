"""`miml-jax <command>`: the one entry point that knows every command.

  train    train a model from an experiment config; checkpoints, metrics and pictures in --workdir
  eval     score a checkpoint on a dataset with the MIML protocol
  predict  heatmaps, overlays and binary masks for images or folders
  qes      the quality evaluation score of soft masks
  annotate CAAA: classify, route and annotate (authentic, forged) pairs into a training set
  data     build TFDS datasets (datasets/) and look at any data source
  convert  official PyTorch / safetensors / npz weights -> a miml-jax init file (--init)
  demo     a local web page: upload an image, see each model's heatmap, mask and score
  bench    train-step and inference throughput of the models, PyTorch side by side

Every command that computes numbers prints them as one JSON object on stdout with --json
(progress goes to stderr). Bad input ends with a one-line `error: ...` naming the file or key
and a non-zero exit code.
"""

import argparse
import csv
import json
import os
import shlex
import sys

from miml_jax import host_memory
from miml_jax.errors import UserInputError

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3


def _parse_config(spec: str, overrides: list[str]):
  from miml_jax import config as config_lib

  config = config_lib.load_config(spec)
  config_lib.apply_overrides(config, overrides)
  return config


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
  overrides = []
  for item in extra:
    if item.startswith("--config."):
      overrides.append(item[len("--config.") :])
    else:
      parser.error(f"unrecognised argument {item}")
  return overrides


def _emit(args, obj: dict, human: str):
  if args.json:
    print(json.dumps(obj, default=float))
  else:
    print(human)


def _check_out_dir(path: str, overwrite: bool):
  """--out must be a directory we can write (or create), new or empty unless --overwrite;
  checked before anything is loaded or created."""
  from miml_jax import train

  train.check_output_dir(path, "--out")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise UserInputError(
      f"{path}: exists and is not empty; choose another --out or pass --overwrite"
    )


def _threshold_arg(flag: str, text: str) -> float:
  """A fixed binarisation threshold from the command line: a number in [0, 1]."""
  value = _float_arg(flag, text)
  if not 0 <= value <= 1:
    raise UserInputError(f"{flag} {text}: expected a number in [0, 1] or image_head")
  return value


# ---- train -----------------------------------------------------------------------------------
def cmd_train(args, overrides):
  from miml_jax import tasks, train

  config = _parse_config(args.config, overrides)
  if args.init:
    with config.unlocked():
      config.model_init = os.path.abspath(args.init)
  result = train.train_and_evaluate(config, args.workdir)
  if not _is_main_process():
    return
  _emit(
    args,
    {"workdir": os.path.abspath(args.workdir), **_json_result(result)},
    tasks.build(config).format_result(result) + f"\nworkdir: {os.path.abspath(args.workdir)} "
    f"(metrics.json, predictions.png, curves.png, checkpoints/)",
  )


def _is_main_process() -> bool:
  """False on every process but the first of a multi-host run: they compute, it reports."""
  import jax

  return jax.process_index() == 0


def _json_result(result: dict) -> dict:
  return {
    key: result[key]
    for key in (
      "summary",
      "trivial",
      "conventions",
      "image_level",
      "unreadable_skipped",
      "threshold",
      "resize",
    )
    if key in result
  }


# ---- eval ------------------------------------------------------------------------------------
def cmd_eval(args, overrides):
  import jax

  from miml_jax import evaluate, perturb, report, sharding, tasks, train
  from miml_jax.input import sources

  main_process = _is_main_process()
  points = perturb.parse(args.perturb or [])
  conventions = evaluate.parse_conventions(args.conventions) if args.conventions else None
  # Every flag is checked before the checkpoint is loaded, and --out created only to write.
  if args.threshold not in (None, "image_head"):
    _threshold_arg("--threshold", args.threshold)
  if args.limit is not None and args.limit < 1:
    raise UserInputError(f"--limit {args.limit}: expected a number of images >= 1")
  if args.pictures < 0:
    raise UserInputError(f"--pictures {args.pictures}: expected a number of images >= 0")
  if args.out and main_process:
    _check_out_dir(args.out, args.overwrite)
  config, model, variables, step = _load_for_inference(args, overrides)
  dense = isinstance(tasks.build(config), tasks.DenseTask)
  if not dense and (points or args.conventions or args.threshold is not None):
    raise UserInputError(
      f"--perturb, --conventions and --threshold score probability maps; "
      f"task '{tasks.task_name(config)}' predicts none"
    )
  with config.unlocked():
    if args.threshold == "image_head":
      config.eval.threshold_policy = "image_head"
    elif args.threshold is not None:
      config.eval.threshold_policy = "fixed"
      config.eval.threshold = _threshold_arg("--threshold", args.threshold)
    if args.resize is not None:
      config.eval.resize = args.resize
  config = tasks.validate_config(config)  # --threshold 2 is refused like eval.threshold=2.
  data = args.data or config.data.validation
  source = sources.source_from_config(data, "validation", config.data)
  # Every device of every process runs the model; each batch is split over them.
  mesh = sharding.make_mesh(None)
  # NaN / inf maps are the checkpoint's fault, said so (exit EXIT_NON_FINITE).
  predictor = train.FiniteOutputs(
    evaluate.make_predictor(model, variables, config, mesh),
    f"{_weights_name(args)}" + (f" @ step {step}" if step is not None else ""),
  )
  task = predictor.task
  # Pictures go into the report (best and worst images), not a predictions.png.
  result = task.evaluate(
    predictor,
    source,
    limit=args.limit,
    conventions=conventions,
    extremes=args.pictures if args.out and main_process else 0,
  )
  sweep = (
    evaluate.robustness(
      predictor,
      config,
      source,
      points,
      clean=result,
      limit=args.limit,
      log=lambda m: print(m, file=sys.stderr),
      image_field=task.target_field,
    )
    if points
    else None
  )
  if not main_process:
    return
  devices = jax.devices()
  result.update(
    checkpoint=_weights_name(args),
    step=step,
    data=data,
    devices=f"{len(devices)} x {devices[0].device_kind}",
  )
  if sweep:
    result["robustness"] = sweep
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    pictures = result.pop("pictures", {})
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
      json.dump(result, f, indent=2, default=float)
    for name in ("per_image", "per_image_detection", "per_pair"):
      if name in result:
        _write_csv(os.path.join(args.out, f"{name}.csv"), result[name])
    if sweep:
      _write_csv(os.path.join(args.out, "robustness.csv"), sweep)
    command = "miml-jax " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if args.argv is None else args.argv)
    )
    if dense:
      report.write(args.out, dict(result, pictures=pictures), command, sweep)
  human = (
    f"{data} @ {'step ' + str(step) if step is not None else result['checkpoint']}\n"
    + task.format_result(result)
  )
  if sweep:
    human += "\n" + evaluate.format_robustness(sweep)
  if args.out:
    human += f"\n{'report' if dense else 'metrics'}: " + os.path.join(
      args.out, "report.md" if dense else "metrics.json"
    )
  _emit(
    args,
    {
      "checkpoint": result["checkpoint"],
      "step": step,
      "data": data,
      **_json_result(result),
      **({"robustness": sweep} if sweep else {}),
    },
    human,
  )


def _write_csv(path: str, rows: list[dict]):
  fields = list(dict.fromkeys(key for row in rows for key in row))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def _load_for_inference(args, overrides):
  """(config, model, variables, step) from --checkpoint W, or from --init FILE --config CFG."""
  from miml_jax import checkpoint

  return checkpoint.load_for_inference(
    args.checkpoint, args.step, args.init, args.config, overrides
  )


def _weights_name(args) -> str:
  """--checkpoint / --init as reports record it: as given, or relative to the working directory
  when it lies under it, never made absolute (a report names no path of the machine it ran on
  that the user did not type)."""
  path = os.path.normpath(args.checkpoint or args.init)
  if os.path.isabs(path):
    relative = os.path.relpath(path)
    if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
      return relative
  return path


def _add_weights_args(sub):
  sub.add_argument("--checkpoint", help="a training workdir")
  sub.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  sub.add_argument(
    "--init", help="instead of --checkpoint: an init file from `miml-jax convert` (needs --config)"
  )
  sub.add_argument(
    "--config", help="with --init: experiments/NAME.py[:arg] for the model and eval settings"
  )


def _add_multihost_args(sub):
  group = sub.add_argument_group(
    "multi-host",
    "Run as one of several processes (hosts) sharing one device mesh: start "
    "the same command\non every host. --multihost alone lets JAX detect the cluster (TPU "
    "pod, SLURM, Open MPI);\nor name it with all three of --coordinator, --num-processes "
    "and --process-id\n(two processes on one machine: 127.0.0.1:12355, 2, then 0 and 1).",
  )
  group.add_argument("--multihost", action="store_true", help="initialise jax.distributed")
  group.add_argument("--coordinator", help="HOST:PORT of process 0 (implies --multihost)")
  group.add_argument("--num-processes", type=int, help="number of processes")
  group.add_argument("--process-id", type=int, help="this process's index, from 0")


def _float_arg(flag: str, text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise UserInputError(f"{flag} {text}: expected a number or image_head") from None


# ---- predict ---------------------------------------------------------------------------------
def cmd_predict(args, overrides):
  from miml_jax import evaluate, predict, train

  # None: the official per-image rule from the image head, as eval's --threshold image_head.
  fixed_threshold = (
    None if args.threshold == "image_head" else _threshold_arg("--threshold", args.threshold)
  )
  train.check_output_dir(args.out, "--out")
  config, model, variables, _ = _load_for_inference(args, overrides)
  predictor = predict.Predictor(model, variables, config, batch_size=1, resize=args.resize)
  task = predictor.task
  inputs = task.predict_inputs(args.inputs)
  if not args.overwrite:
    predict.refuse_overwrite(args.out, inputs.stems())
  os.makedirs(args.out, exist_ok=True)
  records = []
  for sample, prediction in predictor.predict(inputs):
    threshold = None
    if "prob" in prediction:
      threshold = (
        evaluate.image_head_threshold(prediction["image_score"])
        if fixed_threshold is None
        else fixed_threshold
      )
    record = task.write_prediction(args.out, sample, prediction, threshold)
    if args.qes and "prob" in prediction:
      from miml_jax import qes

      record["qes"] = float(qes.qes(prediction["prob"]))
    records.append(record)
    if not args.json:
      print(task.describe_prediction(record))
  predict.dump_json(os.path.join(args.out, "predictions.json"), records)
  if args.json:
    print(json.dumps({"predictions": records}))


# ---- qes -------------------------------------------------------------------------------------
def cmd_qes(args, overrides):
  from miml_jax import qes

  del overrides
  scores = qes.qes_files(args.masks)
  records = [
    {"mask": p, "qes": float(s), "keep": bool(s > args.keep_threshold)}
    for p, s in zip(args.masks, scores)
  ]
  _emit(
    args,
    {"keep_threshold": args.keep_threshold, "masks": records},
    "\n".join(f"{r['qes']:.4f}  {'keep' if r['keep'] else 'drop'}  {r['mask']}" for r in records),
  )


# ---- annotate --------------------------------------------------------------------------------
def cmd_annotate(args, overrides):
  import jax

  from miml_jax import annotate

  if overrides:
    raise UserInputError(f"annotate takes no --config.* overrides, got {overrides[0]}")
  settings = annotate.AnnotateConfig.from_dict(
    {k: v for k, v in vars(args).items() if k in annotate.AnnotateConfig.__dataclass_fields__}
  )
  if args.process_count is not None or args.process_index is not None:
    if args.process_count is None or args.process_index is None:
      raise UserInputError("give --process-index and --process-count together")
    if not 0 <= args.process_index < args.process_count:
      raise UserInputError(
        f"--process-index {args.process_index} is not in [0, {args.process_count})"
      )
    index, count = args.process_index, args.process_count
  else:  # One process, or each jax.distributed process (--multihost) takes its share.
    index, count = jax.process_index(), jax.process_count()
  models = {}
  for role, expected in (
    ("classifier", ("pair_classification",)),
    ("spg", ("pair_segmentation",)),
    ("sdg", ("sdg_segmentation",)),
  ):
    path = getattr(args, role)
    models[role] = (
      annotate.load_model(path, getattr(args, f"{role}_config"), role, expected) if path else None
    )
  counts = annotate.annotate(
    args.pairs,
    args.out,
    **models,
    route=args.route,
    settings=settings,
    split=args.split,
    image_size=args.image_size,
    limit=args.limit,
    process_index=index,
    process_count=count,
  )
  summary_path = os.path.join(args.out, "report", "summary.json")
  summary = None
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  _emit(
    args,
    {"counts": counts, "summary": summary},
    f"annotate: {', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'nothing to do'}"
    + (f"; report in {os.path.join(args.out, 'report')}" if summary else ""),
  )


# ---- demo ------------------------------------------------------------------------------------
def cmd_demo(args, overrides):
  from miml_jax import demo

  if not 0 <= args.threshold <= 1:
    raise UserInputError(f"--threshold {args.threshold:g}: expected a number in [0, 1]")
  demo.require_gradio()  # Before loading models: a missing extra should not cost a load first.
  models = demo.load_models(args.model or [], args.init, args.config, overrides, resize=args.resize)
  url = f"http://{args.host}:{args.port}"
  _emit(
    args,
    {
      "url": url,
      "models": [
        {"name": m.name, "source": m.source, "model": m.model_name, "step": m.step} for m in models
      ],
    },
    f"loaded {', '.join(m.name for m in models)}; open {url} (Ctrl+C stops)",
  )
  sys.stdout.flush()
  demo.serve(
    models, host=args.host, port=args.port, max_pixels=args.max_pixels, threshold=args.threshold
  )


# ---- data ------------------------------------------------------------------------------------
def cmd_data(args, overrides):
  if args.data_command == "build":
    from miml_jax.input import tfds_build

    result = tfds_build.build(
      args.name,
      args.config,
      args.manual_dir,
      args.data_dir,
      args.builders,
      beam_runner=args.beam_runner,
      beam_options=args.beam_options,
    )
    counts = ", ".join(f"{split} {n}" for split, n in result["splits"].items())
    _emit(
      args,
      {"name": args.name, "config": args.config, **result},
      f"built {args.name}/{args.config or ''} in {result['directory']}: {counts} examples",
    )
    return
  _data_show(args, overrides)


def _data_show(args, overrides):
  """A contact sheet: each example as stored (mask outlined) and as training sees it.

  An example of a source that makes forgeries from COCO (coco:, coco_splice:, coco_copymove:,
  alone or in a mixture) shows three panels instead: the host crop before, the forgery after
  (mask outlined) and the training crop. Such a sheet repeats pixels rather than resampling
  them, so the paste's seam stays visible.
  """
  import numpy as np

  from miml_jax import tasks, visualize
  from miml_jax.input import coco, instance_forgery, sources, transforms

  config = tasks.validate_config(_parse_config(args.config, overrides))
  if os.path.exists(args.out) and not args.overwrite:
    raise UserInputError(f"{args.out}: exists; choose another --out or pass --overwrite")
  # A sheet is for looking at examples: a bad file stops it, whatever data.on_error says.
  source = sources.source_from_config(args.source, args.split, config.data, on_error="raise")
  parts = source.parts if isinstance(source, sources.MixtureSource) else [("", source, 1)]
  for _, part, _ in parts:  # Their samples also hold the crop before the forgery.
    if isinstance(part, coco.ObjectJitterSource):
      part.transform.keep_host = True
    elif isinstance(part, instance_forgery.InstanceForgerySource):
      part.keep_host = True
  augment = transforms.AugmentConfig.from_config(config.input.augment)
  rng = np.random.default_rng(config.seed)
  rows, ids, jittered, authentic = [], [], 0, 0
  for index in rng.permutation(len(source))[: args.num]:
    sample = source[int(index)]
    ids.append(str(sample.get("id", "")))
    if "forged" in sample:  # A pair: authentic | forged (mask outlined) | training crop.
      image, label = transforms.train_augment(sample["forged"], sample["mask"], rng, augment)
      rows.append(visualize.pair_row(sample, image, label))
      continue
    image, label = transforms.train_augment(sample["image"], sample["mask"], rng, augment)
    if "host_image" in sample:
      rows.append(visualize.jitter_row(sample, image, label))
      jittered += 1
      authentic += not sample["mask"].any()
    else:
      rows.append(visualize.sample_row(sample, image, label))
  sheet = visualize.pixel_sheet(rows) if jittered else visualize.contact_sheet(rows)
  visualize.save(args.out, sheet)
  note = (
    f" ({jittered} forgery rows: before | after | training crop; {authentic} found "
    f"no object and stayed authentic)"
    if jittered
    else ""
  )
  _emit(
    args,
    {
      "source": args.source,
      "examples": len(source),
      "shown": len(rows),
      "ids": ids,
      "object_jitter_rows": jittered,
      "object_jitter_authentic": authentic,
      "out": os.path.abspath(args.out),
    },
    f"{args.source}: {len(source)} examples; {len(rows)} shown in {args.out}{note}",
  )


# ---- convert ---------------------------------------------------------------------------------
def cmd_convert(args, overrides):
  import jax
  import ml_collections

  from miml_jax import models
  from miml_jax.models import convert

  if os.path.exists(args.out) and not args.overwrite:
    raise UserInputError(f"{args.out}: exists; choose another --out or pass --overwrite")
  if args.config:
    config = _parse_config(args.config, overrides)
  elif args.model:
    config = ml_collections.ConfigDict({"model": {"name": args.model}})
  else:
    raise UserInputError("give --config CFG (its model section) or --model NAME")
  model = models.build_model(config.model)
  target = models.abstract_variables(model, config)
  state_dict = models.official_state_dict(config.model, convert.read_state_dict(args.source))
  variables, report = convert.state_dict_to_variables(
    state_dict, target, strict=not args.partial, source=args.source
  )
  convert.save_init_file(
    args.out, variables, config.model, source=os.path.abspath(args.source), report=report
  )
  total = len(jax.tree_util.tree_leaves(target))
  _emit(
    args,
    {
      "out": os.path.abspath(args.out),
      "model": config.model.name,
      "target_tensors": total,
      **report.to_dict(),
    },
    f"{args.source} -> {args.out} ({config.model.name}): {report.summary()}; "
    f"{report.converted} of the model's {total} tensors",
  )


# ---- bench -----------------------------------------------------------------------------------
def cmd_bench(args, overrides):
  from miml_jax import bench

  if overrides:
    raise UserInputError(f"bench takes no config overrides, got {overrides}")
  split = lambda text: [t for t in text.split(",") if t]
  preset = bench.PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
  pick = lambda name: split(getattr(args, name)) if getattr(args, name) else preset[name]
  torch_modes = pick("torch")
  result = bench.run(
    models=pick("models"),
    sizes=pick("sizes"),
    dtypes=pick("dtypes"),
    modes=pick("modes"),
    reps=args.reps or preset["reps"],
    torch_modes=[] if torch_modes == ["none"] else torch_modes,
    threads=args.torch_threads,
    qes_masks=preset["qes_masks"] if args.qes_masks is None else args.qes_masks,
    ceiling_size=preset["ceiling_size"] if args.ceiling_size is None else args.ceiling_size,
    log=lambda line: print(line, file=sys.stderr, flush=True),
  )
  result["command"] = "miml-jax bench " + " ".join(
    shlex.quote(a) for a in (args.argv or sys.argv[1:])[1:]
  )
  if args.out:
    bench.write_json(result, args.out)
  _emit(args, result, bench.table(result))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="miml-jax",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Run `miml-jax COMMAND --help` for a command's options and what it writes.",
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def add(name, help_text, description):
    sub = commands.add_parser(
      name,
      help=help_text,
      description=description,
      formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument(
      "--json", action="store_true", help="print the numbers as one JSON object on stdout"
    )
    return sub

  train = add(
    "train",
    "train a model from an experiment config",
    "Trains the model an experiment config describes, showing progress (steps/s, "
    "ETA) on stderr.\nWrites into --workdir: config.json, checkpoints/<step>/ (orbax: "
    "weights, optimiser,\nstep, RNG, config), best/<step>/ (best validated weights), "
    "metrics.jsonl and tensorboard/\n(training scalars and validation results), "
    "metrics.json (final validation metrics),\npredictions.png (heatmap contact "
    "sheet), curves.png.\nA workdir with checkpoints of the same model resumes exactly "
    "(also after kill -9); one of\nanother model is refused. Override any config field "
    "with --config.a.b=value.",
  )
  train.add_argument("--config", required=True, help="experiments/NAME.py[:arg]")
  train.add_argument("--workdir", required=True, help="output directory (resumed if it exists)")
  train.add_argument(
    "--init",
    help="start from an init file of `miml-jax convert` (tensors "
    "it lacks keep their fresh init; ignored when resuming)",
  )

  _add_multihost_args(train)

  ev = add(
    "eval",
    "score a checkpoint on a dataset (MIML protocol and the others)",
    "Scores a checkpoint with its task's evaluator (a pair classifier: route, same-source\n"
    "and aligned accuracy, crop-box IoU, per_pair.csv). A model that predicts maps:\n"
    "per-image IoU / P / R / F1 over manipulated images (and means),\n"
    "pooled versions, pixel AUC per image and pooled, next to the all-zero and all-one\n"
    "predictors (the MIML protocol); other conventions (docs/evaluation.md), each under\n"
    "its own name (--conventions); image-level AUC / accuracy / balanced accuracy when\n"
    "authentic images are present; robustness sweeps (--perturb). Prints tables (or\n"
    "JSON). With --out DIR also writes report.md (with curves, histograms, best / worst\n"
    "images and robustness curves), metrics.json, per_image.csv,\n"
    "per_image_detection.csv and robustness.csv (DIR must be new or empty unless\n"
    "--overwrite).",
  )
  _add_weights_args(ev)
  _add_multihost_args(ev)
  ev.add_argument(
    "--data",
    help="data source: synthetic | folder:/path (MIML layout imgs/ "
    "masks/) | benco:/path (IMDLBenCo Tp/ Gt/ folders, or a JSON list) | "
    "tfds:NAME/CONFIG | coco:/path | pairs:/path (pair folders) | "
    "coco_spg:/path | pair_synth:/path | a '+' mixture (docs/datasets.md); "
    "default: the config's validation source",
  )
  ev.add_argument(
    "--threshold", help="headline threshold: a number, or image_head (clamp(1 - p, 0.3, 0.7))"
  )
  ev.add_argument("--resize", choices=("none", "miml"), help="test-time resize rule")
  ev.add_argument(
    "--conventions",
    help="other conventions to score: all (default), none, or a comma-separated subset of "
    "fixed_0.5, best_per_image, best_per_image_inverse, trufor_fixed_0.5, trufor_best (TruFor's "
    "script, NaN and nanmean as it), trufor_band_fixed_0.5, trufor_band_best (its band, every "
    "image scored), miml_official (the official scripts: every image, authentic ones add 0, the "
    "'/imd' rule), imdlbenco, imdlbenco_double (IMDLBenCo's evaluators, every image); "
    "docs/evaluation.md",
  )
  ev.add_argument(
    "--perturb",
    action="append",
    metavar="KIND:V1,V2,...",
    help="robustness sweep, repeatable: jpeg:50,70,90 | blur:3,7,11 | "
    "noise:3,7 | resize:0.5,0.75 (one evaluation per value)",
  )
  ev.add_argument(
    "--pictures",
    type=int,
    default=4,
    help="best and worst images shown in the report (default 4 each)",
  )
  ev.add_argument("--limit", type=int, help="score only the first N images")
  ev.add_argument("--out", help="directory for report.md, metrics.json, CSVs and pictures")
  ev.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")

  pr = add(
    "predict",
    "heatmaps and masks for images or folders",
    "Predicts the tampering probability of every pixel of each image (any size).\n"
    "A pair model (pair segmentation, pair classification) takes pair folders instead\n"
    "(<id>/0.<ext> authentic, <id>/1.<ext> forged), or folders of them: the map of the\n"
    "forged image, or the route, same-source / aligned scores and crop box per pair.\n"
    "Writes into --out, per image: <name>_heatmap.png, <name>_overlay.png, <name>_mask.png"
    "\n(binary at --threshold), and predictions.json with each image's tampered fraction,"
    "\nimage-level score (if the model has an image head) and optionally QES.\nExisting "
    "files are never overwritten unless --overwrite.",
  )
  pr.add_argument(
    "inputs", nargs="+", help="image files or folders (pair folders for a pair model)"
  )
  _add_weights_args(pr)
  pr.add_argument("--out", default="predictions", help="output directory (default predictions)")
  pr.add_argument(
    "--threshold",
    default="0.5",
    help="binarisation threshold: a number "
    "(default 0.5), or image_head (clamp(1 - p, 0.3, 0.7) per image)",
  )
  pr.add_argument(
    "--resize", choices=("none", "miml"), help="default: the checkpoint's eval.resize"
  )
  pr.add_argument("--qes", action="store_true", help="also report QES of each prediction")
  pr.add_argument("--overwrite", action="store_true", help="replace existing outputs")

  qs = add(
    "qes",
    "quality evaluation score of soft masks",
    "QES = count(p > 15/16) / count(p > 1/16) of a soft mask p in [0, 1] (8- or 16-bit\n"
    "PNG): the share of the predicted region that is confident. Prints one line per "
    "file:\nscore, keep/drop at --keep-threshold, path. Writes nothing.",
  )
  qs.add_argument("masks", nargs="+", help="soft-mask image files")
  qs.add_argument(
    "--keep-threshold", type=float, default=0.5, help="keep a mask iff QES > this (default 0.5)"
  )

  an = add(
    "annotate",
    "CAAA: turn (authentic, forged) pairs into a pixel-annotated training set",
    "Classifies each pair (--classifier, or --route for all), routes it to the in-place edit\n"
    "annotator (--spg, a pair_segmentation model such as DASS) or the pasted-donor annotator\n"
    "(--sdg, an sdg_segmentation model such as SACM or Corr-DINO), predicts its soft mask with\n"
    "the official flip test-time augmentation, scores QES and keeps it iff QES > the cut-off.\n"
    "Writes into --out: imgs/ (the forged files, unchanged) and masks/ (soft masks) of kept\n"
    "pairs, rejected/ (their soft masks), annotations-<k>-of-<n>.jsonl (one record per pair),\n"
    "annotate.json (the settings) and report/ (report.md, QES histogram, contact sheet).\n"
    "A killed run resumes where it stopped; build the dataset with\n"
    "`miml-jax data build mimlv2 --config annotations --manual-dir OUT`. docs/caaa.md.",
  )
  an.add_argument(
    "--pairs",
    required=True,
    help="pairs:ROOT (ROOT/<id>/0.<ext> authentic, 1.<ext> forged), tfds:ciml_pairs/..., or a "
    "synthetic pair source (coco_spg:PATH, coco_sdg:PATH, mixtures with +)",
  )
  an.add_argument("--out", required=True, help="output folder (new, empty, or a run to resume)")
  an.add_argument("--split", default="train", help="split of --pairs (default train)")
  an.add_argument(
    "--image-size", type=int, default=512, help="crop size of synthetic pair sources (512)"
  )
  an.add_argument("--limit", type=int, help="only the first N pairs")
  for role, what in (
    ("classifier", "the pair classifier"),
    ("spg", "the in-place edit (SPG) annotator"),
    ("sdg", "the pasted-donor (SDG) annotator"),
  ):
    an.add_argument(f"--{role}", help=f"{what}: a training workdir, or an init file")
    an.add_argument(f"--{role}-config", help=f"with an init file for --{role}: its config")
  an.add_argument(
    "--route",
    choices=("spg", "spg_unaligned", "sdg"),
    help="send every pair this way instead of classifying",
  )
  an.add_argument("--qes-threshold", type=float, default=0.5, help="keep iff QES > this (0.5)")
  an.add_argument(
    "--qes-routes",
    type=lambda text: tuple(t for t in text.split(",") if t),
    default=("spg", "spg_unaligned", "sdg"),
    help="routes the QES cut-off applies to (default all; v1 filtered only sdg)",
  )
  an.add_argument("--classifier-size", type=int, default=512, help="classifier input (512)")
  an.add_argument("--spg-size", type=int, default=1024, help="SPG annotator input (1024)")
  an.add_argument("--sdg-size", type=int, default=512, help="SDG annotator input (512)")
  an.add_argument(
    "--no-tta", dest="tta", action="store_false", help="no flip test-time augmentation"
  )
  an.add_argument("--spg-tta", choices=("mean", "sum"), default="mean", help="official: mean")
  an.add_argument("--sdg-tta", choices=("mean", "sum"), default="sum", help="official: sum")
  an.add_argument(
    "--unaligned",
    choices=("align", "drop"),
    default="align",
    help="cropped same-source pairs: align by the predicted box and annotate (default), or "
    "drop them as the v1 code does",
  )
  an.add_argument("--min-side", type=int, default=32, help="skip smaller images (32 px)")
  an.add_argument(
    "--max-aspect", type=float, default=8.0, help="skip images with a longer side ratio (8)"
  )
  an.add_argument("--batch-size", type=int, default=8, help="pairs per batch (8)")
  an.add_argument(
    "--no-save-rejected",
    dest="save_rejected",
    action="store_false",
    help="do not keep the soft masks of rejected pairs",
  )
  an.add_argument(
    "--recompress",
    type=lambda text: tuple(int(v) for v in text.split(",")),
    default=(0, 0),
    metavar="QMIN,QMAX",
    help="evaluation on synthetic pairs: JPEG-recompress each image on its own at a quality "
    "in [QMIN, QMAX], as web pairs are (default off)",
  )
  an.add_argument(
    "--process-index", type=int, help="with --process-count: this process's share, from 0"
  )
  an.add_argument("--process-count", type=int, help="number of processes splitting the pairs")
  _add_multihost_args(an)

  da = add(
    "data",
    "build TFDS datasets; look at any data source",
    "build: builds datasets/NAME (TFDS, array_record, no TensorFlow) from files you "
    "downloaded\n(--manual-dir) into --data-dir; train on it with "
    "--config.data.train=tfds:NAME/CONFIG.\nshow: a contact sheet PNG of examples from any "
    "data source: each as stored, with its\nmask outlined, and as training sees it "
    "(augmented crop, tampered in red, ignored in grey).",
  )
  data_commands = da.add_subparsers(dest="data_command", required=True, metavar="build|show")
  build = data_commands.add_parser("build", help="build datasets/NAME")
  build.add_argument("name", help="a folder of datasets/, e.g. mimlv2")
  build.add_argument("--config", help="the builder config, e.g. miml_part1")
  build.add_argument("--manual-dir", required=True, help="the downloaded files")
  build.add_argument(
    "--data-dir",
    default=os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets")),
    help="where to write (default $TFDS_DATA_DIR or ~/tensorflow_datasets)",
  )
  build.add_argument("--builders", help="the folder of builders (default ./datasets)")
  build.add_argument(
    "--beam-runner",
    help="make the examples with Apache Beam on this runner (DirectRunner, DataflowRunner, "
    "FlinkRunner, SparkRunner; needs the beam extra); mimlv2 supports it",
  )
  build.add_argument(
    "--beam-options", default="", help="the runner's pipeline flags, as one quoted string"
  )
  show = data_commands.add_parser(
    "show",
    help="contact sheet of a data source",
    description="Writes a PNG of examples of any data source (or mixture): each as stored, "
    "its mask outlined, next to the crop training sees (tampered red, ignored grey). An "
    "Object Jitter example (coco:PATH) shows the host crop before jitter, the forgery after "
    "it with its mask outlined, and the training crop. With --json: the shown ids, in row "
    "order.",
  )
  show.add_argument("source", help="a data source string: tfds:NAME/CONFIG, folder:PATH, ...")
  show.add_argument("--out", required=True, help="the PNG to write")
  show.add_argument("--num", type=int, default=12, help="examples to show (default 12)")
  show.add_argument("--split", default="train", help="train or validation (default train)")
  show.add_argument(
    "--config",
    default=os.path.join("experiments", "quickstart.py"),
    help="the config whose augmentations to show (default the quickstart's)",
  )
  show.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  for sub in (build, show):
    sub.add_argument("--json", action="store_true", help="print the result as JSON")

  dm = add(
    "demo",
    "a local web page: upload an image, see each model's heatmap and mask",
    "Loads every --model (and --init) once, then serves a page at http://HOST:PORT where "
    "you\nupload an image and see, per model side by side: heatmap, overlay, binary "
    "mask at a\nthreshold slider (re-thresholds without re-running the model), a PNG "
    "download of the mask,\nand the image-level score of models with an image head. "
    'Needs the demo extra:\npip install "miml-jax[demo]". A model that fails to '
    "load stops it before serving.",
  )
  dm.add_argument(
    "--model",
    action="append",
    metavar="NAME=PATH",
    help="a model to show: NAME on the page, PATH a training workdir, W/best or "
    "W/checkpoints/STEP (repeat for several)",
  )
  dm.add_argument(
    "--init",
    metavar="[NAME=]FILE",
    help="also show the model of an init file of `miml-jax convert` (needs --config)",
  )
  dm.add_argument("--config", help="with --init: experiments/NAME.py[:arg] of its model")
  dm.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
  dm.add_argument(
    "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)"
  )
  dm.add_argument(
    "--max-pixels",
    type=int,
    default=4096 * 4096,
    help="refuse uploads with more pixels (default 4096*4096)",
  )
  dm.add_argument("--threshold", type=float, default=0.5, help="initial threshold (default 0.5)")
  dm.add_argument(
    "--resize",
    choices=("none", "miml"),
    default="none",
    help="test-time resize rule, as for predict (default none)",
  )

  cv = add(
    "convert",
    "official weights -> a miml-jax init file",
    "Reads a PyTorch .pth/.pt/.bin (needs torch), .safetensors or .npz state_dict, maps "
    "every\ntensor onto the model's flax tree (torch key names, with DDP 'module.' and "
    "mmseg\n'backbone.' / 'decode_head.' prefixes aligned automatically) and writes an "
    "init file\n(msgpack: weights, model config, provenance) for train / eval / predict "
    "--init.\nKeras HDF5 weights (.h5 / .hdf5 / .hd5: ManTraNet, BusterNet) are read "
    "with h5py\nby their original layer names. Strict by default: unmapped, missing or "
    "mis-shaped\ntensors are an error listing them.",
  )
  cv.add_argument("source", help="the weights file")
  cv.add_argument("--out", required=True, help="the init file to write (.msgpack)")
  cv.add_argument("--config", help="experiments/NAME.py[:arg] whose model section is the target")
  cv.add_argument(
    "--model",
    help="instead of --config: this model (a name of models.MODELS: apsc_net, "
    "pair_classifier, dass, sacm, mantranet, busternet, ...) with its default (official) settings",
  )
  cv.add_argument(
    "--partial",
    action="store_true",
    help="convert what matches, report the rest (e.g. an ImageNet backbone "
    "into a segmentor); the result can only initialise training",
  )
  cv.add_argument("--overwrite", action="store_true", help="replace an existing --out")

  be = add(
    "bench",
    "train-step and inference throughput, PyTorch side by side",
    "Times the train step (forward + backward + AdamW) and inference of ConvNeXt-T / -B +\n"
    "UPerNet and APSC-Net on random inputs, jitted, next to PyTorch eager and torch.compile\n"
    "of the reference modules (miml_jax/torch_reference.py; needs the bench extra), interleaved\n"
    "rep by rep; warm-up excluded, median and spread, XLA FLOPs, ratios, each side's share of\n"
    "the machine's measured matmul ceiling. Prints a table;\n"
    "--out writes the JSON (machine, versions, load). Presets: full (default), --quick\n"
    "(small sizes, float32, a few minutes), --tiny (toy models, seconds).",
  )
  be.add_argument("--quick", action="store_true", help="small sizes, float32, 3 reps")
  be.add_argument("--tiny", action="store_true", help="toy models at 32 px (checks it runs)")
  be.add_argument("--models", help="comma-separated (default: the preset's); see miml_jax/bench.py")
  be.add_argument("--sizes", help="standard, small or pixels, comma-separated")
  be.add_argument("--dtypes", help="float32, bfloat16")
  be.add_argument("--modes", help="train, infer")
  be.add_argument("--torch", help="eager, compile, or none (default eager,compile)")
  be.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads (default 2)")
  be.add_argument("--reps", type=int, help="timed repetitions per contender")
  be.add_argument("--qes-masks", type=int, help="512 px masks in the QES timing (0: skip)")
  be.add_argument(
    "--ceiling-size",
    type=int,
    help="side of the square matmul that measures the machine's FLOP/s ceiling (0: skip)",
  )
  be.add_argument("--out", help="write the results as JSON here")
  return parser


def _enable_compilation_cache():
  """Persist compiled XLA programs across runs (a second `train` / `eval` starts in seconds).

  MIML_JAX_COMPILATION_CACHE names the directory (default ~/.cache/miml_jax/xla); set it to
  the empty string to disable.
  """
  directory = os.environ.get(
    "MIML_JAX_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "miml_jax", "xla")
  )
  if directory:
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


COMMANDS = {
  "train": cmd_train,
  "eval": cmd_eval,
  "predict": cmd_predict,
  "qes": cmd_qes,
  "annotate": cmd_annotate,
  "data": cmd_data,
  "convert": cmd_convert,
  "demo": cmd_demo,
  "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  args.argv = argv  # What report.md records as the command (None: sys.argv).
  overrides = _split_overrides(extra, parser)
  # grain 0.2.x multiprocess workers read absl flags; mark them parsed (docs/stack.md).
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  _enable_compilation_cache()
  try:
    # Before the first jax computation: XLA:CPU's per-step buffers then reuse host pages.
    host_memory.keep_freed_memory()
    if getattr(args, "multihost", False) or getattr(args, "coordinator", None):
      from miml_jax import sharding

      sharding.initialize_multihost(args.coordinator, args.num_processes, args.process_id)
    COMMANDS[args.command](args, overrides)
  except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NON_FINITE
  return 0


if __name__ == "__main__":
  sys.exit(main())
