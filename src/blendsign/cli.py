"""``blendsign <stage>``: the command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from blendsign import __version__
from blendsign.errors import BlendsignError, ConfigError, InputError

if TYPE_CHECKING:
    from blendsign.config import Config
    from blendsign.tracking import Tracker

Command = Callable[[argparse.Namespace], int]

ALIASES: dict[str, str] = {
    "scans": "synth.scans", "synth_seed": "synth.seed", "size": "synth.size", "workers": "ingest.workers",
    "box_match_iou": "labels.box_match_iou", "k": "folds.k", "folds_seed": "folds.seed",
    "backbone": "model.backbone", "weights": "model.weights", "epochs": "train.epochs", "device": "train.device",
    "label_noise": "train.label_noise", "rounds": "distill.rounds", "experiment": "tracking.experiment",
    "model_name": "registry.model_name", "metric": "registry.promotion_metric", "margin": "registry.promotion_margin",
    "register_mode": "registry.mode",
}
"""Today's flags, each an alias of one ``--set section.field=value``: argparse dest → config field."""


def _config(args: argparse.Namespace) -> Config:
    """``--config`` with the flags' and ``--set``'s overrides (:func:`blendsign.config.override_dotted`)."""
    from blendsign.config import load_preset, override_dotted

    return override_dotted(load_preset(args.config), _overrides(args))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``section.field`` → value: the flags of :data:`ALIASES` that were given, then ``--set``; a key given twice
    is an error."""
    out = {key: getattr(args, dest) for dest, key in ALIASES.items() if getattr(args, dest, None) is not None}
    for item in getattr(args, "sets", None) or ():
        key, value = _parsed_set(item)
        if key in out:
            raise ConfigError(f"--set {key}: given twice (by --set or by its flag)")
        out[key] = value
    return out


def _parsed_set(item: str) -> tuple[str, Any]:
    """``section.field=value``, the value read as TOML (``3``, ``0.5``, ``true``, ``[1, 2]``), else as the string."""
    import tomllib

    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {item}: expected section.field=value")
    try:
        return key.strip(), tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), text


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="paper",
                        help="preset (paper, demo or ci; default paper) or a site .toml file (configs/)")
    common.add_argument("--set", dest="sets", action="append", metavar="SECTION.FIELD=VALUE",
                        help="override one config field (repeatable); VALUE is read as TOML (3, 0.5, true, [1, 2], "
                             '"x"), else taken as a string: train.epochs=3, train.device=cpu')
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    common.add_argument("--cache-dir", type=Path, default=None,
                        help="keep S3 inputs mirrored in this folder between runs, so unchanged objects are not "
                             "downloaded again (default: $BLENDSIGN_CACHE, else a temporary folder removed after "
                             "the run: nothing of the source stays on this machine)")
    return common


def _cache(args: argparse.Namespace) -> Path | None:
    from blendsign.storage import default_cache

    return getattr(args, "cache_dir", None) or default_cache()


def _fold(text: str) -> int | None:
    """``--fold``: a fold number, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fold number or 'all', not {text!r}") from None


def _stage(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A stage's sub-parser, with the common options (--config, -v, --no-progress)."""
    return sub.add_parser(name, help=help, description=help, parents=[_common()])


# --- synth -------------------------------------------------------------------------------------------


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "synth", help="write the embedded synthetic head-CT cohort (DICOM + annotations)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--scans", type=int, default=None, help="usable scans to generate (preset default)")
    p.add_argument("--seed", dest="synth_seed", type=int, default=None, help="random seed (same seed, same files)")
    p.add_argument("--size", type=int, default=None,
                   help="rows = columns of each slice (default: the preset's, 512 in paper)")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from blendsign.synth import synthesize

    result = synthesize(args.out, _config(args).synth, progress=args.progress)
    print(result.summary())
    return 0


# --- ingest ------------------------------------------------------------------------------------------


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "ingest", help="DICOM folder → de-identified Parquet slice dataset + flow report")
    p.add_argument("source", help="folder or s3:// prefix of DICOM files (searched recursively)")
    p.add_argument("out", help="output folder or s3:// prefix (slices/, ingest_report.json)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the preset's)")
    p.add_argument("--clinical", default=None,
                   help="CSV study_instance_uid,postoperative (default: clinical.csv in or beside SOURCE)")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> int:
    from blendsign.remote import ingest_uri

    result = ingest_uri(args.source, args.out, _config(args).ingest, clinical_csv=args.clinical, progress=args.progress,
                        cache=_cache(args))
    print(result.summary())
    return 0


