"""What the model sees: dihedral TTA views, the epoch-tagged sampler and per-sample augmentation seeding."""
import numpy as np
import torch


def test_tta_views_are_the_dihedral_group():
    from wbc.models.inference import view

    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = {tuple(view(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8


def test_epoch_tagged_sampler_and_dataset_seeding():
    from wbc.s1_data.dataset import CellDataset, EpochTagged
    from wbc.s3_train.sampling import build_sampler

    plain = EpochTagged(20, seed=3)
    plain.set_epoch(1)
    a = list(plain)
    assert sorted(i for _, i in a) == list(range(20)) and {e for e, _ in a} == {1}
    assert a == list(plain)  # a pure function of (seed, epoch)
    plain.set_epoch(2)
    assert [i for _, i in plain] != [i for _, i in a]
    weighted = EpochTagged(20, build_sampler(np.arange(20) % 2, 2, {"type": "balanced"}, seed=0), 0)
    weighted.set_epoch(5)
    assert len(list(weighted)) == 20 and all(e == 5 for e, _ in weighted)

    import albumentations as A

    imgs = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    ds = CellDataset(imgs, [0, 1, 0, 1], A.Compose([A.RandomRotate90(p=1), A.GaussNoise(p=1)]), seed=0)
    x1, x2, x3 = ds[(3, 1)][0], ds[(3, 1)][0], ds[(4, 1)][0]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_augmentation_draw_depends_on_seed_epoch_and_index():
    """Seeded per (seed, epoch, index): identical images at two indices get their own draws, the run seed moves
    every draw, and a tagged epoch wins over the dataset's own epoch (workers serving a whole stage)."""
    import albumentations as A

    from wbc.s1_data.dataset import CellDataset

    img = np.random.default_rng(1).integers(0, 255, (1, 16, 16, 3), dtype=np.uint8)
    imgs = np.repeat(img, 6, axis=0)  # the same image six times: only the seed can tell them apart
    aug = lambda: A.Compose([A.GaussNoise(std_range=(0.2, 0.4), p=1)])  # noqa: E731
    ds = CellDataset(imgs, None, aug(), seed=0)
    xs = [ds[(2, i)][0] for i in range(6)]
    assert all(not torch.equal(xs[0], x) for x in xs[1:])
    other = CellDataset(imgs, None, aug(), seed=1)
    assert not torch.equal(other[(2, 0)][0], xs[0])
    ds.set_epoch(7)
    assert torch.equal(ds[(2, 3)][0], xs[3]) and not torch.equal(ds[3][0], xs[3])
