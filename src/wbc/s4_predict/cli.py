"""`predict`: fill in missing per-fold predictions, then merge folds into run-level files; `classify`."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from ..core.cli import add_config_args, config_from_args

    p = add_config_args(sub.add_parser("predict", help="per-fold OOF/eval/test predictions, merged over folds"))
    p.add_argument("--force", action="store_true", help="re-predict folds that already have predictions")

    def run(args):
        from ..core.config import dump_config
        from ..core.errors import WBCError
        from ..core.io import write_text
        from ..core.run_folder import claim, fold_dirs, fold_index, run_dir
        from ..s2_folds.folds import dataset_record
        from ..s3_train.inputs import load_fold_data
        from .fold import checkpoint_run, fold_weights, predict_fold, predictions_current
        from .merge import merge_run

        cfg = config_from_args(args)
        run, source, weights = run_dir(cfg), checkpoint_run(cfg), fold_weights(cfg)
        if source != run and not any((d / weights).exists() for d in fold_dirs(source)):
            raise WBCError(f"predict.checkpoints: {source} has no fold*/{weights}")  # before any folder is made
        claim(run, dataset_record(cfg))  # the run's folds were trained on this dataset, or refuse
        if source != run:  # a prediction-only run (e.g. BN-adapted) of another run's fold models
            write_text(run / "config.yaml", dump_config(cfg))
        data = None
        for d in fold_dirs(source):
            if (d / weights).exists() and (args.force or not predictions_current(cfg, run / d.name)):
                data = data or load_fold_data(cfg)
                predict_fold(cfg, fold_index(d), data)
        from ..s2_folds.folds import load_folds

        merge_run(run, expected_ids=load_folds(cfg)["ID"])

    p.set_defaults(func=run)

    p = add_config_args(sub.add_parser("classify", help="a run's fold models on image files or folders (outside "
                                                         "the dataset layout): ID, prediction, probabilities"))
    p.add_argument("--images", action="append", required=True,
                   help="an image file or a folder (searched recursively); repeat for more")
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default outputs/<name>/classified.csv)")

    def run_classify(args):
        from .classify import classify

        classify(config_from_args(args), args.images, args.out)

    p.set_defaults(func=run_classify)