def _add_locate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("locate", help="the quarantined and duplicate files of an ingest, by path",
                       description="Reports and logs name files by keyed pseudonyms (file-<hash>), as export file "
                       "names are often UIDs. For whoever holds SOURCE, print each quarantined or duplicate file's "
                       "path, reason and pseudonym (tab-separated), using the ingest's key.", parents=[_common()])
    p.add_argument("source", help="the DICOM folder that was ingested")
    p.add_argument("out", help="the ingest output folder (holds ingest_report.json)")
    p.add_argument("--slices", nargs="+", metavar="KEY_OR_CSV", default=None,
                   help="instead: the source files of these slices, by instance_key, or every instance_key of "
                   "a CSV (a distillation round's review.csv, say)")
    p.set_defaults(func=_run_locate)


def _run_locate(args: argparse.Namespace) -> int:
    from blendsign.ingest import locate, locate_slices

    if args.slices:
        keys = [k for item in args.slices for k in _instance_keys(item)]
        for key, path in locate_slices(args.source, args.out, keys).items():
            print(f"{key}\t{_printable(path) if path else '(not under SOURCE)'}")
        return 0
    rows = locate(args.source, args.out)
    for r in rows:
        print(f"{_printable(r['file'])}\t{_printable(r['reason'])}\t{r['pseudonym']}")
    if not rows:
        print("nothing was quarantined or duplicated")
    return 0


