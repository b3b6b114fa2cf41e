"""``blendsign <stage>``: the command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from blendsign import __version__

if TYPE_CHECKING:
    from blendsign.config import Config

Command = Callable[[argparse.Namespace], int]


def _config(args: argparse.Namespace) -> Config:
    from blendsign.config import load_preset

    return load_preset(args.config)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="paper", help="preset: paper, demo or ci (default paper)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return common


def _stage(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A stage's sub-parser, with the common options (--config, -v, --no-progress)."""
    return sub.add_parser(name, help=help, description=help, parents=[_common()])


# --- synth -------------------------------------------------------------------------------------------


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "synth", help="write the embedded synthetic head-CT cohort (DICOM + annotations)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--scans", type=int, default=None, help="usable scans to generate (preset default)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same files)")
    p.add_argument("--size", type=int, default=None, help="rows = columns of each slice (default 512)")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from blendsign.synth import synthesize

    cfg = _config(args).synth
    changes = {k: v for k, v in {"scans": args.scans, "seed": args.seed, "size": args.size}.items() if v is not None}
    result = synthesize(args.out, replace(cfg, **changes), progress=args.progress)
    print(result.summary())
    return 0


# --- ingest ------------------------------------------------------------------------------------------


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "ingest", help="DICOM folder → de-identified Parquet slice dataset + flow report")
    p.add_argument("source", type=Path, help="folder of DICOM files (searched recursively)")
    p.add_argument("out", type=Path, help="output folder (slices/, ingest_report.json)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    p.add_argument("--clinical", type=Path, default=None,
                   help="CSV study_instance_uid,postoperative (default: clinical.csv in or beside SOURCE)")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from blendsign.ingest import ingest

    cfg = _config(args).ingest
    if args.workers is not None:
        cfg = replace(cfg, workers=args.workers)
    result = ingest(args.source, args.out, cfg, clinical_csv=args.clinical, progress=args.progress)
    print(result.summary())
    return 0


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


def _add_fuse(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "fuse", help="readers' annotations + ingest → gold labels, fused boxes, Fleiss' κ")
    p.add_argument("annotations", type=Path, help="native annotation CSV (one row per reader, slice, box)")
    p.add_argument("ingest_dir", type=Path, help="output folder of `blendsign ingest`")
    p.add_argument("out", type=Path, help="output folder (labels.parquet, agreement.json, agreement.md)")
    p.add_argument("--box-match-iou", type=float, default=None, help="IoU for readers' boxes to match (0.5)")
    p.set_defaults(func=_run_fuse)


def _run_fuse(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from blendsign.labels import fuse

    cfg = _config(args).labels
    if args.box_match_iou is not None:
        cfg = replace(cfg, box_match_iou=args.box_match_iou)
    print(fuse(args.annotations, args.ingest_dir, args.out, cfg).summary())
    return 0


def _add_folds(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "folds", help="patient-level stratified cross-validation folds")
    p.add_argument("labels_dir", type=Path, help="output folder of `blendsign fuse` (labels.parquet)")
    p.add_argument("out", type=Path, help="output folder (folds.parquet, folds.json, folds.md)")
    p.add_argument("--k", type=int, default=None, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same folds)")
    p.set_defaults(func=_run_folds)


def _run_folds(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from blendsign.folds import make_folds

    cfg = _config(args).folds
    changes = {k: v for k, v in {"k": args.k, "seed": args.seed}.items() if v is not None}
    print(make_folds(args.labels_dir, args.out, replace(cfg, **changes)).summary())
    return 0


# --- entry point -------------------------------------------------------------------------------------

# --- train -------------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "train", "train the teacher network on one cross-validation fold (or --fold all)")
    p.add_argument("--ingest", type=Path, required=True, help="ingest output folder (slices/)")
    p.add_argument("--labels", type=Path, required=True, help="fuse output folder (labels.parquet)")
    p.add_argument("--folds", type=Path, default=None, help="folds output folder (folds.parquet)")
    p.add_argument("--fold", default="0", help="held-out fold for validation, or 'all' to train on everything")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="train at most N epochs in this call")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's)")
    p.add_argument("--backbone", default=None, help="resnet50, resnet18, vgg16 or inception_v3")
    p.add_argument("--weights", default=None, help="imagenet, none, or a state-dict file")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--experiment", default="blendsign", help="MLflow experiment")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from blendsign.config import override
    from blendsign.tracking import Tracker
    from blendsign.train import train

    cfg = _config(args)
    model = {k: v for k, v in {"backbone": args.backbone, "weights": args.weights}.items() if v is not None}
    training = {k: v for k, v in {"device": args.device, "epochs": args.epochs}.items() if v is not None}
    cfg = override(cfg, model=model, train=training)
    fold = None if args.fold == "all" else int(args.fold)
    if fold is not None and args.folds is None:
        raise ValueError("--folds is required unless --fold all")
    tracker = Tracker.open(args.experiment) if args.mlflow else None
    result = train(cfg, ingest_dir=args.ingest, labels_dir=args.labels, folds_dir=args.folds, fold=fold,
                   out_dir=args.out, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                   tracker=tracker, progress=args.progress)
    print(result.summary())
    return 0


# --- distill, evaluate, cv, ablation -----------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ingest", type=Path, required=True, help="ingest output folder (slices/)")
    p.add_argument("--labels", type=Path, required=True, help="fuse output folder (labels.parquet)")
    p.add_argument("--folds", type=Path, required=True, help="folds output folder (folds.parquet)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--experiment", default="blendsign", help="MLflow experiment")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's)")


def _setup(args: argparse.Namespace, **sections: dict[str, object]) -> tuple[Config, object]:
    from blendsign.config import override
    from blendsign.tracking import Tracker

    cfg = _config(args)
    train = {"device": args.device} if args.device else {}
    cfg = override(cfg, train={**train, **sections.pop("train", {})}, **sections)
    return cfg, (Tracker.open(args.experiment) if args.mlflow else None)


def _dirs(args: argparse.Namespace) -> dict[str, Path]:
    return {"ingest_dir": args.ingest, "labels_dir": args.labels, "folds_dir": args.folds}


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "distill", "teacher + repeated self-knowledge distillation on one fold")
    _data_args(p)
    p.add_argument("--fold", required=True, help="held-out fold, or 'all' (refit on everything)")
    p.add_argument("--rounds", type=int, default=None, help="student rounds (default: the config's, 2)")
    p.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from blendsign.distill import distill

    cfg, tracker = _setup(args)
    fold = None if args.fold == "all" else int(args.fold)
    result = distill(cfg, **_dirs(args), fold=fold, out_dir=args.out, rounds=args.rounds, tracker=tracker,
                     progress=args.progress)
    print(result.summary())
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "evaluate", "evaluate each fold's final model on its held-out fold: metrics, CIs, figures")
    _data_args(p)
    p.add_argument("--models", type=Path, required=True, help="folder holding fold<k>/ distillation outputs")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
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
    from blendsign.cv import cross_validate

    cfg, tracker = _setup(args, **({"distill": {"rounds": args.rounds}} if args.rounds is not None else {}))
    print(cross_validate(cfg, **_dirs(args), out_dir=args.out, tracker=tracker, progress=args.progress).summary())
    return 0


