import json
from pathlib import Path

import pytest

from wbc.core.config import CONFIG_DIR, dump_config, leaves, load_config, read_yaml
from wbc.core.errors import WBCError


def test_chain_and_overrides():
    x = CONFIG_DIR / "experiments/pbcbench/effnet_lite0_cpu_e16_crop.yaml"
    cfg = load_config(x, ["train.epochs=3", "train.sampler.type=balanced", "data.root=/data/pbcbench"])
    assert cfg["name"] == "pbcbench_effnet_lite0_cpu_e16_crop"  # <dataset>_<file stem>
    assert cfg["data"]["center_crop"] == 0.7  # own file
    assert cfg["model"]["arch"] == "tf_efficientnet_lite0"  # from recipes/lite0_cpu.yaml (its base)
    assert cfg["predict"]["tta"] == 8 and cfg["train"]["min_lr"] == 1.0e-6  # from base.yaml
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["sampler"]["type"] == "balanced"
    assert load_config(x, ["name=x"])["name"] == "x"


def test_a_run_is_named_after_its_dataset_and_config(monkeypatch):
    recipe = CONFIG_DIR / "recipes/lite0_cpu.yaml"
    assert load_config(recipe, ["data.root=/d/pbcbench"])["name"] == "pbcbench_lite0_cpu"
    assert load_config(recipe, ["data.root=/d/wbcbench"])["name"] == "wbcbench_lite0_cpu"  # no collision
    assert load_config(recipe, ["data.root=/d/x", "data.name=lab2"])["name"] == "lab2_lite0_cpu"
    monkeypatch.setenv("WBC_DATA", "/d/mylab")
    assert load_config(recipe)["name"] == "mylab_lite0_cpu"
    monkeypatch.delenv("WBC_DATA")
    # a stem that already names the dataset is kept
    assert load_config(CONFIG_DIR / "ensemble/pbcbench_best.yaml", ["data.root=/d/pbcbench"])["name"] == "pbcbench_best"
    assert load_config(CONFIG_DIR / "ensemble/sample.yaml", ["data.root=/d/sample"])["name"] == "sample"


BEFORE = json.loads((Path(__file__).parent / "fixtures" / "configs_before_regrouping.json").read_text())


@pytest.mark.parametrize("old", sorted(BEFORE["runs"]), ids=lambda p: p.removeprefix("configs/"))
def test_every_run_config_resolves_as_before_the_regrouping(old):
    """Each config file of before the configs were grouped by role (91 files, seeds among them) maps to a config of
    today plus overrides (a seed, a name) that resolves to the same keys and values; a key added since may only
    carry base.yaml's default (every new lever is off unless a config turns it on)."""
    run = BEFORE["runs"][old]
    if "raw" in run:  # a `make tune-train` study: read as written
        assert read_yaml(CONFIG_DIR.parent / run["config"]) == run["raw"]
        return
    want = {k: v for k, v in {**BEFORE["base"], **run["set"]}.items() if k not in run["unset"]}
    got = leaves(load_config(CONFIG_DIR.parent / run["config"], run["overrides"]))
    assert {k: got.get(k, "<missing>") for k in want} == want
    defaults = leaves(load_config(None))
    assert {k: v for k, v in got.items() if k not in want} == {k: defaults[k] for k in got if k not in want}


def test_configs_are_grouped_by_role():
    top = sorted(p.name for p in CONFIG_DIR.iterdir())
    assert top == ["base.yaml", "ensemble", "experiments", "recipes", "steps"]
    for recipe in (CONFIG_DIR / "recipes").glob("*.yaml"):  # what a user runs: inherits base.yaml alone
        assert "base" not in read_yaml(recipe), recipe.name
    for exp in (CONFIG_DIR / "experiments").rglob("*.yaml"):  # on a recipe or a step config, never on another
        parent = read_yaml(exp).get("base")
        if parent:
            assert (exp.parent / parent).resolve().parent.name in ("recipes", "steps"), exp.name
    for p in CONFIG_DIR.rglob("*.yaml"):
        assert "../shared" not in p.read_text(), p  # the data root comes from DATA= / WBC_DATA