def _printable(text: str) -> str:
    """``text`` with control characters escaped (a tab or newline in a file name would break the columns)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _instance_keys(item: str) -> list[str]:
    """A key, or the ``instance_key`` column of a CSV file."""
    import csv

    if not item.endswith(".csv"):
        return [item]
    with Path(item).open(newline="") as f:
        reader = csv.DictReader(f)
        if "instance_key" not in (reader.fieldnames or []):
            raise InputError(f"{item} has no instance_key column")
        return [row["instance_key"] for row in reader]


# --- import-annotations / fuse / folds ---------------------------------------------------------------


def _add_import_annotations(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "import-annotations", help="convert RSNA ICH or BHX labels to the native annotation CSV")
    p.add_argument("--format", dest="fmt", required=True, choices=["rsna", "bhx"],
                   help="rsna: stage_2_train.csv (ID,Label); bhx: bounding-box CSV")
    p.add_argument("src", type=Path, help="the dataset's label CSV")
    p.add_argument("out_csv", type=Path, help="native annotation CSV to write")
    p.set_defaults(func=_run_import_annotations)


def _run_import_annotations(args: argparse.Namespace) -> int:
    from blendsign.labels import import_annotations

    print(import_annotations(args.fmt, args.src, args.out_csv).summary())
    return 0


def _add_import_nifti(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "import-nifti", help="NIfTI volumes (+ masks) of a public hemorrhage set → DICOM series and "
                                         "the masks' boxes as a native annotation CSV")
    p.add_argument("volumes", type=Path, help="folder of the volumes in HU (.nii, .nii.gz)")
    p.add_argument("out_dicom", type=Path, help="folder to write a DICOM series per volume into (then: ingest it)")
    p.add_argument("--masks", type=Path, default=None, help="folder of the masks, named as their volumes")
    p.add_argument("--annotations", type=Path, default=None, help="annotation CSV to write (with --masks)")
    p.add_argument("--dataset", default="nifti", help="the set's name: the reader and the PatientID prefix")
    p.set_defaults(func=_run_import_nifti)


def _run_import_nifti(args: argparse.Namespace) -> int:
    from blendsign.nifti import import_nifti

    result = import_nifti(args.volumes, args.out_dicom, masks=args.masks, annotations_out=args.annotations,
                          dataset=args.dataset, progress=args.progress)
    print(result.summary())
    return 0 if result.scans else 2


def _add_fuse(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "fuse", help="readers' annotations + ingest → gold labels, fused boxes, Fleiss' κ")
    p.add_argument("annotations", help="native annotation CSV (one row per reader, slice, box); path or s3://")
    p.add_argument("ingest_dir", help="output of `blendsign ingest` (folder or s3:// prefix)")
    p.add_argument("out", help="output folder or s3:// prefix (labels.parquet, agreement.json, agreement.md)")
    p.add_argument("--box-match-iou", type=float, default=None, help="IoU for readers' boxes to match (0.5)")
    p.set_defaults(func=_run_fuse)


def _run_fuse(args: argparse.Namespace) -> int:
    from blendsign.remote import fuse_uri

    print(fuse_uri(args.annotations, args.ingest_dir, args.out, _config(args).labels, cache=_cache(args)).summary())
    return 0


def _add_folds(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "folds", help="patient-level stratified cross-validation folds")
    p.add_argument("labels_dir", help="output of `blendsign fuse` (folder or s3:// prefix)")
    p.add_argument("out", help="output folder or s3:// prefix (folds.parquet, folds.json, folds.md)")
    p.add_argument("--k", type=int, default=None, help="number of folds (default: the preset's, 5 in paper)")
    p.add_argument("--seed", dest="folds_seed", type=int, default=None,
                   help="random seed (same seed and pseudonym key, same folds: they follow the patient pseudonyms)")
    p.set_defaults(func=_run_folds)


def _run_folds(args: argparse.Namespace) -> int:
    from blendsign.remote import folds_uri

    print(folds_uri(args.labels_dir, args.out, _config(args).folds, cache=_cache(args)).summary())
    return 0


# --- entry point -------------------------------------------------------------------------------------

# --- train -------------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "train", "train the teacher network on one cross-validation fold (or --fold all)")
    p.add_argument("--ingest", required=True, help="ingest output folder (slices/)")
    p.add_argument("--labels", required=True, help="fuse output folder (labels.parquet)")
    p.add_argument("--folds", default=None, help="folds output folder (folds.parquet)")
    p.add_argument("--fold", type=_fold, default=0, help="held-out fold for validation (default 0), or 'all' to "
                   "train on everything")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="train at most N epochs in this call")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's)")
    p.add_argument("--backbone", default=None, help="resnet50, resnet18, vgg16 or inception_v3")
    p.add_argument("--weights", default=None, help="imagenet, none, or a state-dict file")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's, blendsign)")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        _staged(args, stack)
        return _run_train_staged(args)


def _run_train_staged(args: argparse.Namespace) -> int:
    from blendsign.tracking import Tracker
    from blendsign.train import train

    cfg = _config(args)
    fold = args.fold
    if fold is not None and args.folds is None:
        raise InputError("--folds is required unless --fold all")
    tracker = Tracker.open(cfg.tracking.experiment) if args.mlflow else None
    result = train(cfg, ingest_dir=args.ingest, labels_dir=args.labels, folds_dir=args.folds, fold=fold,
                   out_dir=args.out, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                   tracker=tracker, progress=args.progress)
    print(result.summary())
    return 0


# --- distill, evaluate, cv, ablation -----------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ingest", required=True, help="ingest output folder (slices/)")
    p.add_argument("--labels", required=True, help="fuse output folder (labels.parquet)")
    p.add_argument("--folds", required=True, help="folds output folder (folds.parquet)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's, blendsign)")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's)")


def _setup(args: argparse.Namespace) -> tuple[Config, Tracker | None]:
    from blendsign.tracking import Tracker

    cfg = _config(args)
    return cfg, (Tracker.open(cfg.tracking.experiment) if args.mlflow else None)


class _DataDirs(TypedDict):
    """The training stages' three input folders, passed as keywords."""

    ingest_dir: Path
    labels_dir: Path
    folds_dir: Path


def _dirs(args: argparse.Namespace) -> _DataDirs:
    return {"ingest_dir": args.ingest, "labels_dir": args.labels, "folds_dir": args.folds}


def _staged(args: argparse.Namespace, stack: ExitStack) -> None:
    """Replace s3:// inputs by local mirrors and ``--out`` by a staging folder published on success."""
    from blendsign.storage import local_input, local_output

    for name in ("ingest", "labels", "folds", "models"):
        if getattr(args, name, None) is not None:
            setattr(args, name, stack.enter_context(local_input(getattr(args, name), require_marker=True,
                                                                cache=_cache(args), progress=args.progress)))
    args.out = stack.enter_context(local_output(args.out, prefetch=True))


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "distill", "teacher + repeated self-knowledge distillation on one fold")
    _data_args(p)
    p.add_argument("--fold", type=_fold, required=True, help="held-out fold, or 'all' (refit on everything)")
    p.add_argument("--rounds", type=int, default=None, help="student rounds (default: the preset's, 2 in paper)")
    p.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        _staged(args, stack)
        return _run_distill_staged(args)


