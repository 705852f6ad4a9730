"""Tests of mae_jax.datasets' image folders: which files count, symbolic links (cycles, dangling, outside the
folder) followed once, and unreadable entries skipped and listed like corrupt files, on real files."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mae_jax import datasets


def _image(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _config(folder, tmp_path):
    return ml_collections.ConfigDict(dict(dataset="folder", image_folder=str(folder), data_dir=str(tmp_path / "tfds")))


@pytest.fixture
def linked_folder(tmp_path):
    """root/ with 3 images of its own, one outside reached by a link, and every kind of awkward entry."""
    root = tmp_path / "root"
    _image(root / "cat" / "a.jpg", 0)
    _image(root / "cat" / "b.png", 1)
    _image(root / "c.JPEG", 2)
    _image(tmp_path / "elsewhere" / "outside.png", 3)
    os.symlink("..", root / "cat" / "loop")  # a cycle: root/cat/loop/cat/loop/...
    os.symlink(tmp_path / "elsewhere" / "outside.png", root / "cat" / "outside.png")  # a file outside: counted
    os.symlink(tmp_path / "elsewhere", root / "more")  # a directory outside: walked, its file already counted
    os.symlink("../c.JPEG", root / "cat" / "alias.jpg")  # a second path to c.JPEG: counted once
    os.symlink(tmp_path / "nowhere.jpg", root / "gone.jpg")  # dangling
    os.symlink("self.png", root / "self.png")  # a link to itself: stat fails (ELOOP)
    os.mkfifo(root / "pipe.jpg")  # named like an image, but reading it would block
    _image(root / ".hidden.jpg", 4)  # hidden file: ignored
    _image(root / ".thumbnails" / "d.png", 5)  # hidden directory: ignored
    (root / "notes.txt").write_text("not an image")
    return root


EXPECTED_SKIPS = {"gone.jpg": "dangling symbolic link to {tmp}/nowhere.jpg", "pipe.jpg": "not a regular file",
                  "self.png": "Too many levels of symbolic links"}


def test_links_followed_once_and_broken_entries_listed(linked_folder, tmp_path):
    listing = datasets.list_image_files(str(linked_folder))
    assert listing.files == ["c.JPEG", "cat/a.jpg", "cat/b.png", "cat/outside.png"]
    assert listing.skipped == {k: v.format(tmp=tmp_path) for k, v in EXPECTED_SKIPS.items()}
    # Prepared for real: the images once each, the broken entries counted and listed like corrupt files.
    builder = datasets.get_builder(_config(linked_folder, tmp_path))
    assert builder.info.splits["train"].num_examples == 4
    assert datasets.num_skipped_files(builder) == 3
    assert list(builder.info.metadata["skipped_files"]) == sorted(EXPECTED_SKIPS)
    names = sorted(r["file_name"].decode() for r in builder.as_dataset(split="train").as_numpy_iterator())
    assert names == listing.files
    assert builder.info.features["label"].names == ["cat", "root"]


def test_unlistable_directory_is_skipped_and_listed(tmp_path, monkeypatch):
    """A directory that cannot be listed (permission denied; simulated, since root reads any directory)."""
    root = tmp_path / "root"
    _image(root / "ok" / "a.png", 0)
    _image(root / "locked" / "b.png", 1)
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = datasets.list_image_files(str(root))
    assert listing.files == ["ok/a.png"]
    assert listing.skipped == {"locked" + os.sep: "directory not readable: Permission denied"}


def test_folder_of_broken_entries_only_is_a_clear_error(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "nowhere.png", root / "gone.png")
    with pytest.raises(datasets.DataError) as error:
        datasets.list_image_files(str(root))
    assert str(error.value) == (
        f"config.input.image_folder={str(root)!r} holds no images: 1 unreadable entries, e.g. gone.png (dangling "
        f"symbolic link to {tmp_path}/nowhere.png): expected <class>/<image> or <image> files ending in .jpg, "
        ".jpeg, .png (any case)")


def test_repaired_link_changes_the_fingerprint(linked_folder, tmp_path):
    before = datasets.ImageFolder(folder=str(linked_folder), data_dir=str(tmp_path / "tfds")).builder_config.name
    _image(tmp_path / "nowhere.jpg", 9)  # the dangling link now points at an image
    after = datasets.ImageFolder(folder=str(linked_folder), data_dir=str(tmp_path / "tfds"))
    assert after.builder_config.name != before and "gone.jpg" in after.files


def test_png_colour_profile_is_dropped_and_the_pixels_kept(tmp_path):
    """A PNG carrying an ICC profile (iCCP chunk: libpng warns on each decode of one it deems an incorrect sRGB
    profile) is stored without the chunk: the same pixels, the other chunks intact; JPEGs and PNGs without a
    profile are returned unchanged."""
    import io

    import tensorflow as tf
    from PIL import ImageCms

    pixels = np.random.default_rng(0).integers(0, 256, (12, 9, 3), np.uint8)
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with_profile, plain, jpeg = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(with_profile, "PNG", icc_profile=profile)
    Image.fromarray(pixels).save(plain, "PNG")
    Image.fromarray(pixels).save(jpeg, "JPEG", icc_profile=profile)
    data = with_profile.getvalue()
    assert b"iCCP" in data
    stripped = datasets.strip_png_iccp(data)
    assert b"iCCP" not in stripped and len(data) - len(stripped) > len(profile) // 4  # compressed profile gone
    assert "icc_profile" not in Image.open(io.BytesIO(stripped)).info
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stripped))), pixels)  # PIL checks the CRCs
    np.testing.assert_array_equal(tf.io.decode_image(stripped, channels=3).numpy(), pixels)
    assert datasets.check_image(stripped) is None
    for unchanged in (plain.getvalue(), jpeg.getvalue(), data[:60]):  # data[:60]: a PNG cut inside its iCCP
        assert datasets.strip_png_iccp(unchanged) == unchanged


def test_folder_builders_do_not_warn_about_their_own_config(tmp_path, caplog):
    """tfds warns "Using custom data configuration" for any config its class does not list; a folder's config
    (named after its fingerprint) is ours by design: preparing and re-opening it logs no such warning, and the
    copy still lives under <name>_<fingerprint>."""
    root = tmp_path / "photos"
    _image(root / "a.png", 0)
    with caplog.at_level("WARNING"):
        first = datasets.get_builder(_config(root, tmp_path))  # constructs, prepares, constructs again
        again = datasets.get_builder(_config(root, tmp_path))
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()], caplog.text
    assert first.builder_config.name == again.builder_config.name
    assert first.builder_config.name.startswith("photos_") and len(first.builder_config.name) == len("photos_") + 12
    # The filter is removed again afterwards: absl's warnings still reach the log.
    from absl import logging as absl_logging

    with caplog.at_level("WARNING"):
        absl_logging.warning("Using custom data configuration: elsewhere")
    assert "Using custom data configuration: elsewhere" in caplog.text