def test_dump_round_trip(tmp_path):
    cfg = load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["train.lr=0.5"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again["train"]["lr"] == 0.5 and again["model"] == cfg["model"]


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(WBCError, match="not key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(WBCError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_wbc_data_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WBC_DATA", str(tmp_path))
    assert load_config(None)["data"]["root"] == str(tmp_path)
    assert load_config(None, ["data.root=/x"])["data"]["root"] == "/x"


def test_typos_are_refused_naming_the_file_and_key(tmp_path):
    cfg_file = tmp_path / "typo.yaml"
    cfg_file.write_text("base: " + str(CONFIG_DIR / "recipes/tiny_cpu.yaml")
                        + "\ntrain:\n  epoch: 3\n  loss: {tua: 0.5}\n")
    with pytest.raises(WBCError, match=r"typo\.yaml: unknown config key\(s\) train\.epoch, train\.loss\.tua"):
        load_config(cfg_file)
    with pytest.raises(WBCError, match=r"override 'augment\.damage\.max_severty=2': unknown config key"):
        load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["augment.damage.max_severty=2"])


def test_free_form_and_step_sections_are_not_checked(tmp_path):
    cfg = load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["model.kwargs.in_chans=3", "embed.anything=1"])
    assert cfg["model"]["kwargs"] == {"in_chans": 3} and cfg["embed"] == {"anything": 1}  # an optional step's own
    with pytest.raises(WBCError, match=r"unknown config key\(s\) ensemble\.tuning\.n_trails"):
        load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["ensemble.tuning.n_trails=3"])  # a main-path step's
    with pytest.raises(WBCError, match=r"override 'outptu_dir=x': unknown config key\(s\) outptu_dir"):
        load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["outptu_dir=x"])  # a top-level typo is not a section


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_config_resolves(path):
    if path.name.startswith("tune_train"):  # a `make tune-train` study, not a run
        from wbc.optional.tune_train import load_study_config

        assert load_study_config(path)["search_space"]
        return
    cfg = load_config(path)
    assert cfg["name"] and cfg["model"]["arch"]


def test_typed_sections_agree_with_base_yaml():
    """`ensemble.tuning`'s typed view (RuleSpace, also built by hand in tests) keeps base.yaml's defaults."""
    from wbc.s5_ensemble.tune import RuleSpace

    assert RuleSpace.from_cfg(load_config(None)["ensemble"]["tuning"]) == RuleSpace()


def test_inheritance_loop_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(WBCError, match=r"a\.yaml: config inherits from itself"):
        load_config(tmp_path / "a.yaml")


def test_a_misspelt_section_is_refused(tmp_path):
    with pytest.raises(WBCError, match=r"override 'trian\.epochs=3': unknown config key\(s\) trian"):
        load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["trian.epochs=3"])
    cfg_file = tmp_path / "sec.yaml"
    cfg_file.write_text("base: " + str(CONFIG_DIR / "recipes/tiny_cpu.yaml") + "\nagument:\n  damage: {p: 0.9}\n")
    with pytest.raises(WBCError, match=r"sec\.yaml: unknown config key\(s\) agument"):
        load_config(cfg_file)


def test_override_values_keep_their_meaning():
    cfg = load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", [
        "train.lr=1e-3", "model.drop_path_rate=2E-1", "train.epochs=3", "name=2024-01-01",
        "data.root=/mnt/my data #2", "output_dir=~/runs", "data.classes=[A, B]", "model.pretrained_file=null"])
    assert cfg["train"]["lr"] == 0.001 and cfg["model"]["drop_path_rate"] == 0.2  # YAML 1.1 would keep text
    assert cfg["train"]["epochs"] == 3 and cfg["data"]["classes"] == ["A", "B"]
    assert cfg["name"] == "2024-01-01" and cfg["data"]["root"] == "/mnt/my data #2"  # text keys stay text
    assert cfg["output_dir"] == "~/runs" and cfg["model"]["pretrained_file"] is None
    assert load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["data.restore_dir=null"])["data"]["restore_dir"] is None
    weights = load_config(CONFIG_DIR / "ensemble/sample.yaml", ["ensemble.blend.weights=[0.3,0.7]"])
    assert weights["ensemble"]["blend"]["weights"] == [0.3, 0.7]  # a key that holds a word takes a list too
    for o in ("train=5", "data=null"):
        with pytest.raises(WBCError, match=rf"override '{o}': {o.split('=')[0]} is a section"):
            load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", [o])
    with pytest.raises(WBCError, match=r"override 'name=': empty value"):
        load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["name="])
    with pytest.raises(WBCError, match=r"override 'train.lr=\[1': invalid YAML value"):
        load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["train.lr=[1"])