def _run_distill_staged(args: argparse.Namespace) -> int:
    from blendsign.distill import distill

    cfg, tracker = _setup(args)
    fold = args.fold
    result = distill(cfg, **_dirs(args), fold=fold, out_dir=args.out, tracker=tracker, progress=args.progress)
    print(result.summary())
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "evaluate", "evaluate each fold's final model on its held-out fold: metrics, CIs, figures")
    _data_args(p)
    p.add_argument("--models", required=True, help="folder holding fold<k>/ distillation outputs")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        _staged(args, stack)
        return _run_evaluate_staged(args)


def _run_evaluate_staged(args: argparse.Namespace) -> int:
    from blendsign.evaluate import evaluate

    cfg, tracker = _setup(args)
    run_id = None
    if tracker is not None:
        with tracker.run("evaluate", tags={"stage": "evaluate", "preset": cfg.preset}) as run:
            run_id = run.run_id
    result = evaluate(cfg, **_dirs(args), models_dir=args.models, out_dir=args.out, tracker=tracker,
                      run_id=run_id, progress=args.progress)
    print(result.summary())
    return 0


def _add_cv(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "cv", "K-fold cross-validation of the whole method: every fold distilled, then evaluated")
    _data_args(p)
    p.add_argument("--rounds", type=int, default=None, help="student rounds (default: the config's)")
    p.set_defaults(func=_run_cv)


