"""Self-supervised pretraining (DINO / FastSiam through lightly), its views, cell filter, image set, resume and exported
backbone, and the prototype-guided selection of the images to pretrain on."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import kill_at_save
from wbc.core.config import CONFIG_DIR
from wbc.core.errors import WBCError
from wbc.optional.ssl import select as S
from wbc.optional.ssl.settings import load_ssl_config, ssl_section

TINY = CONFIG_DIR / "steps" / "ssl_tiny_cpu.yaml"


def tiny_cfg(root, tmp_path, *over, n_images: int | None = 64):
    """ssl_tiny_cpu on the sample data at 32 px; with `n_images`, pretraining sees only that many pool images."""
    extra = []
    if n_images:
        ids = pd.read_csv(root / "phase1_label.csv", dtype=str)["ID"].head(n_images)
        ids.to_frame().to_csv(tmp_path / "ids.csv", index=False)
        extra.append(f"ssl.image_list={tmp_path / 'ids.csv'}")
    return load_ssl_config(TINY, [f"data.root={root}", f"output_dir={tmp_path / 'outputs'}",
                                  f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=32",
                                  "ssl.global_crop_size=32", "ssl.local_crop_size=16", *extra, *over])


# ---- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ssl_dino_lite0_cpu", "ssl_fastsiam_lite0_cpu", "ssl_tiny_cpu"])
def test_shipped_ssl_configs_resolve_with_every_key(name):
    cfg = load_ssl_config(CONFIG_DIR / "steps" / f"{name}.yaml")
    s = ssl_section(cfg, need=("select",))
    assert s["images"] == "pool" and s["image_list"] is None  # non-transductive unless asked
    assert (s["method"], s["export"]) == {"ssl_fastsiam_lite0_cpu": ("fastsiam", "student")}.get(
        name, ("dino", "teacher"))


def test_ssl_section_names_missing_unknown_and_bad_keys():
    good = load_ssl_config(TINY)
    bad = {**good, "ssl": {k: v for k, v in good["ssl"].items() if k != "lr"}}
    with pytest.raises(WBCError, match=r"^ssl\.lr: missing"):
        ssl_section(bad)
    with pytest.raises(WBCError, match=r"^ssl\.epoch: unknown key"):
        ssl_section({**good, "ssl": {**good["ssl"], "epoch": 3}})
    with pytest.raises(WBCError, match=r"^ssl\.images: expected one of pool, transductive, got 'all'"):
        ssl_section(load_ssl_config(TINY, ["ssl.images=all"]))
    with pytest.raises(WBCError, match=r"^ssl\.dino\.out_dim: must be >= 2"):
        ssl_section(load_ssl_config(TINY, ["ssl.dino.out_dim=1"]))
    with pytest.raises(WBCError, match="fastsiam has no teacher"):
        ssl_section(load_ssl_config(TINY, ["ssl.method=fastsiam", "ssl.export=teacher"]))
    with pytest.raises(WBCError, match="has no ssl: section"):
        ssl_section(load_ssl_config(CONFIG_DIR / "recipes" / "tiny_cpu.yaml"))


@pytest.mark.slow
def test_cli_registers_both_commands_and_refuses_a_config_without_ssl(capsys):
    from wbc.__main__ import main

    assert main(["pretrain-ssl", "-c", str(CONFIG_DIR / "recipes" / "tiny_cpu.yaml")]) == 2
    assert "has no ssl: section" in capsys.readouterr().out
    assert main(["select-ssl", "-c", str(TINY), "ssl.select.quantile=2"]) == 2
    assert "ssl.select.quantile: must be <= 1.0" in capsys.readouterr().out


# ---- views -------------------------------------------------------------------------------------------------------

def _views(s, img, epoch=0):
    from wbc.optional.ssl.views import ViewsDataset, build_views

    return ViewsDataset(img[None], build_views(s, (0.5,) * 3, (0.5,) * 3), seed=0)[(epoch, 0)]


def test_dino_views_are_multi_crop_seeded_per_sample_and_leave_the_global_rngs_alone():
    s = {**ssl_section(load_ssl_config(TINY)), "global_crop_size": 40, "local_crop_size": 20, "local_views": 3}
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.random.seed(7)
    torch.manual_seed(7)
    before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a, b, c = _views(s, img), _views(s, img), _views(s, img, epoch=1)
    assert [tuple(v.shape) for v in a] == [(3, 40, 40)] * 2 + [(3, 20, 20)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a pure function of (seed, epoch, index)
    assert not torch.equal(a[0], c[0])  # another epoch, other crops
    assert not torch.equal(a[0], a[1])  # two different global crops
    np.testing.assert_array_equal(np.random.get_state()[1], before[0])
    assert torch.equal(torch.get_rng_state(), before[1])


def test_the_damage_simulator_changes_the_views():
    """The same crops with and without damage: identical transforms, so any difference is the damage."""
    base = {**ssl_section(load_ssl_config(TINY)), "global_crop_scale": [1.0, 1.0], "flip_rotate": 0.0,
            "color_jitter": 0.0, "gray": 0.0, "global_crop_size": 64, "local_views": 0, "method": "fastsiam",
            "views": 2, "damage_max_severity": 3}
    img = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), (0, 0), 3)
    clean, damaged = _views({**base, "damage_p": 0.0}, img), _views({**base, "damage_p": 1.0}, img)
    assert len(clean) == 2
    for c, d in zip(clean, damaged):
        assert float((c - d).abs().mean()) > 0.02


# ---- cell filter ---------------------------------------------------------------------------------------------------

def _smear():
    """A stained cell (violet nucleus in lilac cytoplasm) in the centre of pale plasma, red cells in the corners."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[:] = (240, 222, 205)
    for x, y in ((14, 15), (112, 16), (15, 112), (110, 112)):
        cv2.circle(img, (x, y), 10, (226, 168, 168), -1)
    cv2.circle(img, (64, 64), 30, (205, 185, 222), -1)
    cv2.ellipse(img, (64, 64), (16, 11), 30, 0, 360, (95, 55, 150), -1)
    return np.clip(img + np.random.default_rng(0).normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def test_cell_filter_whitens_the_background_where_the_mask_is_zero():
    from wbc.optional.ssl.images import filter_cell
    from wbc.s6_refine.morphology import segment

    img = _smear()
    seg = segment(img)
    assert seg.ok
    out, ok = filter_cell(img, "whiten", 0.0)
    assert ok
    assert (out[~seg.cell] == 255).all() and np.array_equal(out[seg.cell], img[seg.cell])
    assert (out[5:25, 5:25] == 255).all()  # the red cell in the corner is gone
    wider, _ = filter_cell(img, "whiten", 0.05)
    assert (wider != 255).any(-1).sum() > (out != 255).any(-1).sum()  # the margin keeps a rim around the cell


def test_cell_filter_crop_zooms_to_the_cell_and_a_failed_segmentation_keeps_the_image():
    from wbc.optional.ssl.images import filter_cell

    img = _smear()
    crop, ok = filter_cell(img, "crop", 0.0)
    assert ok and crop.shape == img.shape
    violet = lambda x: ((x[..., 2].astype(int) - x[..., 1]) > 60).mean()  # noqa: E731 -- the nucleus' share
    assert violet(crop) > 2 * violet(img)
    blank = np.full((64, 64, 3), 230, np.uint8)
    same, ok = filter_cell(blank, "whiten", 0.05)
    assert not ok and np.array_equal(same, blank)


def test_filter_cells_filters_every_image_and_reports_the_failures():
    from wbc.optional.ssl.images import filter_cells

    imgs = np.stack([_smear(), np.full((128, 128, 3), 230, np.uint8)])
    out, ok = filter_cells(imgs, "whiten", 0.0)
    assert ok.tolist() == [True, False]
    assert (out[0, :20, :20] == 255).all() and np.array_equal(out[1], imgs[1])


# ---- image set -----------------------------------------------------------------------------------------------------

def test_image_set_pool_transductive_and_list(sample_root, tmp_path):
    from wbc.optional.ssl.images import image_frame

    cfg = tiny_cfg(sample_root, tmp_path, n_images=None)
    pool = image_frame(cfg, ssl_section(cfg))
    assert set(pool["split"]) == {"phase1", "phase2_train"} and len(pool) == 480
    cfg = tiny_cfg(sample_root, tmp_path, "ssl.images=transductive", n_images=None)
    every = image_frame(cfg, ssl_section(cfg))
    assert set(every["split"]) == {"phase1", "phase2_train", "phase2_eval", "phase2_test"} and len(every) == 680
    pd.DataFrame({"ID": every["ID"].iloc[[3, 500, 650]]}).to_csv(tmp_path / "few.csv", index=False)
    cfg = tiny_cfg(sample_root, tmp_path, "ssl.images=transductive", f"ssl.image_list={tmp_path / 'few.csv'}",
                   n_images=None)
    assert list(image_frame(cfg, ssl_section(cfg))["ID"]) == list(every["ID"].iloc[[3, 500, 650]])
    cfg = tiny_cfg(sample_root, tmp_path, f"ssl.image_list={tmp_path / 'few.csv'}", n_images=None)
    with pytest.raises(WBCError, match=r"few\.csv:3: ID \S+ is not among the images of ssl\.images=pool"):
        image_frame(cfg, ssl_section(cfg))


# ---- selection -----------------------------------------------------------------------------------------------------

def _clusters(n_per_class, seed=0, dim=16, spread=0.35):
    """Unit embeddings around one direction per class, with the same spread for every class."""
    centres = np.linalg.qr(np.random.default_rng(99).normal(size=(dim, dim)))[0][:len(n_per_class)]
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    return S.unit(centres[y] + spread * rng.normal(size=(len(y), dim)) / np.sqrt(dim)), y


SEL = {"images_per_prototype": 20, "max_prototypes": 3, "quantile": 0.25, "widen": 3.0}


def test_prototypes_cluster_each_class_with_the_members_quantile_and_spread():
    emb, y = _clusters([60, 10])
    labels = np.array(["COMMON", "RARE"])[y]
    p = S.build_prototypes(emb, labels, SEL, seed=0)
    assert list(p.classes) == ["COMMON"] * 3 + ["RARE"] and list(p.names) == ["COMMON/0", "COMMON/1", "COMMON/2",
                                                                             "RARE/0"]
    assert p.members.tolist()[-1] == 10 and p.members[:3].sum() == 60
    np.testing.assert_allclose(np.linalg.norm(p.vectors, axis=1), 1.0)
    rare = emb[y == 1]
    sims = rare @ S.unit(rare.mean(0))
    assert p.base[-1] == pytest.approx(np.quantile(sims, 0.25)) and p.spread[-1] == pytest.approx(sims.std())


def test_selection_widens_the_threshold_of_sparse_prototypes_so_rare_candidates_are_kept_more():
    lab, ylab = _clusters([40, 40], seed=0)
    cand, ycand = _clusters([400, 20], seed=1)  # the unlabelled images: class 1 is rare among them
    p = S.build_prototypes(lab, np.array(["COMMON", "RARE"])[ylab], {**SEL, "max_prototypes": 1}, seed=0)
    kept = {}
    for widen in (0.0, 3.0):
        r = S.select(cand, p, widen)
        assert (p.classes[r["nearest"]] == np.array(["COMMON", "RARE"])[ycand]).all()  # matched to its class
        np.testing.assert_allclose(r["density"], [1.0, 20 / 400])
        np.testing.assert_allclose(r["tau"], p.base - widen * p.spread * (1 - r["density"]))
        kept[widen] = [r["keep"][ycand == c].mean() for c in (0, 1)]
    assert abs(kept[0.0][0] - kept[0.0][1]) < 0.2  # one rule for both classes without widening
    assert kept[3.0][1] > 0.95 and kept[3.0][1] > kept[3.0][0] + 0.15  # widened: the rare class is emphasised
    assert kept[3.0][0] == pytest.approx(kept[0.0][0])  # the densest prototype keeps its base threshold


def test_selection_rows_are_labelled_plus_kept_candidates_keyed_by_id():
    emb, y = _clusters([30, 6, 30, 4], seed=2)
    frame = pd.DataFrame({"ID": [f"{i:04d}.jpg" for i in range(len(y))], "split": "phase1",
                          "labels": np.array(["A", "B", "A", "B"])[np.repeat([0, 1, 2, 3], [30, 6, 30, 4])]})
    lab = np.arange(36)
    cand = np.arange(36, 70)
    p = S.build_prototypes(emb[lab], frame["labels"].to_numpy()[lab], SEL, seed=0)
    res = S.select(emb[cand], p, 3.0)
    rows = S.selection_rows(frame, lab, cand, emb, p, res)
    assert rows["ID"].is_unique and list(rows["ID"]) == sorted(rows["ID"])
    assert (rows["source"] == "labelled").sum() == 36 and (rows["source"] == "selected").sum() == res["keep"].sum()
    own = rows[rows["source"] == "labelled"]
    assert (own["class"].to_numpy() == frame["labels"].to_numpy()[lab]).all()  # matched within their own class
    assert (rows["similarity"] >= rows["threshold"] - 1e-6)[rows["source"] == "selected"].all()


def test_labelled_rows_draw_at_most_l_per_class_from_the_pool():
    frame = pd.DataFrame({"ID": [str(i) for i in range(9)], "labels": list("AAAABBB") + ["", ""],
                          "split": ["phase1"] * 7 + ["phase2_test"] * 2})
    rows = S.labelled_rows(frame, ["phase1"], 2, seed=0)
    assert sorted(frame["labels"].iloc[rows]) == ["A", "A", "B", "B"]
    assert list(S.labelled_rows(frame, ["phase1"], None, seed=0)) == list(range(7))


# ---- pretraining end to end ----------------------------------------------------------------------------------------

def _losses(run):
    return [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dino_student_learns_to_match_a_fixed_teacher_and_the_teacher_follows_by_momentum():
    """lightly's DINO pieces as assembled: gradients reach the student only, the loss falls as the student matches a
    frozen teacher (momentum 1), and a momentum update moves the teacher to m * teacher + (1 - m) * student."""
    from wbc.optional.ssl.methods import build_method
    from wbc.optional.ssl.train import build_backbone

    torch.manual_seed(0)
    s = ssl_section(load_ssl_config(TINY))
    backbone, dim, _, _ = build_backbone(load_ssl_config(TINY)["model"])
    method = build_method(s, backbone, dim).train()
    teacher0 = {k: v.clone() for k, v in method.teacher_backbone.state_dict().items()}
    assert all(torch.equal(teacher0[k], v) for k, v in method.student_backbone.state_dict().items())
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.randn(8, 3, 16, 16)]
    opt = torch.optim.AdamW(method.student_parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = method.loss(views, epoch=1)
        opt.zero_grad()
        loss.backward()
        method.before_step(epoch=1)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    w = dict(method.teacher_backbone.named_parameters())
    name = next(n for n, p in w.items() if p.ndim == 4)
    assert torch.equal(w[name], teacher0[name])  # no update without momentum_update
    student = dict(method.student_backbone.named_parameters())[name].detach().clone()
    method.momentum_update(0.9)
    torch.testing.assert_close(w[name], 0.9 * teacher0[name] + 0.1 * student)


@pytest.mark.slow
def test_a_tiny_fastsiam_run_lowers_its_loss_and_writes_its_outputs(sample_root, tmp_path):
    from wbc.optional.ssl.train import run_pretrain

    cfg = tiny_cfg(sample_root, tmp_path, "ssl.method=fastsiam", "ssl.export=student", "ssl.epochs=5",
                   "ssl.damage_p=0.0", "ssl.warmup_epochs=0", "ssl.lr=0.01")
    rep = run_pretrain(cfg)
    run = tmp_path / "outputs" / cfg["name"]
    losses = _losses(run)
    assert len(losses) == 5 and rep["final_loss"] == losses[-1]
    assert losses[-1] < losses[0] - 0.2, losses  # negative cosine similarity: -1 when every view agrees
    listed = pd.read_csv(run / "images.csv", dtype=str)
    assert len(listed) == 64 and listed["ID"].is_unique and rep["images"] == 64
    png = cv2.imread(str(run / "loss_curve.png"))
    assert png is not None and png.shape[0] > 100
    steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step_losses"]
    assert len(steps) == 64 // 16


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(sample_root, tmp_path, monkeypatch):
    from wbc.core import checkpoint
    from wbc.core.io import torch_load
    from wbc.optional.ssl.train import run_pretrain

    over = ["ssl.epochs=3", "model.drop_path_rate=0.2"]  # stochastic depth: the RNG state must come back too
    full, part = (tiny_cfg(sample_root, tmp_path, *over, f"name={n}", n_images=32) for n in ("full", "part"))
    run_pretrain(full)
    real = kill_at_save(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(part)
    monkeypatch.setattr(checkpoint, "torch_save", real)
    out = tmp_path / "outputs"
    assert torch_load(out / "part" / "ssl_state.pt")["epoch"] == 0
    run_pretrain(part, resume=True)
    for f in ("backbone.pt", "ssl_state.pt"):
        a, b = torch_load(out / "full" / f), torch_load(out / "part" / f)
        sa, sb = (a, b) if f == "backbone.pt" else (a["method"], b["method"])
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f
    assert _losses(out / "full") == _losses(out / "part")
    with pytest.raises(WBCError, match="saved by another ssl config"):
        run_pretrain(tiny_cfg(sample_root, tmp_path, *over, "name=part", "ssl.lr=0.01", n_images=32), resume=True)


@pytest.mark.slow
def test_the_backbone_loads_into_train_folds_model_and_the_embed_encoder(sample_root, tmp_path):
    from wbc.core.io import torch_load
    from wbc.models.factory import create_model
    from wbc.optional.embed.encoders import build_encoder
    from wbc.optional.ssl.train import run_pretrain

    cfg = tiny_cfg(sample_root, tmp_path, "ssl.epochs=1", "ssl.cell_filter=whiten")
    run_pretrain(cfg)
    listed = pd.read_csv(tmp_path / "outputs" / cfg["name"] / "images.csv")
    assert list(listed.columns) == ["ID", "split", "cell_ok"] and set(listed["cell_ok"]) <= {0, 1}
    path = tmp_path / "outputs" / cfg["name"] / "backbone.pt"
    sd = torch_load(path)
    assert not any(k.startswith("fc.") for k in sd)  # no classifier in a backbone
    model_cfg = {**cfg["model"], "pretrained_file": str(path)}
    model = create_model(model_cfg, 11, 32)  # as train-fold builds its model (s3_train/loop.py)
    body = model.state_dict()
    assert set(body) - set(sd) == {"fc.weight", "fc.bias"}  # every body key came from the file
    assert all(torch.equal(body[k], sd[k]) for k in sd)
    fresh = create_model({**cfg["model"], "pretrained_file": None}, 11, 32).state_dict()
    assert any(not torch.equal(fresh[k], sd[k]) for k in sd if sd[k].is_floating_point())  # pretraining moved them
    enc = build_encoder({"model": model_cfg, "embed": {"encoder": "timm"}}).eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(enc(x).numpy(), model.forward_head(model.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_exported_backbone_is_the_teacher_or_the_student(sample_root, tmp_path):
    from wbc.core.io import torch_load
    from wbc.optional.ssl.train import run_pretrain

    for export in ("teacher", "student"):
        run_pretrain(tiny_cfg(sample_root, tmp_path, "ssl.epochs=1", f"name={export}", f"ssl.export={export}",
                              n_images=32))
        st = torch_load(tmp_path / "outputs" / export / "ssl_state.pt")["method"]
        bb = torch_load(tmp_path / "outputs" / export / "backbone.pt")
        other = "student" if export == "teacher" else "teacher"
        assert all(torch.equal(bb[k], st[f"{export}_backbone.{k}"]) for k in bb)
        assert any(not torch.equal(bb[k], st[f"{other}_backbone.{k}"]) for k in bb)


@pytest.mark.slow
def test_select_then_pretrain_on_the_selection(sample_root, tmp_path):
    from wbc.optional.ssl.images import image_frame
    from wbc.optional.ssl.select import run_select

    cfg = tiny_cfg(sample_root, tmp_path, n_images=None)
    summary = run_select(cfg)
    out = tmp_path / "outputs" / f"{cfg['name']}_select"
    rows = pd.read_csv(out / "selected.csv", dtype=str, keep_default_na=False)
    assert rows["ID"].is_unique and set(rows["source"]) <= {"labelled", "selected"}
    lab = rows[rows["source"] == "labelled"]
    assert lab["class"].value_counts().max() <= 10  # select.labels_per_class
    assert summary["labelled"] == len(lab) and summary["kept"] == (rows["source"] == "selected").sum()
    assert summary["kept"] < summary["candidates"]  # a selection, not everything
    assert json.loads((out / "selection.json").read_text())["classes"].keys() == set(lab["class"])
    sel = tiny_cfg(sample_root, tmp_path, f"ssl.image_list={out / 'selected.csv'}", n_images=None)
    assert set(image_frame(sel, ssl_section(sel))["ID"]) == set(rows["ID"])
