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