def _run_cv(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        _staged(args, stack)
        return _run_cv_staged(args)


def _run_cv_staged(args: argparse.Namespace) -> int:
    from blendsign.cv import cross_validate

    cfg, tracker = _setup(args)
    print(cross_validate(cfg, **_dirs(args), out_dir=args.out, tracker=tracker, progress=args.progress).summary())
    return 0


def _add_ablation(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "ablation", "the paper's ablation: WCE, WCE + AT, WCE + AT + SKD over the same folds")
    _data_args(p)
    p.add_argument("--label-noise", type=float, default=None,
                   help="share of training blend-sign slices relabelled normal ICH (default 0)")
    p.set_defaults(func=_run_ablation)


def _run_ablation(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        _staged(args, stack)
        return _run_ablation_staged(args)


def _run_ablation_staged(args: argparse.Namespace) -> int:
    from blendsign.cv import ablation

    cfg, tracker = _setup(args)
    print(ablation(cfg, **_dirs(args), out_dir=args.out, tracker=tracker, progress=args.progress).summary())
    return 0


# --- run: the whole job on this machine --------------------------------------------------------------


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "run", "the whole job on this machine: ingest → fuse → folds → CV (teacher + distillation) → "
                           "evaluate → register (the embedded synthetic cohort unless --source)")
    p.add_argument("--work", type=Path, default=Path("data/run"), help="work folder (default data/run)")
    p.add_argument("--source", type=Path, default=None, help="DICOM folder (default: synthesise the cohort)")
    p.add_argument("--annotations", type=Path, default=None, help="native annotation CSV (with --source)")
    p.add_argument("--clinical", default=None, help="clinical.csv (postoperative list)")
    _run_settings(p)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's)")
    p.add_argument("--only-if-new-data", action="store_true",
                   help="end early, training nothing, when the registered model already holds this dataset")
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from blendsign.pipeline import run_pipeline

    args.mlflow = True
    cfg, tracker = _setup(args)
    assert tracker is not None  # (args.mlflow)
    result = run_pipeline(cfg, work_dir=args.work, source=args.source, annotations=args.annotations,
                          clinical=args.clinical, tracker=tracker, only_if_new_data=args.only_if_new_data,
                          progress=args.progress)
    print(result.summary())
    return 0


def _run_settings(p: argparse.ArgumentParser) -> None:
    """The flags of the run settings (``registry``, ``tracking``; aliases of ``--set``)."""
    from blendsign.config import REGISTER_MODES

    p.add_argument("--register", dest="register_mode", default=None, choices=REGISTER_MODES,
                   help="what to register: a refit on all scans (default) or the K fold models averaged")
    p.add_argument("--model-name", default=None, help="registered model name (default: the config's, blendsign)")
    p.add_argument("--metric", default=None, help="promotion metric, cv_<metric>_<class> (default: the config's, "
                   "cv_auc_blend_sign)")
    p.add_argument("--margin", type=float, default=None, help="promotion margin over the champion (default: the "
                   "config's, 0)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's, blendsign)")


# --- pipeline: the Kubeflow pipeline (compile, run --local, submit, schedule) ---------------------------


def _pipeline_params(p: argparse.ArgumentParser, *, local: bool) -> None:
    src = "local path" if local else "s3:// URI or a path inside the image"
    p.add_argument("--source", default=None, required=not local,
                   help=f"DICOM {src}" + (" (default: synthesise the cohort)" if local else ""))
    p.add_argument("--annotations", default=None, required=not local, help=f"native annotation CSV ({src})")
    p.add_argument("--clinical", default=None, help=f"clinical.csv ({src}; postoperative list; default: found in or "
                   "beside the source)")
    p.add_argument("--k", type=int, default=None, help="folds (default: the preset's)")
    p.add_argument("--rounds", type=int, default=None, help="distillation rounds (default: the preset's)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI"
                   + (", else .blendsign/mlflow.db)" if local else " in the pods, from the credentials secret)"))
    _run_settings(p)


def _pipeline_cluster(p: argparse.ArgumentParser, *, compile_only: bool) -> None:
    p.add_argument("--profile", type=Path, default=None, help="cluster profile TOML: resources, node selectors, "
                   "tolerations, timeouts, retries, images per task class (configs/cluster-profile-example.toml)")
    p.add_argument("--backend", choices=["current", "compat"], default="current" if compile_only else None,
                   help="pipeline variant: current (Kubeflow Pipelines backend 2.16+) or compat (2.5+, Kubeflow "
                   "1.10)" + ("" if compile_only else "; default: chosen from the server's version"))
    p.add_argument("--gpu-type", default=None, help="accelerator resource of the GPU tasks (overrides the profile)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per GPU task (overrides the profile; 0: CPU only)")


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    help_ = "the Kubeflow pipeline: compile it, run it here (kfp.local), submit or schedule it on a cluster"
    p = sub.add_parser("pipeline", help=help_, description=help_)
    actions = p.add_subparsers(dest="action", required=True, metavar="<action>")
    c = actions.add_parser("compile", help="write the pipeline spec (YAML) for a cluster", parents=[_common()],
                           description="Write the pipeline spec (YAML) to upload in the Kubeflow UI. --config is the "
                           "preset parameter's default and sizes the training tasks' /dev/shm.")
    c.add_argument("--output", type=Path, default=Path("blendsign_pipeline.yaml"),
                   help="the YAML to write (default ./blendsign_pipeline.yaml)")
    _pipeline_cluster(c, compile_only=True)
    r = actions.add_parser("run", help="run the whole pipeline on this machine (kfp.local)", parents=[_common()])
    r.add_argument("--local", action="store_true", required=True, help="run here with kfp.local (required)")
    r.add_argument("--work", type=Path, default=Path("data/pipeline"), help="work folder (default data/pipeline)")
    r.add_argument("--only-if-new-data", action="store_true", help="end early if the champion has this dataset")
    _pipeline_params(r, local=True)
    e = actions.add_parser("end-runs", help="end the MLflow runs a stopped pipeline run left RUNNING",
                           parents=[_common()], description="What the exit handler does, by hand: end every MLflow "
                           "run of pipeline run RUN_ID (the Kubeflow run id) still RUNNING, as FAILED (KILLED with "
                           "--cancelled). For a run whose exit handler did not run (terminated from the UI, say).")
    e.add_argument("run_id", help="the Kubeflow run id (or the pipeline_run_id tag of a blendsign run)")
    e.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    e.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's, blendsign)")
    e.add_argument("--cancelled", action="store_true", help="the run was cancelled: end them KILLED")
    for name, what in (("submit", "run the pipeline once on a Kubeflow Pipelines endpoint"),
                       ("schedule", "create a recurring run (scheduled retraining) on an endpoint")):
        q = actions.add_parser(name, help=what, description=what, parents=[_common()])
        q.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline:8888")
        q.add_argument("--namespace", default=None, help="Kubeflow namespace (multi-user installs)")
        q.add_argument("--kfp-experiment", default="blendsign", help="Kubeflow experiment")
        q.add_argument("--secret", default="blendsign-credentials", help="Kubernetes secret with the credentials")
        q.add_argument("--work", required=True, help="s3:// prefix for the run's checkpoints and exported models")
        _pipeline_params(q, local=False)
        _pipeline_cluster(q, compile_only=False)
        if name == "submit":
            q.add_argument("--run-name", default=None, help="run name (default: kfp's)")
            q.add_argument("--only-if-new-data", action="store_true", help="end early if nothing changed")
            q.add_argument("--no-cache", dest="cache", action="store_false", help="disable caching for this run")
        else:
            q.add_argument("--cron", required=True, help="cron expression, 5 fields or 6 (seconds first)")
            q.add_argument("--name", default="blendsign-retraining", help="recurring run name")
            q.add_argument("--always", action="store_true", help="retrain even when no new data arrived")
    p.set_defaults(func=_run_pipeline_command)


def _cluster_profile(args: argparse.Namespace) -> object:
    from blendsign.pipelines.profile import load_profile

    profile = load_profile(args.profile)
    if args.gpu_type is not None or args.gpus is not None:
        profile = profile.with_gpus(profile.train.gpus if args.gpus is None else args.gpus, args.gpu_type)
    return profile


def _pipeline_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """The config of a pipeline run and the overrides it was given, which must be fields the pipeline takes as
    parameters (``k``, ``rounds`` and ``RUN_SETTINGS``): its pods read every other field from the preset."""
    from blendsign.config import load_preset, override_dotted
    from blendsign.pipelines.blendsign_pipeline import RUN_SETTINGS

    overrides = _overrides(args)
    carried = set() if args.action == "compile" else {"folds.k", "distill.rounds", *RUN_SETTINGS.values()}
    extra = sorted(set(overrides) - carried)
    if extra:
        raise ConfigError(f"--set {extra[0]}: not a parameter of the pipeline {args.action}, whose pods read the "
                         "preset: set it in a site TOML (configs/) and pass that as --config")
    return override_dotted(load_preset(args.config), overrides), overrides


def _run_pipeline_command(args: argparse.Namespace) -> int:
    from blendsign.pipelines import launch
    from blendsign.pipelines.blendsign_pipeline import compile_pipeline, run_settings

    if args.action == "end-runs":
        from blendsign.run_tree import end_unfinished_runs
        from blendsign.tracking import tracking_uri

        ended = end_unfinished_runs(args.tracking_uri or tracking_uri(), _config(args).tracking.experiment,
                                    args.run_id, "CANCELED" if args.cancelled else None)
        print(f"ended {len(ended)} MLflow run(s) of pipeline run {args.run_id}" + (": " + ", ".join(ended)
                                                                                    if ended else ""))
        return 0
    cfg, overrides = _pipeline_config(args)
    if args.action == "compile":
        if args.config.endswith(".toml"):
            logging.getLogger("blendsign").warning("the preset parameter's default is the file %s: it must exist at "
                                                   "that path inside the image", args.config)
        print(compile_pipeline(args.output, _cluster_profile(args), args.backend, args.config))
        return 0
    k, rounds = overrides.get("folds.k"), overrides.get("distill.rounds")  # else the preset's, in the pods
    if args.action == "run":
        reg = cfg.registry
        result = launch.run_local(
            preset=args.config, work_dir=args.work, source=args.source, annotations=args.annotations,
            clinical=args.clinical, k=k, rounds=rounds, tracking_uri=args.tracking_uri,
            experiment=cfg.tracking.experiment, model_name=reg.model_name, metric=reg.promotion_metric,
            margin=reg.promotion_margin, register_mode=reg.mode, only_if_new_data=args.only_if_new_data,
            progress=args.progress)
        print(result.summary)
        return 0
    params = {"source_uri": args.source, "annotations_uri": args.annotations, "work_uri": args.work,
              "clinical_uri": args.clinical or "", "preset": args.config, **run_settings(cfg),
              "credentials_secret": args.secret,
              **{name: value for name, value in {"k": k, "rounds": rounds, "tracking_uri": args.tracking_uri}.items()
                 if value is not None}}
    common = {"kfp_experiment": args.kfp_experiment, "namespace": args.namespace, "profile": _cluster_profile(args),
              "backend": args.backend}
    if args.action == "submit":
        run_id = launch.submit(args.host, {**params, "only_if_new_data": args.only_if_new_data},
                               run_name=args.run_name, enable_caching=None if args.cache else False, **common)
        print(f"submitted run {run_id} to {args.host}")
    else:
        job_id = launch.schedule(args.host, args.cron, {**params, "only_if_new_data": not args.always},
                                 name=args.name, **common)
        print(f"scheduled recurring run {job_id} ({args.cron}) on {args.host}")
    return 0


# --- predict: the served model on files ----------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model URI (models:/…, runs:/…) or a model folder (default: the champion of the config's "
                        "registry.model_name, models:/blendsign@champion)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store that resolves models:/ and runs:/ URIs (default: $MLFLOW_TRACKING_URI, else "
                        "./.blendsign/mlflow.db when it exists)")
    p.add_argument("--device", dest="serve_device", default=None,
                   help="auto (CUDA when present), cpu, cuda, cuda:N (default: $BLENDSIGN_SERVE_DEVICE or auto)")


