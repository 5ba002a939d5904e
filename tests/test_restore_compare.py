"""compare-restore: a run's own fold models, without vs with the restorer, on the sample eval split (CPU, tiny)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import write_folds
from wbc.__main__ import main
from wbc.core.config import CONFIG_DIR
from wbc.core.errors import WBCError
from wbc.core.io import load_probs
from wbc.core.metrics import macro_f1
from wbc.core.run_folder import run_dir
from wbc.optional.restore.compare import compare_restore
from wbc.optional.restore.pix2pix import Restorer, build_generator
from wbc.optional.restore.score import Gate
from wbc.s1_data.cache import load_images
from wbc.s1_data.layout import read_splits
from wbc.s3_train.inputs import load_fold_data
from wbc.s3_train.loop import train_fold
from wbc.s4_predict.fold import predict_fold

TINY = {"encoder": "tu-mobilenetv3_small_050", "decoder_channels": [32, 16, 16, 8, 8], "ndf": 8, "batch_size": 8}


def _restorer(path, eval_images, clean_images, scale: float):
    """A tiny restorer whose gate lets the cleaner half of the eval images through; `scale` perturbs the
    generator away from its identity initialisation."""
    path.mkdir(parents=True)
    G = build_generator(TINY)
    g = torch.Generator().manual_seed(0)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in G.state_dict().items()}
    torch.save(sd, path / "generator.pt")
    gate = Gate.fit(clean_images[:16], eval_images[:16])
    gate.threshold = float(np.median(gate.scores(eval_images)))
    gate.save(path / "gate.json")
    (path / "config.yaml").write_text(yaml.safe_dump({"restorer": {**TINY, "image_size": 64}}))


@pytest.mark.slow
def test_compare_restore_scores_the_runs_models_on_raw_and_restored_inputs(sample_root, make_cfg, tmp_path):
    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=2", f"data.restore_dir={tmp_path / 'restorer'}",
                   "predict.tta=2")
    write_folds(cfg)
    train_fold(cfg, 0)
    predict_fold(cfg, 0, load_fold_data(cfg))
    ev = read_splits(sample_root, ["phase2_eval"])
    eval_images = np.asarray(load_images(cfg, ev))
    clean = np.asarray(load_images(cfg, read_splits(sample_root, ["phase1"])))
    _restorer(tmp_path / "restorer", eval_images, clean, scale=0.05)

    assert main(["compare-restore", *_overrides(cfg), "--severities", "2", "3"]) == 0
    run = run_dir(cfg)
    rep = json.loads((run / "restore_phase2_eval.json").read_text())
    rows = pd.read_csv(run / "restore_phase2_eval.csv", dtype={"ID": str})
    given = rows[rows["condition"] == "given"]
    # The raw path is the run's own prediction: same IDs, same argmax as fold 0's eval.csv (same TTA).
    fold_eval = load_probs(run / "fold0" / "eval.csv")
    assert given["ID"].tolist() == fold_eval.ids.tolist() == ev["ID"].tolist()
    assert (given["pred_raw"].to_numpy() == np.array(fold_eval.classes)[fold_eval.probs.argmax(1)]).all()
    # The gate decides what is restored; images it passes keep their predictions.
    _, _, mask = Restorer.load(tmp_path / "restorer")(eval_images)
    assert given["restored"].to_numpy().astype(bool).tolist() == mask.tolist() and 0 < mask.sum() < len(mask)
    kept = given[given["restored"] == 0]
    assert (kept["pred_raw"] == kept["pred_restored"]).all() and (kept["p_true_raw"] == kept["p_true_restored"]).all()
    changed = given[given["restored"] == 1]
    assert not np.allclose(changed["p_true_raw"], changed["p_true_restored"])
    # Simulated severities damage the gate-clean images only.
    for s in (2, 3):
        sev = rows[rows["condition"] == f"severity{s}"]
        assert sev["ID"].tolist() == kept["ID"].tolist()
    assert set(rep["conditions"]) == {"given", "severity2", "severity3"} and rep["folds"] == [0]
    # Reported numbers are the CSV's.
    classes = sorted(set(ev["labels"]))
    lut = {c: i for i, c in enumerate(classes)}
    for name, c in rep["conditions"].items():
        sub = rows[rows["condition"] == name]
        y = sub["label"].map(lut).to_numpy()
        for k in ("raw", "restored"):
            assert np.isclose(c[k]["macro_f1"], macro_f1(y, sub[f"pred_{k}"].map(lut).to_numpy(), len(classes)))
        lo, hi = c["delta_macro_f1_ci95"]
        assert lo <= hi
    with pytest.raises(WBCError, match=r"phase2_test.csv:2: no label"):
        compare_restore(cfg, "phase2_test")
    bins = rep["damage_bins"]
    assert sum(b["n"] for b in bins) == len(given) and bins[0]["n"] == int((~mask).sum())
    assert bins[0]["sent_to_restorer"] == 0 and all(b["sent_to_restorer"] == 1 for b in bins[1:] if b["n"])


def _overrides(cfg):
    d = cfg["data"]
    return ["-c", str(CONFIG_DIR / "recipes/tiny_cpu.yaml"), f"data.root={d['root']}",
            f"output_dir={cfg['output_dir']}",
            f"data.cache_dir={d['cache_dir']}", f"folds.file={cfg['folds']['file']}", "folds.n_folds=2",
            "train.epochs=2", f"data.restore_dir={d['restore_dir']}", "predict.tta=2"]
