"""Tests of the labelled input (fine-tuning and linear probing): labels through the train and eval iterators,
the eval iterator's coverage over processes, the official folder layout, the digits dataset, synthetic labelled
data and the RandAugment string; real tfds datasets built from files written here, compared by value."""

import json
import os

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import config_lib, datasets, finetune_augment, input_pipeline

# Solid images: class c is bright in channel CHANNEL[c] (classes sorted: blue 0, green 1, red 2), and the
# example's brightness identifies it.
CHANNEL = {"blue": 2, "green": 1, "red": 0}
CLASSES = sorted(CHANNEL)


def _solid(path, name, level, size):
    colour = np.full(3, 10, np.uint8)
    colour[CHANNEL[name]] = level
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.broadcast_to(colour, (*size, 3)).copy()).save(path)


def _levels(images):
    """uint8 [..., H, W, 3] -> the colour of each (solid) image [..., 3], rounded."""
    assert images.dtype == np.uint8
    return np.round(images.mean(axis=(-3, -2))).astype(int)


def _class_of_colour(levels):
    return np.array([CLASSES.index(next(n for n, c in CHANNEL.items() if c == np.argmax(rgb))) for rgb in levels])


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """root/train/<class>/ (3 per class) and root/val/<class>/ (7 images, 3 classes), solid PNGs of various
    sizes; val example k has level 60 + 20 k."""
    root = tmp_path_factory.mktemp("layout")
    for c, name in enumerate(CLASSES):
        for k in range(3):
            _solid(str(root / "train" / name / f"{k}.png"), name, 100 + 40 * k, (10 + 3 * k, 14 - c))
    for k in range(7):
        name = CLASSES[k % 3]
        _solid(str(root / "val" / name / f"v{k}.png"), name, 60 + 20 * k, (9 + k, 12))
    return root


def _input(tmp_path, **fields):
    config = config_lib.input_config()
    config.data_dir = str(tmp_path / "tfds")
    config.shuffle_buffer = 16
    config.labels = True
    config.update(fields)
    return config


def _train(config, *, shape=(8, 8, 3), batch=4, seed=0, process_index=0, process_count=1, state=None):
    return input_pipeline.create_train_iterator(config, image_shape=shape, seed=seed, global_batch_size=batch,
                                                process_index=process_index, process_count=process_count,
                                                state=state)


def _eval(config, *, shape=(8, 8, 3), batch=4, process_index=0, process_count=1):
    return input_pipeline.create_eval_iterator(config, image_shape=shape, global_batch_size=batch,
                                               process_index=process_index, process_count=process_count)


# ---------------------------------------------------------------------------------------------------------
# The official folder layout; labels through the train and eval iterators.
# ---------------------------------------------------------------------------------------------------------


def test_official_layout_labels_travel_with_their_images(layout, tmp_path):
    config = _input(tmp_path, dataset="folder", image_folder=str(layout))
    builder = datasets.get_builder(config)
    assert builder.info.features["label"].names == CLASSES  # sorted class names of train/, as ImageFolder
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 9, "validation": 7}
    assert input_pipeline.num_classes(config) == 3

    it = _train(config, batch=6)
    for _ in range(3):  # two epochs: labels stay with their examples through every reshuffle
        batch = next(it)
        assert batch["labels"].dtype == np.int32 and batch["labels"].shape == (6,)
        np.testing.assert_array_equal(batch["labels"], _class_of_colour(_levels(batch["images"])))
    assert set(batch) == {"images", "labels"}

    evaluation = _eval(config)
    batches = list(evaluation)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])[mask]
    levels = _levels(np.concatenate([b["images"] for b in batches])[mask])
    np.testing.assert_array_equal(labels, _class_of_colour(levels))
    assert sorted(levels.max(axis=1)) == [60 + 20 * k for k in range(7)]  # the val/ images, each once