def _served(args: argparse.Namespace) -> tuple[str, str | None]:
    """The model to load (``--model``, default the champion of ``registry.model_name``) and the store that resolves
    it: none for a model folder; never a new, empty one."""
    from blendsign.tracking import existing_store

    model = args.model or f"models:/{_config(args).registry.model_name}@champion"
    if not model.startswith(("models:", "runs:")):  # a folder, s3://…: no store needed
        return model, args.tracking_uri
    return model, args.tracking_uri or existing_store(f"to resolve {model}")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "predict", "run a registered model on DICOM files or folders: per-slice and per-scan results")
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (searched recursively)")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--explain", action="store_true", help="also compute Grad-CAM (JSON output only)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from blendsign.predict import predict_paths

    model, store = _served(args)
    slices, scans = predict_paths(model, args.paths, params={"explain": args.explain}, tracking_uri=store,
                                  model_config={"device": args.serve_device} if args.serve_device else None)
    if args.json:
        _print_json({"slices": json.loads(slices.to_json(orient="records")),
                     "scans": json.loads(scans.to_json(orient="records"))})
        return 0
    shown = slices.drop(columns=[c for c in ("boxes", "gradcam_png") if c in slices.columns])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print(scans.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    flagged = int(scans["out_of_distribution"].sum())
    if flagged:
        print(f"\n{flagged} slice(s) lie outside what the model was trained on (out_of_distribution): their "
              "probabilities say little; see the model card for its training data", file=sys.stderr)
    return 0


def _add_triage(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "triage", "scan-level triage of an ingested set against scan-level reads (CQ500 reads.csv): "
                              "AUC, sensitivity, specificity beside the trivial baselines, readers' κ")
    p.add_argument("ingest_dir", type=Path, help="output of `blendsign ingest` of the scans (e.g. CQ500's DICOM)")
    p.add_argument("out", type=Path, help="output folder (triage.json, triage.md, triage_roc.png, scans.parquet)")
    p.add_argument("--reads", type=Path, required=True, help="CQ500's reads.csv (name, R1:ICH … R3:SAH)")
    p.add_argument("--threshold", type=float, default=0.5, help="flag a scan at score ≥ this (0.5)")
    _model_args(p)
    p.set_defaults(func=_run_triage)


def _run_triage(args: argparse.Namespace) -> int:
    from blendsign.model_package import load
    from blendsign.triage import triage

    uri, store = _served(args)
    model = load(uri, tracking_uri=store,
                 model_config={"device": args.serve_device} if args.serve_device else None).unwrap_python_model()
    result = triage(model, args.ingest_dir, args.reads, args.out, threshold=args.threshold, progress=args.progress)
    m = result["metrics"]
    print(f"triage of {m['scans']} scans ({m['positives']} with ICH): AUC {m['auc']:.3f} "
          f"(95% CI {m['auc_ci'][0]:.3f}–{m['auc_ci'][1]:.3f}); at score ≥ {args.threshold:g}: sensitivity "
          f"{m['at_threshold']['sensitivity']:.3f}, specificity {m['at_threshold']['specificity']:.3f}; "
          f"{len(result['join']['unmatched_rows'])} reads without an ingested scan → {args.out / 'triage.md'}")
    return 0


# --- serve: the model over HTTP ---------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "serve", "serve a model over HTTP (MLflow's scoring protocol, request limits, no request "
                             "content in errors, /health)")
    p.add_argument("model", nargs="?", default=None,
                   help="model URI or folder (KServe: /mnt/models; default: the champion of registry.model_name)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ and runs:/ URIs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", dest="serve_device", default=None,
                   help="auto, cpu, cuda, cuda:N (default: $BLENDSIGN_SERVE_DEVICE or auto)")
    p.add_argument("--max-rows", type=int, default=None, help="slices per request ($BLENDSIGN_MAX_ROWS, 256)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="request body limit in bytes ($BLENDSIGN_MAX_REQUEST_BYTES, 192 MiB)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per request ($BLENDSIGN_REQUEST_TIMEOUT, 300)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from blendsign.model_server import ServerSettings, serve

    settings = ServerSettings.from_env()
    settings = replace(settings, **{k: v for k, v in {"max_bytes": args.max_bytes, "timeout": args.timeout}.items()
                                    if v is not None})
    model_config = {k: v for k, v in {"device": args.serve_device, "max_rows": args.max_rows}.items()
                    if v is not None}
    model, store = _served(args)
    serve(model, host=args.host, port=args.port, settings=settings, model_config=model_config, tracking_uri=store)
    return 0


# --- registry: rollback, KServe deployment --------------------------------------------------------------


def _add_registry(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "registry", "the model registry: roll the champion back, deploy it on KServe")
    actions = p.add_subparsers(dest="action", required=True)
    for action, help_text in (("rollback", "move the champion alias back to the previous champion"),
                              ("deploy", "KServe manifests (ServingRuntime + InferenceService) for a registered "
                                         "alias: kubectl apply -f")):
        a = actions.add_parser(action, help=help_text, description=help_text, parents=[_common()])
        a.add_argument("--name", dest="model_name", default=None,
                       help="registered model (default: the config's registry.model_name, blendsign)")
        a.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI)")
        if action == "deploy":
            a.add_argument("--alias", default="champion")
            a.add_argument("--image", required=True, help="the blendsign image (docker/), by digest to pin it")
            a.add_argument("--namespace", default=None)
            a.add_argument("--gpus", type=int, default=1, help="GPUs of the predictor (0: CPU)")
            a.add_argument("--service-account", default=None,
                           help="service account whose secret lets KServe's storage initializer read the bucket")
            a.add_argument("--artifacts-destination", default=os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"),
                           help="the MLflow server's --artifacts-destination (s3://…), for mlflow-artifacts:/ URIs "
                                "(default: $MLFLOW_ARTIFACTS_DESTINATION)")
            a.add_argument("--output", type=Path, default=None, help="write here instead of printing")
    p.set_defaults(func=_run_registry)


