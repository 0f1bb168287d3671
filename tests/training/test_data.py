"""Individual-level splits, TFRecord shards and the training dataset."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from service.contract import Preprocessing  # noqa: E402
from service.knn import NEW_INDIVIDUAL  # noqa: E402
from training.config import Augmentation  # noqa: E402
from training.data import (  # noqa: E402
    CsvSource,
    Entry,
    ShardSource,
    split_catalogue,
    training_dataset,
    upright_bytes,
    write_shards,
)
from training.synthetic import write_catalogue  # noqa: E402


def entries(individuals: int = 60, photos: int = 5) -> list[Entry]:
    return [
        Entry(f"{s}-{i}-{p}.jpg", s, f"{s}-{i}")
        for s in ("beluga", "humpback_whale")
        for i in range(individuals // 2)
        for p in range(photos)
    ]


def test_each_individual_lives_in_one_fold() -> None:
    catalogue = entries()
    split = split_catalogue(
        catalogue, folds=5, validation_fold=2, unseen_fraction=0.1, gallery_fraction=0.5, seed=1
    )
    train = {e.individual_id for e in split.train}
    val = {e.individual_id for e in split.gallery + split.queries}
    assert train.isdisjoint(val) and len(train | val) == 60
    assert len(val) == 12  # one fold in five
    assert collections.Counter(i.split("-")[0] for i in val) == {"beluga": 6, "humpback_whale": 6}
    assert split.unseen and split.unseen <= val
    assert round(len(val) * 0.1) == len(split.unseen)
    assert not split.unseen & {e.individual_id for e in split.gallery}
    for ind in val - split.unseen:  # known: some photos in the gallery, the rest queries
        assert any(e.individual_id == ind for e in split.gallery)
        assert any(e.individual_id == ind for e in split.queries)
    truths = {split.truth(e) for e in split.queries if e.individual_id in split.unseen}
    assert truths == {NEW_INDIVIDUAL}
    assert sorted(split.train + split.gallery + split.queries, key=str) == sorted(
        catalogue, key=str
    )


def test_splits_are_deterministic_by_seed() -> None:
    def val_ids(seed: int, fold: int) -> set[str]:
        s = split_catalogue(
            entries(),
            folds=5,
            validation_fold=fold,
            unseen_fraction=0.1,
            gallery_fraction=0.5,
            seed=seed,
        )
        return {e.individual_id for e in s.gallery + s.queries}

    assert val_ids(1, 0) == val_ids(1, 0)
    assert val_ids(1, 0) != val_ids(2, 0)
    folds = [val_ids(1, f) for f in range(5)]
    assert set().union(*folds) == {e.individual_id for e in entries()}
    assert sum(len(f) for f in folds) == 60  # the folds partition the individuals


def test_no_validation_with_one_fold() -> None:
    split = split_catalogue(
        entries(), folds=1, validation_fold=0, unseen_fraction=0.1, gallery_fraction=0.5, seed=0
    )
    assert len(split.train) == 300 and not split.queries


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_catalogue(tmp_path_factory.mktemp("cat"), individuals=5, photos=3, size=40, seed=4)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_shards_round_trip_through_gfile(catalogue, tmp_path: Path, scheme: str) -> None:  # type: ignore[no-untyped-def]
    """Written and read back through tf.io.gfile, as in a gs:// bucket; ``file://`` is the local
    file system addressed as a URL, the way a bucket is."""
    csv_source = CsvSource(catalogue.catalogue_csv, catalogue.images)
    prefix = f"{scheme}{tmp_path}/shards/"
    names = write_shards(csv_source.entries, catalogue.images, prefix, photos_per_shard=4)
    assert names == [f"shard-{i:05d}-of-00004.tfrecord" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
        [*names, "manifest.csv"]
    )
    shards = ShardSource(prefix)
    assert sorted(shards.entries, key=str) == sorted(csv_source.entries, key=str)
    from_shards = dict(shards.read(shards.entries))
    assert from_shards == {
        e: upright_bytes((catalogue.images / e.image).read_bytes()) for e in csv_source.entries
    }
    some = shards.entries[:5]
    pairs = list(shards.dataset(some).as_numpy_iterator())
    assert sorted((bytes(d), i.decode()) for d, i in pairs) == sorted(
        (from_shards[e], e.individual_id) for e in some
    )


@pytest.mark.parametrize("kind", ["csv", "shards"])
def test_training_batches_carry_the_right_labels(catalogue, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    source = CsvSource(catalogue.catalogue_csv, catalogue.images)
    if kind == "shards":
        write_shards(source.entries, catalogue.images, str(tmp_path / "s"), photos_per_shard=5)
        source = ShardSource(str(tmp_path / "s"))  # type: ignore[assignment]
    split = split_catalogue(
        source.entries, folds=1, validation_fold=0, unseen_fraction=0, gallery_fraction=0.5, seed=0
    )
    spec = Preprocessing(40)
    ds = training_dataset(
        source,
        split,
        spec=spec,
        augmentation=Augmentation(enabled=False),
        global_batch=5,
        shuffle_buffer=100,
        cache_decoded=kind == "csv",
        seed=0,
    )
    from training.augment import decode, model_input

    expected = {
        model_input(
            decode(tf.constant(upright_bytes((catalogue.images / e.image).read_bytes())), 40), spec
        )
        .numpy()
        .tobytes(): split.classes.index(e.individual_id)
        for e in split.train
    }
    features, labels = next(iter(ds))
    assert features["image"].shape == (5, 40, 40, 3)
    assert np.array_equal(features["label"].numpy(), labels.numpy())
    for image, label in zip(features["image"].numpy(), labels.numpy(), strict=True):
        assert expected[image.tobytes()] == label