@pytest.mark.parametrize("process_count,batch", [(1, 4), (3, 6)])
def test_eval_covers_every_example_once_over_processes(layout, tmp_path, process_count, batch):
    """7 examples: 1 process x 2 batches of 4 (1 padding row); 3 processes (shares 3, 2, 2) x 2 batches of 2."""
    config = _input(tmp_path, dataset="folder", image_folder=str(layout), eval_split="validation")
    seen, num_batches = [], set()
    for p in range(process_count):
        evaluation = _eval(config, batch=batch, process_index=p, process_count=process_count)
        assert evaluation.num_examples == 7
        passes = [list(evaluation) for _ in range(2)]  # each iteration is a fresh, identical pass
        for first, again in zip(*passes):
            for key in first:
                np.testing.assert_array_equal(first[key], again[key])
        num_batches.add((evaluation.num_batches, len(passes[0])))
        for b in passes[0]:
            assert b["images"].shape == (batch // process_count, 8, 8, 3) and b["mask"].dtype == bool
            assert not b["images"][~b["mask"]].any() and not b["labels"][~b["mask"]].any()  # padding
            seen += [tuple(rgb) for rgb in _levels(b["images"][b["mask"]])]
        assert sum(b["mask"].sum() for b in passes[0]) == evaluation.local_num_examples
    assert num_batches == {(2, 2)}  # the same number of batches on every process
    assert len(seen) == len(set(seen)) == 7


def test_eval_iterator_uses_the_eval_transform(tmp_path):
    """The iterator's images are preprocess_for_eval of the decoded files (tested against PIL in
    test_finetune_augment), at a non-square model size, which is checked here against PIL: scale (aspect
    kept) to cover int(H / crop_pct) x int(W / crop_pct), then center-crop H x W."""
    root = tmp_path / "photos"
    photo = skimage.data.astronaut()[40:130, 100:160]  # 90 x 60, portrait
    Image.fromarray(photo).save(root.mkdir(parents=True) or root / "a.png")
    config = _input(tmp_path, dataset="folder", image_folder=str(root), eval_split="train", eval_crop_pct=0.8)
    image = next(iter(_eval(config, shape=(24, 32, 3), batch=1)))["images"][0]
    expected = finetune_augment.preprocess_for_eval(tf.constant(photo), (24, 32), 0.8).numpy()
    np.testing.assert_array_equal(image, expected)

    cover_w = int(32 / 0.8)  # to cover 30 x 40 (24 / 0.8 x 32 / 0.8) the width decides: 60 -> 40, 90 -> 60
    pil = Image.fromarray(photo).resize((cover_w, int(cover_w * 90 / 60)), Image.BICUBIC)
    top, left = round((pil.size[1] - 24) / 2), round((pil.size[0] - 32) / 2)
    pil = np.asarray(pil.crop((left, top, left + 32, top + 24)), np.float64)
    assert np.abs(image.astype(np.float64) - pil).max() <= 1.0


def test_official_layout_errors_and_fingerprint(layout, tmp_path):
    def error(root):
        with pytest.raises(datasets.DataError) as info:
            datasets.ImageFolder(folder=str(root), data_dir=str(tmp_path / "tfds"))
        assert "\n" not in str(info.value)
        return str(info.value)

    unknown = tmp_path / "unknown"
    _solid(str(unknown / "train" / "red" / "a.png"), "red", 90, (8, 8))
    _solid(str(unknown / "val" / "blue" / "b.png"), "blue", 90, (8, 8))
    assert error(unknown) == (f"config.input.image_folder={str(unknown)!r}: val/ has classes that train/ lacks "
                              "(blue): every class needs training images, class ids come from train/'s sorted "
                              "class names")
    _solid(str(unknown / "validation" / "red" / "c.png"), "red", 90, (8, 8))
    assert "holds both val/ and validation/" in error(unknown)

    loose = tmp_path / "loose"
    _solid(str(loose / "train" / "red" / "a.png"), "red", 90, (8, 8))
    _solid(str(loose / "train" / "b.png"), "red", 90, (8, 8))
    _solid(str(loose / "validation" / "red" / "c.png"), "red", 90, (8, 8))
    assert error(loose).startswith(f"config.input.image_folder={str(loose)!r}: train/b.png is not inside a class "
                                   "folder")
    os.remove(loose / "train" / "b.png")
    builder = datasets.ImageFolder(folder=str(loose), data_dir=str(tmp_path / "tfds"))  # validation/ is accepted
    assert builder.split_files == {"train": ["train/red/a.png"], "validation": ["validation/red/c.png"]}
    # The same files read as the one-split layout (what an older version prepared) give another fingerprint.
    flat = datasets._fingerprint(builder.folder, datasets.list_image_files(builder.folder))
    assert not builder.builder_config.name.endswith(flat)

    empty_val = tmp_path / "empty_val"
    _solid(str(empty_val / "train" / "red" / "a.png"), "red", 90, (8, 8))
    (empty_val / "val" / "red").mkdir(parents=True)
    assert error(empty_val).startswith(f"config.input.image_folder={str(empty_val)!r}: its val/ folder holds no "
                                       "images")


def test_missing_eval_split_and_unlabelled_dataset_are_one_line_errors(layout, tmp_path):
    config = _input(tmp_path, dataset="folder", image_folder=str(layout), eval_split="test")
    with pytest.raises(datasets.DataError) as info:
        _eval(config)
    assert str(info.value).startswith("config.input.eval_split='test' is not a split of mae_image_folder: it has "
                                      "['train', 'validation']")
    assert "\n" not in str(info.value)

    class Unlabelled(datasets._LocalBuilder, skip_registration=True):
        name = "unlabelled"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(4, 4, 3))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield "k", {"image": np.zeros((4, 4, 3), np.uint8)}

    builder = Unlabelled(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    with pytest.raises(datasets.DataError, match=r"^config.input.labels=True \(dataset 'folder'\) needs class "
                                                 r"labels, but unlabelled has no ClassLabel feature 'label' \(its "
                                                 r"features: \['image'\]\)"):
        input_pipeline.TfdsIterator(builder, config, image_shape=(4, 4, 3), seed=0, global_batch_size=1,
                                    process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------------------
# The fine-tuning train transform: RandAugment strings, resume.
# ---------------------------------------------------------------------------------------------------------


def test_rand_augment_strings():
    parse = input_pipeline.parse_rand_augment
    mae = parse("rand-m9-mstd0.5-inc1")  # the official fine-tuning recipe
    assert mae == dict(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, magnitude_max=10.0,
                       ops=finetune_augment.INCREASING_OPS)
    assert parse("rand-n3-p0.2-mmax8-mstd101-inc0") == dict(  # timm defaults: m10, no noise, all 15 ops
        num_ops=3, magnitude=10.0, magnitude_std=float("inf"), prob=0.2, magnitude_max=8,
        ops=finetune_augment.DEFAULT_OPS)
    errors = {"rand-m9-w0": "section 'w0' (weighted op choice) is not supported",
              "augmix-m5": "a RandAugment string starts with 'rand'",
              "rand-m9.5": "section 'm9.5' needs an integer after 'm'",
              "rand-x1": "unknown section 'x1'; allowed: m<int>, n<int>, mstd<float>, mmax<int>, p<float>, inc<0|1>",
              "rand-m9-": "unknown section ''", "rand-inc2": "inc is 0 or 1", "rand-p1.5": "0 <= p <= 1"}
    for string, message in errors.items():
        with pytest.raises(datasets.DataError) as info:
            parse(string)
        assert str(info.value).startswith(f"config.input.rand_augment={string!r}: ") and message in str(info.value)
        assert "\n" not in str(info.value)
    # The draws the parsed settings give: uniform magnitudes in [0, m], clipped to mmax.
    draws = finetune_augment.rand_augment_draws(tf.constant([1, 2], tf.int64), num_ops=4000, magnitude=10.0,
                                                magnitude_std=float("inf"), magnitude_max=8)["magnitude"].numpy()
    assert draws.min() < 0.05 and draws.max() == 8.0 and abs(np.mean(draws == 8.0) - 0.2) < 0.03


def test_labelled_iterator_resumes_exactly(layout, tmp_path):
    """Linear-probe settings (the pretraining transform, crop_scale (0.08, 1)) with labels."""
    config = _input(tmp_path, dataset="folder", image_folder=str(layout), crop_scale=(0.08, 1.0))
    expected = [next(it) for it in [_train(config)] for _ in range(5)]
    interrupted = _train(config)
    for _ in range(3):  # 12 examples: past the first 9-example epoch
        next(interrupted)
    resumed = _train(config, state=json.loads(json.dumps(interrupted.get_state())))
    for k in (3, 4):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["images"], expected[k]["images"])
        np.testing.assert_array_equal(batch["labels"], expected[k]["labels"])


@pytest.mark.slow  # ~6 s: tracing RandAugment and RandomErasing into the tf.data map
def test_finetune_settings_reach_the_train_transform(layout, tmp_path):
    """With rand_augment and random_erasing set, each row (image and RandomErasing's box) is
    preprocess_for_finetune_train of its file with the parsed RandAugment settings, keyed by (seed, epoch, example
    id)."""
    string = "rand-m9-mstd0.5-inc1"
    config = _input(tmp_path, dataset="folder", image_folder=str(layout), rand_augment=string, random_erasing=1.0,
                    crop_scale=(0.08, 1.0))
    it = _train(config, shape=(16, 16, 3), batch=4, seed=3)
    batch = next(it)
    assert batch["erase_boxes"].shape == (4, 1, 4) and batch["images"].dtype == np.uint8
    records = list(datasets.get_builder(config).as_dataset(split="train", shuffle_files=False, decoders={
        "image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
    for row, (epoch, example_id) in enumerate(zip(it.last_epochs, it.last_example_ids)):
        expected = finetune_augment.preprocess_for_finetune_train(  # eagerly: only the drawn ops run
            tf.constant(records[example_id]["image"]), input_pipeline.example_key(3, epoch, example_id),
            image_size=(16, 16), scale=(0.08, 1.0), rand_augment_kwargs=input_pipeline.parse_rand_augment(string),
            erase_probability=1.0)
        np.testing.assert_array_equal(batch["images"][row], expected["images"].numpy())
        np.testing.assert_array_equal(batch["erase_boxes"][row], expected["erase_boxes"].numpy())
        assert expected["erase_boxes"].numpy()[0, 2] > 0  # erasing with probability 1: a box


# ---------------------------------------------------------------------------------------------------------
# Digits and synthetic labelled data.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~6-8 s under load: preparing 1,797 PNGs and three pipelines over them
def test_digits(tmp_path):
    from sklearn.datasets import load_digits
    digits = load_digits()
    config = _input(tmp_path, dataset="digits", eval_split="test", train_split="train[:10%]")
    builder = datasets.get_builder(config)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 1437, "test": 360}
    assert input_pipeline.num_classes(config) == 10

    records = {split: list(builder.as_dataset(split=split, shuffle_files=False, decoders={
        "image": tfds.decode.SkipDecoding()}).as_numpy_iterator()) for split in ("train", "test")}
    index = {split: [int(r["file_name"].decode().split("/")[1]) for r in rs] for split, rs in records.items()}
    assert sorted(index["train"] + index["test"]) == list(range(1797))  # disjoint, together all digits
    np.testing.assert_array_equal([r["label"] for r in records["test"]], digits.target[index["test"]])
    assert np.bincount(digits.target[index["test"]]).min() >= 35  # stratified: 36 +- 1 a class
    i = index["train"][7]
    grey = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
    expected = np.asarray(Image.fromarray(grey).resize((32, 32), Image.NEAREST).convert("RGB"))
    np.testing.assert_array_equal(tf.io.decode_png(records["train"][7]["image"]).numpy(), expected)

    # train[:10%] (the first 144 stored) through the pipeline, over 2 processes: class-balanced, each once.
    labels = []
    for p in range(2):
        it = _train(config, shape=(32, 32, 3), batch=144, process_index=p, process_count=2)
        batch = next(it)  # one epoch of the process's 72-example share (test's example ids come first: 0..359)
        assert it.num_examples == 144 and sorted(it.last_example_ids) == list(range(360 + 72 * p, 432 + 72 * p))
        stored = np.array(index["train"])[it.last_example_ids - 360]
        np.testing.assert_array_equal(batch["labels"], digits.target[stored])
        labels += batch["labels"].tolist()
    assert set(np.bincount(labels, minlength=10)) <= {14, 15}

    evaluation = _eval(config, shape=(32, 32, 3), batch=100)
    assert (evaluation.num_examples, evaluation.num_batches) == (360, 4)
    last = list(evaluation)[-1]
    assert last["mask"].sum() == 60 and last["images"].shape == (100, 32, 32, 3)
    np.testing.assert_array_equal(last["labels"][:60], digits.target[index["test"][300:]])


def test_synthetic_labelled_data_is_learnable_and_deterministic(tmp_path):
    config = _input(tmp_path, dataset="synthetic", synthetic_num_classes=10, synthetic_num_eval_examples=50)
    shape = (16, 16, 3)
    it = _train(config, shape=shape, batch=40)
    train = [next(it) for _ in range(5)]  # 200 examples
    images = np.concatenate([b["images"] for b in train]).reshape(200, -1)
    labels = np.concatenate([b["labels"] for b in train])
    assert set(labels) == set(range(10))
    means = np.stack([images[labels == c].mean(axis=0) for c in range(10)])

    batches = [list(_eval(config, shape=shape, batch=6, process_index=p, process_count=3)) for p in range(3)]
    assert [len(b) for b in batches] == [9, 9, 9]  # shares 17, 17, 16 in batches of 2
    rows = [(b["images"][m], b["labels"][m]) for share in batches for b in share for m in [b["mask"]]]
    eval_images = np.concatenate([r[0] for r in rows]).reshape(-1, images.shape[1])
    eval_labels = np.concatenate([r[1] for r in rows])
    assert len(eval_labels) == 50 and len({x.tobytes() for x in eval_images}) == 50
    whole = list(_eval(config, shape=shape, batch=50))  # the same examples in the same order, one process
    np.testing.assert_array_equal(whole[0]["images"].reshape(50, -1), eval_images)
    nearest_mean = np.argmin(((eval_images[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest_mean == eval_labels) > 0.6  # chance: 0.1

    halves = [_train(config, shape=shape, batch=40, process_index=p, process_count=2) for p in range(2)]
    for p, half in enumerate(halves):
        batch = next(half)
        np.testing.assert_array_equal(batch["labels"], train[0]["labels"][20 * p:20 * p + 20])
        np.testing.assert_array_equal(batch["images"], train[0]["images"][20 * p:20 * p + 20])
    resumed = _train(config, shape=shape, batch=40, state={"batch_index": 4})
    np.testing.assert_array_equal(next(resumed)["labels"], train[4]["labels"])