def _run_registry(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from blendsign.tracking import existing_store

    name = _config(args).registry.model_name
    client = MlflowClient(tracking_uri=args.tracking_uri or existing_store(f"holding {name}"))
    if args.action == "rollback":
        from blendsign.registry import rollback

        back, demoted = rollback(client, name)
        print(f"{name}: champion is v{back} again (v{demoted} is previous-champion; rollback again to undo)")
        return 0
    from blendsign.deploy import render, storage_uri

    version, storage = storage_uri(client, name, args.alias, artifacts_destination=args.artifacts_destination)
    text = render(storage, image=args.image, name=name, namespace=args.namespace, gpus=args.gpus,
                  service_account=args.service_account, version=version)
    if args.output is None:
        print(text, end="")
    else:
        from blendsign.storage import write_text_atomic

        write_text_atomic(args.output, text)
        print(f"{name}@{args.alias} (v{version}, {storage}): {args.output}; kubectl apply -f {args.output}")
    return 0


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth, _add_ingest, _add_locate, _add_import_annotations, _add_import_nifti, _add_fuse, _add_folds, _add_train,
    _add_distill, _add_evaluate, _add_cv, _add_ablation, _add_run, _add_pipeline, _add_predict, _add_triage, _add_serve,
    _add_registry,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blendsign", description=__doc__)
    parser.add_argument("--version", action="version", version=f"blendsign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except Exception as exc:
        message = one_line(exc)
        if message is None:
            raise  # a bug: keep the traceback
        logging.getLogger("blendsign").error("%s", message)
        return 2


FILE_SYSTEM_ERRORS = (FileNotFoundError, NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError)


def one_line(exc: BaseException) -> str | None:
    """The one-line report of an error a person can act on (:mod:`blendsign.errors`, a missing or unwritable path,
    MLflow's and S3's errors), or None for anything else: a bug, which keeps its traceback."""
    if isinstance(exc, (BlendsignError, *FILE_SYSTEM_ERRORS)):
        return str(exc)
    # both only when already imported: the CLI starts without mlflow and boto3, and only they raise these
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException):
        from blendsign.tracking import tracking_uri

        return f"MLflow ({tracking_uri()}): {exc.message}"
    s3_errors = tuple(getattr(sys.modules.get(module), name) for module, name in S3_ERRORS if module in sys.modules)
    if isinstance(exc, s3_errors):
        return f"S3: {exc} ({type(exc).__name__})"
    return None


# the bases of what boto3 raises: a bad credential, a missing bucket, a refused upload, an unreachable endpoint
S3_ERRORS = (("botocore.exceptions", "BotoCoreError"), ("botocore.exceptions", "ClientError"),
             ("boto3.exceptions", "Boto3Error"))

if __name__ == "__main__":
    raise SystemExit(main())
