"""The model factory: any timm name, the config's regularisation where the family takes it."""
import pytest


def test_families_without_drop_path_are_built_without_it(capsys):
    from wbc.models.factory import create_model

    model = create_model({"arch": "densenet121", "drop_rate": 0.1, "drop_path_rate": 0.1}, 3)
    assert type(model).__name__ == "DenseNet" and model.get_classifier().out_features == 3
    assert "densenet121 takes no drop_path_rate; built without it" in capsys.readouterr().out
    model = create_model({"arch": "test_resnet", "drop_path_rate": 0.1}, 3)  # it takes one: kept, no warning
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    assert "takes no" not in capsys.readouterr().out
    with pytest.raises(TypeError, match="not_a_kwarg"):  # other keyword errors are the user's to see
        create_model({"arch": "test_resnet", "kwargs": {"not_a_kwarg": 1}}, 3)


@pytest.mark.slow
def test_a_model_built_for_one_input_size_is_checked_against_the_data():
    from wbc.core.errors import WBCError
    from wbc.models.factory import create_model

    swin = {"arch": "swin_tiny_patch4_window7_224"}
    with pytest.raises(WBCError, match=r"takes 224 px inputs, data.image_size is 64: add model.kwargs.img_size=64 "
                                       r"\(Swin also needs a model.kwargs.window_size that divides 64/32, e.g. 2\)"):
        create_model(swin, 3, image_size=64)
    model = create_model({**swin, "kwargs": {"img_size": 64, "window_size": 2}}, 3, image_size=64)
    assert tuple(model.patch_embed.img_size) == (64, 64)
    create_model(swin, 3, image_size=224)  # its own size: fine


def test_hub_weights_load_through_timm_and_an_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    """The hub path is timm's own: a pretrained tag's file (here a local overlay, as a filled cache gives) lands in
    the model; with no hub and no cache the error names the arch and the offline way out."""
    import timm
    import torch
    from huggingface_hub.errors import LocalEntryNotFoundError

    from wbc.core.errors import WBCError
    from wbc.models.factory import create_model

    src = timm.create_model("test_resnet", num_classes=7)
    torch.save(src.state_dict(), tmp_path / "hub.pth")
    overlay = {"pretrained_cfg_overlay": {"file": str(tmp_path / "hub.pth")}}
    cfg = {"arch": "test_resnet", "pretrained": True, "kwargs": overlay}
    got = create_model(cfg, 3)
    body = [k for k in src.state_dict() if not k.startswith("fc.")]
    assert all(torch.equal(got.state_dict()[k], src.state_dict()[k]) for k in body)
    assert got.get_classifier().out_features == 3  # a new head for this dataset's classes

    def offline(*a, **k):
        if k.get("pretrained"):
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        return real(*a, **k)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WBCError, match=r"model.pretrained: the hub's weights for convnext_tiny.fb_in22k_ft_in1k could "
                                       r"not be fetched .*train the recipe's \*_scratch twin"):
        create_model({"arch": "convnext_tiny.fb_in22k_ft_in1k", "pretrained": True}, 3)
    create_model({"arch": "test_resnet", "pretrained": False}, 3)  # offline without the hub: fine


def test_a_run_encoder_never_fetches_hub_weights_it_replaces(tmp_path, monkeypatch):
    import timm
    import torch

    from wbc.optional.embed.encoders import timm_encoder

    asked = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model",
                        lambda *a, **k: asked.append(k["pretrained"]) or real(*a, **{**k, "pretrained": False}))
    torch.save(real("test_resnet", num_classes=5).state_dict(), tmp_path / "best.pt")
    timm_encoder({"arch": "test_resnet", "pretrained": True}, tmp_path / "best.pt")
    timm_encoder({"arch": "test_resnet", "pretrained": True})
    assert asked == [False, True]


def test_every_hub_recipe_has_an_offline_twin():
    import timm
    import yaml

    from wbc.core.config import CONFIG_DIR

    hub = {p.stem: yaml.safe_load(p.read_text())["model"] for p in (CONFIG_DIR / "recipes").glob("*.yaml")
           if yaml.safe_load(p.read_text())["model"].get("pretrained")}
    assert {"convnext_tiny", "swin_tiny", "convnext_tiny_gran", "convnext_small_368"} <= set(hub)
    for stem, model in hub.items():
        assert model["arch"] in timm.list_pretrained(), model["arch"]  # a tag the hub serves
        twin = CONFIG_DIR / "recipes" / f"{stem}_scratch.yaml"
        if twin.exists():
            assert not yaml.safe_load(twin.read_text())["model"].get("pretrained")
    assert {f"{s}_scratch" for s in ("convnext_tiny", "swin_tiny", "convnext_tiny_gran")} <= {
        p.stem for p in (CONFIG_DIR / "recipes").glob("*_scratch.yaml")}
