"""Tests of the input pipeline (input_pipeline, augment, datasets): real tfds datasets built from image files
written here, compared by value."""

import io
import json
import logging
import math
import os
import time

import ml_collections
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import vit_base
from mae_jax import augment, datasets, input_pipeline, models, pixels

PHOTOS = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]


def _photo(i: int, height: int, width: int) -> np.ndarray:
    """A real photograph's crop [height, width, 3] uint8 (natural content, so JPEG behaves as on ImageNet)."""
    photo = PHOTOS[i % len(PHOTOS)]
    top, left = (37 * i) % (photo.shape[0] - height), (53 * i) % (photo.shape[1] - width)
    return photo[top:top + height, left:left + width]


def _write(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, quality=92) if path.lower().endswith((".jpg", ".jpeg")) else \
        Image.fromarray(image).save(path)


def _config(tmp_path, image_folder="", dataset="folder", image_size=(32, 48), seed=0):
    config = vit_base.get_config()
    config.model = ml_collections.ConfigDict(models.variant("test/8", image_size=image_size))
    config.input.dataset = dataset
    config.input.image_folder = str(image_folder)
    config.input.data_dir = str(tmp_path / "tfds")
    config.seed = seed
    config.input.shuffle_buffer = 64
    return config


def _image_shape(config):
    return models.MaskedAutoencoderViT(**config.model).image_shape


def _iterator(config, *, batch=4, process_index=0, process_count=1, state=None):
    return input_pipeline.create_train_iterator(config.input, image_shape=_image_shape(config), seed=config.seed,
                                                global_batch_size=batch, process_index=process_index,
                                                process_count=process_count, state=state)


