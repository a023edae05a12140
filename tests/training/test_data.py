import json

import numpy as np

from nnslim.training.data import (
    IGNORE,
    MNI_HOLDOUT,
    PatchSampler,
    augment,
    load_mni_tissue,
    load_raw_dataset,
)
from nnslim.training.data import Case


def test_mni_tissue_holdout_band_is_never_trained_on():
    dataset = load_mni_tissue()
    (whole,) = dataset.train
    (band,) = dataset.validation
    lo, hi = MNI_HOLDOUT
    # training sees the whole volume (wider than any patch), every band label replaced by IGNORE
    assert whole.label.shape == (197, 233, 189)
    assert (whole.label[:, lo:hi] == IGNORE).all()
    assert (whole.label[:, :lo] >= 0).all() and (whole.label[:, hi:] >= 0).all()
    sampler = PatchSampler(dataset.train, (96, 96, 96))
    assert all(((coords[:, 1] < lo) | (coords[:, 1] >= hi)).all() for locs in sampler.class_locations
               for coords in locs.values())  # no foreground centre inside the band
    # validation scores the band in place, inside the whole volume
    assert band.label.shape == (197, 233, 189)
    assert band.score_mask.sum() == 197 * (hi - lo) * 189
    assert band.score_mask[:, lo:hi].all()
    scored = band.label[band.score_mask]
    assert set(np.unique(scored)) == {0, 1, 2}
    # the band holds a real share of both tissues
    fractions = np.bincount(scored) / scored.size
    assert fractions[1] > 0.1 and fractions[2] > 0.1


def test_raw_layout_written_by_prepare_loads(mni_raw):
    # written through the runtime's atomic writer: no temporaries left beside the files
    assert not [p for p in mni_raw.rglob(".*")], sorted(mni_raw.rglob(".*"))
    meta = json.loads((mni_raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2}
    dataset = load_raw_dataset(mni_raw)
    assert dataset.label_names == ("background", "grey_matter", "white_matter")
    assert [c.name for c in dataset.train] == ["mni"] and dataset.validation == []
    assert dataset.train[0].image.shape == (1, 197, 233, 189)


def test_sampler_oversamples_foreground_and_pads_small_cases():
    rng = np.random.default_rng(0)
    label = np.zeros((40, 40, 40), dtype=np.int16)
    label[30:33, 5:8, 20:23] = 1  # a tiny object, rarely hit by uniform sampling
    from nnslim.training.data import Case

    case = Case("c", rng.normal(size=(1, 40, 40, 40)).astype(np.float32), label)
    sampler = PatchSampler([case], (16, 16, 16), oversample_foreground=0.5)
    hits = 0
    for i in range(20):
        images, labels = sampler.sample(2, np.random.default_rng(i))
        assert images.shape == (2, 1, 16, 16, 16) and labels.shape == (2, 16, 16, 16)
        hits += int(labels[1].any())  # the second half of the batch is forced onto foreground
    assert hits == 20
    small = Case("s", np.ones((1, 8, 20, 8), np.float32), np.ones((8, 20, 8), np.int16))
    images, labels = PatchSampler([small], (16, 16, 16), edge_extension=0, air_probability=0).sample(1, rng)
    assert images.sum() == labels.sum() == 8 * 16 * 8  # zero padding outside the case


def test_flips_move_image_and_label_together():
    rng = np.random.default_rng(3)
    labels = (rng.random((6, 8, 8, 8)) > 0.7).astype(np.int64)
    images = (labels[:, None] * 100.0).astype(np.float32)  # two clusters far apart
    out_images, out_labels = augment(images, labels, rng)
    for image, label in zip(out_images[:, 0], out_labels):
        # every intensity transform is monotonic and the noise is small against the gap
        midpoint = (image.min() + image.max()) / 2
        assert np.array_equal(image > midpoint, label.astype(bool))
    assert not np.array_equal(out_labels, labels)  # some flip happened



def test_sampler_shows_edges_and_pure_air():
    """Uniform patches reach past the volume by up to half a patch, and some are pure padding."""
    case = Case("c", np.ones((1, 32, 32, 32), np.float32), np.ones((32, 32, 32), np.int16))
    sampler = PatchSampler([case], (16, 16, 16), oversample_foreground=0.0, air_probability=0.25)
    air, partial = 0, 0
    for i in range(50):
        images, labels = sampler.sample(4, np.random.default_rng(i))
        for image, label in zip(images, labels):
            assert (image[0] == label).all()  # padding is image 0 and label 0 together
            air += int(not image.any())
            partial += int(0 < image.sum() < image.size)
    assert 25 <= air <= 75  # 200 uniform items at p = 0.25 (pure-air corners add a few)
    assert partial > 50  # most of the rest touch an edge: starts range over [-8, 24]