def _add_ablation(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "ablation", "the paper's ablation: WCE, WCE + AT, WCE + AT + SKD over the same folds")
    _data_args(p)
    p.add_argument("--label-noise", type=float, default=None,
                   help="share of training blend-sign slices relabelled normal ICH (default 0)")
    p.set_defaults(func=_run_ablation)


def _run_ablation(args: argparse.Namespace) -> int:
    from blendsign.cv import ablation

    noise = {"train": {"label_noise": args.label_noise}} if args.label_noise is not None else {}
    cfg, tracker = _setup(args, **noise)
    print(ablation(cfg, **_dirs(args), out_dir=args.out, tracker=tracker, progress=args.progress).summary())
    return 0


# --- run: the whole job on this machine --------------------------------------------------------------


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = _stage(sub, "run", "the whole job on this machine: ingest → fuse → folds → CV (teacher + distillation) → "
                           "evaluate → register (the embedded synthetic cohort unless --source)")
    p.add_argument("--work", type=Path, default=Path("data/run"), help="work folder (default data/run)")
    p.add_argument("--source", type=Path, default=None, help="DICOM folder (default: synthesise the cohort)")
    p.add_argument("--annotations", type=Path, default=None, help="native annotation CSV (with --source)")
    p.add_argument("--clinical", type=Path, default=None, help="clinical.csv (postoperative list)")
    p.add_argument("--register", dest="register_mode", default="refit", choices=["refit", "fold-ensemble"],
                   help="what to register: a refit on all scans (default) or the K fold models averaged")
    p.add_argument("--model-name", default="blendsign", help="registered model name")
    p.add_argument("--metric", default="cv_auc_blend_sign", help="promotion metric (cv_<metric>_<class>)")
    p.add_argument("--margin", type=float, default=0.0, help="promotion margin over the champion")
    p.add_argument("--experiment", default="blendsign", help="MLflow experiment")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's)")
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from blendsign.pipeline import run_pipeline

    args.mlflow = True
    cfg, tracker = _setup(args)
    result = run_pipeline(cfg, work_dir=args.work, source=args.source, annotations=args.annotations,
                          clinical=args.clinical, tracker=tracker, register_mode=args.register_mode,
                          model_name=args.model_name, metric=args.metric, margin=args.margin,
                          progress=args.progress)
    print(result.summary())
    return 0


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth, _add_ingest, _add_import_annotations, _add_fuse, _add_folds, _add_train,
    _add_distill, _add_evaluate, _add_cv, _add_ablation, _add_run,
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
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        logging.getLogger("blendsign").error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