def _eval_images(config, num_images):
    return input_pipeline.load_eval_images(config.input, image_shape=_image_shape(config), seed=config.seed,
                                           num_images=num_images)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """root/cat/*.jpg (JPEG) and root/dog/*.png (PNG) of various sizes, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("classes")
    for i in range(6):
        _write(str(root / "cat" / f"cat_{i}.jpg"), _photo(i, 40 + 7 * i, 90 - 5 * i))
    for i in range(5):
        _write(str(root / "dog" / f"dog_{i}.PNG"), _photo(i + 6, 70 - 3 * i, 35 + 9 * i))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def _prepare_sharded(config, num_shards):
    """Prepares the folder dataset with several shard files (as a large folder would have)."""
    builder = datasets.ImageFolder(folder=config.input.image_folder, data_dir=config.input.data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards))


# ---------------------------------------------------------------------------------------------------------
# Sources: folders (class and flat, JPEG and PNG), corrupt files, errors.
# ---------------------------------------------------------------------------------------------------------


def test_class_folder_batches(class_folder, tmp_path):
    config = _config(tmp_path, class_folder)
    it = _iterator(config, batch=8)
    assert it.num_examples == 11 and it.num_skipped_files == 0
    builder = datasets.get_builder(config.input)
    assert builder.info.features["label"].names == ["cat", "dog"]

    batch = next(it)
    assert set(batch) == {"images"}
    images = batch["images"]
    assert images.shape == (8, 32, 48, 3) and images.dtype == np.uint8  # normalised on the device
    assert np.all(images.min(axis=(0, 1, 2)) < 10)  # photographs reach near black ...
    assert np.all(images.max(axis=(0, 1, 2)) > 160)  # ... and near white
    assert len(set(it.last_example_ids)) == 8

    # Every row is exactly the augmentation of its file's own bytes (stored as they were, not re-encoded),
    # keyed by (seed, epoch, example id).
    records = list(builder.as_dataset(split="train", shuffle_files=False,
                                      decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
    for row, (epoch, example_id) in enumerate(zip(it.last_epochs, it.last_example_ids)):
        record = records[example_id]
        with open(class_folder / record["file_name"].decode(), "rb") as f:
            encoded = f.read()
        assert encoded == record["image"]
        label = "cat" if record["file_name"].decode().startswith("cat") else "dog"
        assert builder.info.features["label"].int2str(record["label"]) == label
        expected = augment.preprocess_for_train(
            tf.constant(encoded), input_pipeline.example_key(0, epoch, example_id), image_size=(32, 48),
            num_channels=3)
        np.testing.assert_array_equal(images[row], expected.numpy())


def test_flat_folder(tmp_path):
    root = tmp_path / "flat photos"
    for i in range(4):
        _write(str(root / f"{i}.jpeg"), _photo(i, 60, 80))
        _write(str(root / f"{i}.png"), _photo(i + 4, 50, 50))
    config = _config(tmp_path, root, image_size=(24, 24))
    it = _iterator(config, batch=8)
    assert it.num_examples == 8
    assert datasets.get_builder(config.input).info.features["label"].names == ["flat photos"]
    images = next(it)["images"]
    assert images.shape == (8, 24, 24, 3) and images.dtype == np.uint8
    assert sorted(it.last_example_ids) == list(range(8))  # batch == dataset: one whole epoch


def test_corrupt_files_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "mixed"
    for i in range(3):
        _write(str(root / "a" / f"{i}.jpg"), _photo(i, 40, 40))
    good = io.BytesIO()
    Image.fromarray(_photo(5, 64, 64)).save(good, format="JPEG")
    (root / "a" / "truncated.jpg").write_bytes(good.getvalue()[:300])
    (root / "b").mkdir()
    (root / "b" / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "b" / "empty.jpg").write_bytes(b"")
    caplog.set_level(logging.WARNING)
    it = _iterator(_config(tmp_path, root), batch=3)
    assert it.num_examples == 3 and it.num_skipped_files == 3
    metadata = datasets.get_builder(_config(tmp_path, root).input).info.metadata
    assert sorted(metadata["skipped_files"]) == ["a/truncated.jpg", "b/empty.jpg", "b/noise.png"]
    assert "3 image files could not be decoded" in caplog.text
    assert "Skipping unreadable image" in caplog.text and "truncated.jpg" in caplog.text
    assert next(it)["images"].dtype == np.uint8


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"image_folder=.*empty' holds no images: expected <class>/<image>"):
        _iterator(_config(tmp_path, tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"image_folder=.*nowhere' is not a directory"):
        _iterator(_config(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r'dataset="folder" needs config.input.image_folder'):
        _iterator(_config(tmp_path, ""))


def test_unprepared_tfds_dataset_is_a_one_line_error(tmp_path):
    config = _config(tmp_path, dataset="imagenet2012")
    start = time.time()
    with pytest.raises(datasets.DatasetNotPreparedError) as info:
        _iterator(config)
    assert time.time() - start < 10  # no download attempt
    message = str(info.value)
    data_dir = config.input.data_dir
    assert "\n" not in message
    assert f"{data_dir}/downloads/manual" in message and "ILSVRC2012_img_train.tar" in message
    assert f"`tfds build imagenet2012 --data_dir={data_dir}`" in message

    with pytest.raises(datasets.DatasetNotPreparedError, match=f"run `tfds build mnist --data_dir={data_dir}`"):
        _iterator(_config(tmp_path, dataset="mnist"))
    with pytest.raises(ValueError, match="dataset 'no_such_dataset' is not known: use 'demo', 'folder'"):
        _iterator(_config(tmp_path, dataset="no_such_dataset"))


# ---------------------------------------------------------------------------------------------------------
# RandomResizedCrop: the sampled boxes themselves.
# ---------------------------------------------------------------------------------------------------------


def _torchvision_get_params(height, width, u_area, u_log_ratio, u_top, u_left, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params (v0.20), its random draws replaced by uniforms.

    Returns the box (top, left, height, width) and whether it is the central-crop fallback.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area[k])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_log_ratio[k])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u_top * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = int(u_left * (width - w + 1))
            return (i, j, h, w), False
    in_ratio = float(width) / float(height)  # fallback to central crop
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return ((height - h) // 2, (width - w) // 2, h, w), True


def test_crop_box_is_torchvisions_algorithm():
    rng = np.random.default_rng(0)
    fallbacks = 0
    for trial in range(400):
        if trial % 4:
            height, width = (int(n) for n in rng.integers(1, 600, size=2))
        else:  # extreme aspect ratios, where every attempt may fail
            height, width = int(rng.integers(1, 30)), int(rng.integers(200, 900))
            height, width = (height, width) if trial % 8 else (width, height)
        u = rng.uniform(size=22)
        scale, ratio = ((0.2, 1.0), (3 / 4, 4 / 3)) if trial % 3 else ((0.08, 1.0), (0.5, 2.0))
        expected, fallback = _torchvision_get_params(height, width, u[:10], u[10:20], u[20], u[21], scale, ratio)
        got = augment.crop_box_from_uniforms(height, width, u[:10], u[10:20], u[20], u[21], scale, ratio)
        assert tuple(got.numpy()) == expected, (height, width)
        fallbacks += fallback
    assert 30 < fallbacks < 200  # both branches exercised


def test_sampled_boxes_respect_scale_and_ratio():
    height, width = 375, 500
    boxes = np.stack([augment.sample_crop_box(height, width, tf.constant([7, k], tf.int64)).numpy()
                      for k in range(1000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # Sizes are whole pixels rounded from the sampled real ones: bounds hold within half a pixel.
    area = height * width
    assert ((h + 0.5) * (w + 0.5) >= 0.2 * area).all() and ((h - 0.5) * (w - 0.5) <= 1.0 * area).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    # ... and fill their ranges: the area fraction spans [0.2, 1], the log aspect ratio is uniform.
    fraction, log_aspect = h * w / area, np.log(w / h)
    assert fraction.min() < 0.21 and fraction.max() > 0.95
    assert log_aspect.min() < np.log(3 / 4) + 0.02 and log_aspect.max() > np.log(4 / 3) - 0.02
    # Boxes of under half the image fit at every aspect ratio, so theirs is uniform; larger ones lean to the
    # image's own aspect (attempts that do not fit are redrawn), as in torchvision.
    assert abs(np.median(log_aspect[fraction < 0.5])) < 0.04
    assert np.median(log_aspect[fraction > 0.8]) > 0.1
    # Corners are uniform over the positions that fit: not always central.
    assert len(set(top.tolist())) > 100 and len(set(left.tolist())) > 100

    # A 10 x 400 strip: no attempt fits, so the central crop clamped to the largest ratio.
    strip = augment.sample_crop_box(10, 400, tf.constant([0, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(strip, [0, (400 - 13) // 2, 10, 13])


def test_crop_while_decoding_equals_decode_then_crop():
    """The JPEG path (decode_and_crop_jpeg) and the PNG path (decode, then crop) give identical images."""
    jpeg = io.BytesIO()
    Image.fromarray(_photo(1, 375, 500)).save(jpeg, format="JPEG", quality=90)
    pixels = tf.io.decode_jpeg(jpeg.getvalue(), channels=3)
    png = tf.io.encode_png(pixels).numpy()
    for k in range(8):
        key = input_pipeline.example_key(3, 0, k)
        from_jpeg = augment.preprocess_for_train(tf.constant(jpeg.getvalue()), key, image_size=(64, 80),
                                                        num_channels=3)
        from_png = augment.preprocess_for_train(tf.constant(png), key, image_size=(64, 80), num_channels=3)
        np.testing.assert_array_equal(from_jpeg.numpy(), from_png.numpy())


def test_bicubic_resize_matches_pil():
    """Resizing is PIL's bicubic (what torchvision applies to PIL images), up to PIL's uint8 rounding."""
    image = _photo(0, 300, 400)
    ours = augment.center_crop(tf.constant(image), (60, 80), 3).numpy()  # normalised (reconstructions)
    pil = np.asarray(Image.fromarray(image).resize((80, 60), Image.BICUBIC), np.float32) / 255.0
    pil = (pil - pixels.IMAGENET_MEAN) / pixels.IMAGENET_STD
    diff = np.abs(ours - pil) * pixels.IMAGENET_STD * 255  # in 8-bit levels
    assert diff.mean() < 0.5 and diff.max() < 6



@pytest.mark.parametrize("shape", [(32, 32, 3), (7, 5, 1)])
def test_resize_to_the_same_size_is_skipped_and_is_the_identity(shape):
    """`resize_bicubic` skips the resize of a crop already of the output size: the same values as the resize
    (which is exactly the identity there), and the resize still runs for any other size."""
    image = tf.constant(np.random.default_rng(0).integers(0, 256, shape, np.uint8))
    reference = tf.image.resize(tf.cast(image, tf.float32), shape[:2], method="bicubic", antialias=True)
    ours = augment.resize_bicubic(image, shape[:2])
    assert ours.shape == shape
    np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    np.testing.assert_array_equal(ours.numpy(), image.numpy().astype(np.float32))
    smaller = (shape[0] - 2, shape[1] - 1)
    np.testing.assert_array_equal(
        augment.resize_bicubic(image, smaller).numpy(),
        tf.image.resize(tf.cast(image, tf.float32), smaller, method="bicubic", antialias=True).numpy())
    assert not np.array_equal(augment.resize_bicubic(image, smaller).numpy(), image.numpy()[:smaller[0], :smaller[1]])

# ---------------------------------------------------------------------------------------------------------
# Processes, determinism, resume.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(class_folder, tmp_path_factory):
    """The class folder (11 images) prepared as 3 shard files."""
    config = _config(tmp_path_factory.mktemp("sharded"), class_folder)
    _prepare_sharded(config, num_shards=3)
    assert len(datasets.get_builder(config.input).info.splits["train"].file_instructions) == 3
    return config


def _ids(it, num_batches):
    out = []
    for _ in range(num_batches):
        next(it)
        out += list(zip(it.last_epochs.tolist(), it.last_example_ids.tolist()))
    return out


def test_two_processes_read_disjoint_shares_covering_the_split(sharded):
    shares, states = [], []
    for process_index in range(2):
        it = _iterator(sharded, batch=2, process_index=process_index, process_count=2)
        assert it.num_examples == 11 and it.local_num_examples == (6, 5)[process_index]
        seen = _ids(it, 15)  # 15 examples: several epochs of a 5- or 6-example share
        share = {i for e, i in seen if e == 0}
        assert len([i for e, i in seen if e == 0]) == len(share) == it.local_num_examples  # once per epoch
        assert {i for e, i in seen if e == 1} == share  # the same share every epoch, in a new order
        assert [i for e, i in seen if e == 1] != [i for e, i in seen if e == 0]
        shares.append(share)
        states.append(it.get_state())
    assert states[0] == states[1]  # one position for the checkpoint, whichever process writes it
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(11))


def test_same_seed_same_batches_other_seed_other_batches(sharded):
    first = [next(it)["images"] for it in [_iterator(sharded)] for _ in range(3)]
    again = [next(it)["images"] for it in [_iterator(sharded)] for _ in range(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other_config = ml_collections.ConfigDict(sharded.to_dict())
    other_config.seed = 1
    other = _iterator(other_config)
    other_images = [next(other)["images"] for _ in range(3)]
    assert all(np.abs(a - b).mean() > 0.05 for a, b in zip(first, other_images))


@pytest.mark.parametrize("stop_after", [2, 3, 5])  # mid-epoch; mid-batch epoch boundary; just past one
def test_resume_continues_the_same_sequence(sharded, stop_after):
    reference = _iterator(sharded, batch=4)
    expected = [next(reference)["images"] for _ in range(stop_after + 4)]  # 4 examples a batch, 11 an epoch

    interrupted = _iterator(sharded, batch=4)
    for _ in range(stop_after):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    assert state["examples_per_process"] == 4 * stop_after
    resumed = _iterator(sharded, batch=4, state=state)
    for k in range(4):
        np.testing.assert_array_equal(next(resumed)["images"], expected[stop_after + k])
    assert resumed.get_state()["examples_per_process"] == 4 * (stop_after + 4)


def test_epochs_are_reshuffled_permutations(sharded):
    it = _iterator(sharded, batch=11)  # one epoch per batch
    epochs = [(next(it), it.last_example_ids.tolist())[1] for _ in range(3)]
    assert all(sorted(e) == list(range(11)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


# ---------------------------------------------------------------------------------------------------------
# The demo source, eval images, synthetic.
# ---------------------------------------------------------------------------------------------------------


def test_demo_photographs_offline(tmp_path):
    config = _config(tmp_path, dataset="demo", image_size=64)
    it = _iterator(config, batch=16)
    n_train = len(datasets.TRAIN_PHOTOS) * datasets.DEMO_TRAIN_CROPS_PER_PHOTO
    assert it.num_examples == n_train
    images = next(it)["images"]
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    # Photographs, not noise: neighbouring pixels are strongly correlated.
    images = images.astype(np.float32)
    dx = np.abs(np.diff(images, axis=2)).mean()
    assert dx < 0.3 * images.std()

    builder = datasets.get_builder(config.input)
    names = lambda split: {r["file_name"].decode().split("/")[0] for r in builder.as_dataset(split=split)
                           .as_numpy_iterator()}
    assert names("validation") == {"chelsea", "coffee"}
    assert not names("validation") & names("train")

    eval_images = _eval_images(config, 8)
    assert eval_images.shape == (8, 64, 64, 3) and eval_images.dtype == np.float32
    np.testing.assert_array_equal(eval_images, _eval_images(config, 8))
    with pytest.raises(ValueError, match="20 eval images asked for, but mae_demo validation has only 16"):
        _eval_images(config, 20)


def test_eval_images_are_center_crops_from_train_when_no_eval_split(class_folder, tmp_path, caplog):
    config = _config(tmp_path, class_folder, image_size=(24, 48))
    caplog.set_level(logging.WARNING)
    images = _eval_images(config, 3)
    assert "has no split 'validation'" in caplog.text
    builder = datasets.get_builder(config.input)
    first = next(builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator())["image"]
    h, w = first.shape[:2]
    ch, cw = min(h, round(w / 2)), min(w, round(h * 2))  # the largest central box of aspect 1:2
    top, left = (h - ch) // 2, (w - cw) // 2
    pil = np.asarray(Image.fromarray(first[top:top + ch, left:left + cw]).resize((48, 24), Image.BICUBIC),
                     np.float32) / 255.0
    pil = (pil - pixels.IMAGENET_MEAN) / pixels.IMAGENET_STD
    assert np.abs(images[0] - pil).mean() * 255 * 0.226 < 1.0  # within a grey level on average


def test_synthetic_rows_are_a_function_of_seed_batch_and_global_row(tmp_path):
    config = _config(tmp_path, dataset="synthetic", image_size=16)
    whole = _iterator(config, batch=4)
    halves = [_iterator(config, batch=4, process_index=i, process_count=2) for i in range(2)]
    for _ in range(2):
        np.testing.assert_array_equal(next(whole)["images"], np.concatenate([next(h)["images"] for h in halves]))
    resumed = _iterator(config, batch=4, state=json.loads(json.dumps(whole.get_state())))
    np.testing.assert_array_equal(next(resumed)["images"], next(whole)["images"])
    assert _eval_images(config, 2).shape == (2, 16, 16, 3)


def test_hflip_probability_0_never_flips_and_1_always_does():
    """input.hflip (digits set 0): the same key gives the same crop; only the flip differs."""
    image = np.random.default_rng(0).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    png = tf.io.encode_png(image)
    for seed in range(4):
        key = tf.constant([seed, 1], tf.int64)
        never, always, default = (augment.preprocess_for_train(png, key, image_size=(32, 32), num_channels=3,
                                                               hflip=p).numpy() for p in (0.0, 1.0, 0.5))
        np.testing.assert_array_equal(always, never[:, ::-1])
        assert np.array_equal(default, never) or np.array_equal(default, always)
    square = image[:, :32]  # the digits' train transform: the whole image as it is
    transform = input_pipeline.train_transform(ml_collections.ConfigDict({
        "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "hflip": 0.0}), (32, 32), 3)
    for seed in range(4):
        np.testing.assert_array_equal(transform(tf.io.encode_png(square), tf.constant([seed, 1], tf.int64)).numpy(),
                                      square)
    with pytest.raises(input_pipeline.DataError, match="hflip"):
        input_pipeline.train_transform(ml_collections.ConfigDict({"crop_scale": (1.0, 1.0),
                                                                  "crop_ratio": (1.0, 1.0), "hflip": 2.0}), (32, 32), 3)


def test_autotune_only_when_asked_and_the_batches_do_not_depend_on_it(sharded):
    # tf.data's autotuning thread can hold the GIL for tens of seconds when an iterator is deleted (the end of a
    # run, every evaluation): off by default, with one parallel call per core (or config.input.threads).
    assert not input_pipeline._options(0, 2).autotune.enabled and input_pipeline._options(0, -1).autotune.enabled
    assert input_pipeline._parallelism(3, 2) == 3 and input_pipeline._parallelism(0, 2) == len(os.sched_getaffinity(0))
    default = [next(it)["images"] for it in [_iterator(sharded)] for _ in range(3)]
    tuned_config = ml_collections.ConfigDict(sharded.to_dict())
    tuned_config.input.prefetch_batches, tuned_config.input.threads = -1, 1
    tuned = [next(it)["images"] for it in [_iterator(tuned_config)] for _ in range(3)]
    for a, b in zip(default, tuned):
        np.testing.assert_array_equal(a, b)
