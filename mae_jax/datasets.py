"""Data sources as tfds builders: the tfds catalog, a local image folder and the offline demo photographs.

`get_builder(config)` returns a prepared `tfds.core.DatasetBuilder` for `config.input.dataset`, so that the input
pipeline reads every source the same way (TFRecord shards, tfds splits and per-process sub-splits):

  - a tfds name ("imagenet2012", ...): must have been prepared with `tfds build` (nothing is downloaded here);
  - "folder": `config.input.image_folder`, either `root/<class>/<image>` or a flat folder of JPEG and PNG files
    (one "train" split, labels from the first-level directories), or the official ImageNet layout
    `root/train/<class>/<image>` with `root/val/<class>/<image>` (or `validation/`): splits "train" and
    "validation", class ids from the sorted class names of train/, as torchvision's ImageFolder.
    It is copied once into TFRecords under the tfds `data_dir`, keyed by a fingerprint of the file listing
    and the layout (a changed folder is prepared again). Every file is decoded once while preparing:
    unreadable or corrupt files are skipped, counted, logged and listed in the metadata, so training never
    meets one;
  - "demo": crops cut from the photographs that scikit-image ships in its wheel (offline, a few seconds to
    prepare). Its "validation" split holds crops of two photographs the "train" split never shows;
  - "digits": scikit-learn's 1,797 8x8 handwritten digits (shipped in its wheel, offline), 10 classes, as
    32x32 RGB PNGs; a fixed stratified "train" (1,437) / "test" (360) split. See `Digits`.

Which files of a folder count: regular files whose names end in .jpg, .jpeg or .png (any case), at any depth.
Names starting with "." (hidden files, and everything inside hidden directories such as .git or .thumbnails)
are ignored, like other files. Symbolic links are followed, to files and directories inside or outside the
folder; each directory is walked once and each file counted once, whatever number of paths lead to it (a link
back up the tree, a cycle, ends there; a file reached through a link keeps the first path in sorted order,
real directories before links). Entries that cannot be read (a dangling link, a link loop, permission denied,
a directory that cannot be listed, a FIFO named like an image) are skipped like corrupt files: logged, counted
and listed in the prepared copy's metadata.json; they never stop preparation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import inspect
import io
import logging as std_logging
import os
import re
import stat
import time
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_MAX_LISTED_SKIPS = 1000  # skipped files named in the dataset metadata; all are counted


class DataError(ValueError):
    """A data setting that cannot work (unknown dataset, missing or empty folder, ...): a one-line message
    naming the setting and what to do."""


class DatasetNotPreparedError(DataError):
    """A tfds dataset that must be prepared (downloaded and converted) before training."""


def get_builder(config) -> tfds.core.DatasetBuilder:
    """The prepared tfds builder of `config.input.dataset` (preparing "folder" and "demo" on first use)."""
    name, data_dir = config.dataset, config.data_dir
    if name == "folder":
        if not config.image_folder:
            raise DataError('dataset="folder" needs config.input.image_folder: the folder holding the images')
        return _prepared(ImageFolder(folder=config.image_folder, data_dir=data_dir))
    if name == "demo":
        return _prepared(DemoPhotos(data_dir=data_dir))
    if name == "digits":
        return _prepared(Digits(data_dir=data_dir))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"dataset {name!r} is not known: use 'demo', 'folder', 'digits', 'synthetic' or a tfds "
                        "dataset name such as 'imagenet2012'") from None
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_how_to_prepare(builder))
    return builder


def _how_to_prepare(builder: tfds.core.DatasetBuilder) -> str:
    root = builder.data_dir_root
    if builder.name == "imagenet2012":
        return (f"imagenet2012 is not prepared in {root}: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                f"(from image-net.org) in {os.path.join(root, 'downloads', 'manual')} and run "
                f"`tfds build imagenet2012 --data_dir={root}` (or set config.input.data_dir to where it is prepared)")
    manual = " (see its tfds catalog page for files to download by hand)" if builder.MANUAL_DOWNLOAD_INSTRUCTIONS \
        else ""
    return (f"{builder.name} is not prepared in {root}: run `tfds build {builder.name} --data_dir={root}`{manual} "
            "(or set config.input.data_dir to where it is prepared)")


def _prepared(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    if builder.is_prepared():
        return builder
    logging.info("Preparing %s as TFRecords in %s (once; config.input.data_dir puts it elsewhere).", builder.name,
                 builder.data_path)
    start = time.perf_counter()
    try:
        # tfds prints "Downloading and preparing dataset Unknown size" and progress bars although nothing is
        # downloaded: only with absl's -v 1.
        with contextlib.ExitStack() as quiet:
            if logging.get_verbosity() < 1:
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))  # tqdm's progress bars
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        logging.info("Prepared %s in %.1f s.", builder.name, time.perf_counter() - start)
    except (OSError, tf.errors.OpError):
        # Several processes may prepare the same dataset into a shared data_dir; the first one wins.
        if not type(builder)(**builder._original_state).is_prepared():
            raise
    return type(builder)(**builder._original_state)  # reloads split sizes and metadata from disk


# ---------------------------------------------------------------------------------------------------------
# A local folder of images.
# ---------------------------------------------------------------------------------------------------------


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder defined here rather than in the tfds catalog (registered nowhere, downloads nothing)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 finds a builder's source through `importlib_resources`, which it only declares for
        # Python < 3.9 (tensorflow/datasets#11212); the path is only used to look for download checksums.
        return epath.Path(inspect.getfile(cls))


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """What `list_image_files` found under a folder."""

    files: list[str]  # paths relative to the folder, sorted, one per distinct file
    stats: list[tuple[int, int]]  # (size, mtime_ns) of each file, for the fingerprint
    skipped: dict[str, str]  # relative path -> why it cannot be read (dangling link, permission denied, ...)


def list_image_files(folder: str, shown_as: str | None = None) -> FolderListing:
    """The JPEG and PNG files under `folder`, at any depth, by the rules of the module docstring.

    Symbolic links are followed, each directory and each file once (by identity, so a link back up the tree
    ends the walk there); entries that cannot be listed or stat'ed are returned in `skipped`, not raised.
    Errors name `shown_as` (default: config.input.image_folder=`folder`).
    """
    shown_as = shown_as or f"config.input.image_folder={folder!r}"
    if not os.path.isdir(folder):
        raise DataError(f"{shown_as} is not a directory")
    files, stats, skipped = [], [], {}
    seen_dirs, seen_files = set(), set()

    def relative(path):
        return os.path.normpath(os.path.relpath(path, folder))

    def unlistable(error: OSError):  # os.walk could not read a directory
        skipped[relative(error.filename) + os.sep] = f"directory not readable: {error.strerror or error}"

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable, followlinks=True):
        try:
            directory = os.stat(dirpath)
        except OSError as e:  # removed or re-linked since its parent was listed
            unlistable(e)
            dirnames[:] = []
            continue
        if (directory.st_dev, directory.st_ino) in seen_dirs:  # reached again through a link: a cycle or alias
            dirnames[:] = []
            continue
        seen_dirs.add((directory.st_dev, directory.st_ino))
        # Real directories before links at each level, so that a file keeps its own path when it has two.
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")),
                             key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path, relpath = os.path.join(dirpath, name), relative(os.path.join(dirpath, name))
            try:
                st = os.stat(path)
            except OSError as e:
                dangling = isinstance(e, FileNotFoundError) and os.path.islink(path)
                skipped[relpath] = f"dangling symbolic link to {os.readlink(path)}" if dangling else \
                    (e.strerror or str(e))
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped[relpath] = "not a regular file"
            elif (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                files.append(relpath)
                stats.append((st.st_size, st.st_mtime_ns))
    if not files:
        found = f": {len(skipped)} unreadable entries, e.g. {next(iter(skipped))} ({next(iter(skipped.values()))})" \
            if skipped else ""
        raise DataError(f"{shown_as} holds no images{found}: expected <class>/<image> or <image> "
                        f"files ending in {', '.join(IMAGE_EXTENSIONS)} (any case)")
    order = sorted(range(len(files)), key=files.__getitem__)
    return FolderListing([files[i] for i in order], [stats[i] for i in order], dict(sorted(skipped.items())))


def _class_of(relpath: str, folder: str) -> str:
    """The first directory below the root; files directly in the root take the root's own name."""
    parts = relpath.split(os.sep)
    return parts[0] if len(parts) > 1 else os.path.basename(os.path.abspath(folder))


def _fingerprint(folder: str, listing: FolderListing, layout: str = "") -> str:
    digest = hashlib.sha1(os.path.abspath(folder).encode())
    if layout:  # the same files read as other splits and classes are another dataset
        digest.update(f"layout\0{layout}\n".encode())
    for f, (size, mtime_ns) in zip(listing.files, listing.stats):
        digest.update(f"{f}\0{size}\0{mtime_ns}\n".encode())
    for f, reason in listing.skipped.items():  # a repaired link or permission prepares the folder again
        digest.update(f"{f}\0{reason}\n".encode())
    return digest.hexdigest()[:12]


VALIDATION_FOLDERS = ("val", "validation")  # the official layout's held-out split, read as "validation"


def split_folders(folder: str) -> dict[str, str] | None:
    """{"train": "train", "validation": "val"} (or "validation") when `folder` holds the official layout's
    train/ and val/ (or validation/) directories; None for any other folder (one "train" split)."""
    present = [d for d in VALIDATION_FOLDERS if os.path.isdir(os.path.join(folder, d))]
    if not os.path.isdir(os.path.join(folder, "train")) or not present:
        return None
    if len(present) > 1:
        raise DataError(f"config.input.image_folder={folder!r} holds both val/ and validation/: keep one, the "
                        "official layout is train/<class>/<image> and val/<class>/<image>")
    return {"train": "train", "validation": present[0]}


def _split_listing(folder: str, split_dirs: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, str],
                                                                     FolderListing]:
    """The official layout's files per split and class per file (paths relative to `folder`), and the
    combined listing (for the fingerprint); a file outside a class folder or a class train/ lacks: DataError."""
    files, labels, stats, skipped = {}, {}, [], {}
    classes = {}
    for split, directory in split_dirs.items():
        listing = list_image_files(os.path.join(folder, directory),
                                   shown_as=f"config.input.image_folder={folder!r}: its {directory}/ folder")
        loose = [f for f in listing.files if os.sep not in f]
        if loose:
            raise DataError(f"config.input.image_folder={folder!r}: {directory}/{loose[0]} is not inside a class "
                            f"folder; the official layout is {directory}/<class>/<image> ({len(loose)} such files)")
        files[split] = [os.path.join(directory, f) for f in listing.files]
        classes[split] = sorted({f.split(os.sep)[0] for f in listing.files})
        labels.update({os.path.join(directory, f): f.split(os.sep)[0] for f in listing.files})
        stats += listing.stats
        skipped.update({os.path.join(directory, f): reason for f, reason in listing.skipped.items()})
    unknown = sorted(set(classes["validation"]) - set(classes["train"]))
    if unknown:
        raise DataError(f"config.input.image_folder={folder!r}: {split_dirs['validation']}/ has classes that train/ "
                        f"lacks ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}): every class "
                        "needs training images, class ids come from train/'s sorted class names")
    combined = FolderListing(files["train"] + files["validation"], stats, dict(sorted(skipped.items())))
    return files, labels, combined


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strip_png_iccp(data: bytes) -> bytes:
    """`data` without a PNG's iCCP chunk (its embedded colour profile); anything else is returned unchanged.

    TensorFlow's decoder ignores colour profiles, so the pixels are the same; but libpng prints a warning to
    stderr ("iCCP: known incorrect sRGB profile", common in PNGs from image editors) on every decode of one.
    """
    if not data.startswith(_PNG_SIGNATURE) or b"iCCP" not in data:
        return data
    chunks, position = [data[:8]], 8
    while position + 12 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        end = position + 12 + length  # length, type, data, crc
        if end > len(data):
            break  # damaged: leave the rest as it is, for the decoder to judge
        if data[position + 4:position + 8] != b"iCCP":
            chunks.append(data[position:end])
        position = end
    chunks.append(data[position:])
    return b"".join(chunks)


def check_image(data: bytes) -> str | None:
    """None if `data` decodes as an image with TensorFlow (as the pipeline will), else the error."""
    try:
        if tf.io.is_jpeg(data):
            tf.image.extract_jpeg_shape(data)
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        # "{{function_node ...}} Invalid JPEG data, size 11 [Op:ExtractJpegShape]" -> "Invalid JPEG data, size 11"
        message = re.sub(r"\{\{.*?\}\}|\[Op:.*?\]", "", e.message or "").strip()
        return message.splitlines()[0] if message else type(e).__name__
    return None


@contextlib.contextmanager
def _no_custom_config_warning():
    """Hides tfds's "Using custom data configuration: BuilderConfig(...)" while an ImageFolder is constructed: a
    config per folder (its name carries the folder's fingerprint) is how the copies are told apart, not a
    mistake to warn about, and every construction (two per run) would repeat it."""
    def keep(record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")

    logger = std_logging.getLogger("absl")  # tfds logs through absl
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class ImageFolder(_LocalBuilder, skip_registration=True):
    """The JPEG and PNG files under one folder: one "train" split with labels from the class sub-folders, or
    "train" and "validation" for the official layout (train/<class>/, val/<class>/; see `split_folders`)."""

    name = "mae_image_folder"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, folder: str, data_dir: str | None = None, config=None, version=None):
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.split_dirs = split_folders(self.folder)
        if self.split_dirs is None:
            self.listing = list_image_files(self.folder)
            self.split_files = {"train": self.listing.files}
            self.labels = {f: _class_of(f, self.folder) for f in self.listing.files}
            self.classes = sorted(set(self.labels.values()))
        else:
            self.split_files, self.labels, self.listing = _split_listing(self.folder, self.split_dirs)
            self.classes = sorted({self.labels[f] for f in self.split_files["train"]})
            others = sorted(set(os.listdir(self.folder)) - set(self.split_dirs.values()))
            if others:
                logging.info("Image folder %s has the train/ and %s/ layout: ignoring its other entries %s.",
                             self.folder, self.split_dirs["validation"], others[:10])
        self.files = self.listing.files
        self._skipped = []  # files found unreadable while preparing, over all splits
        if config is None:
            slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(self.folder).lower()).strip("_")[:40] or "root"
            layout = "" if self.split_dirs is None else f"train,{self.split_dirs['validation']}"
            config = tfds.core.BuilderConfig(name=f"{slug}_{_fingerprint(self.folder, self.listing, layout)}",
                                             description=self.folder)
        with _no_custom_config_warning():
            super().__init__(data_dir=data_dir, config=config, version=version)
        self._original_state["folder"] = folder

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images under {self.folder}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),  # the file's own bytes, JPEG or PNG, not re-encoded (a PNG's
                # colour profile, which no decoder here uses, is dropped: strip_png_iccp)
                "label": tfds.features.ClassLabel(names=self.classes),
                "file_name": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.split_files}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        files = self.split_files[split]
        prefix = "" if self.split_dirs is None else self.split_dirs[split]  # the split's folder
        unlisted = {f: r for f, r in self.listing.skipped.items() if not prefix or f.startswith(prefix + os.sep)}
        skipped = list(unlisted)
        for relpath, reason in unlisted.items():
            logging.warning("Skipping unreadable image %s: %s", os.path.join(self.folder, relpath), reason)

        def read(relpath):
            try:
                with open(os.path.join(self.folder, relpath), "rb") as f:
                    data = f.read()
            except OSError as e:
                return relpath, None, e.strerror or str(e)
            data = strip_png_iccp(data)  # the pixels stay the same; libpng's warnings go
            return relpath, data, check_image(data)

        chunk = 256  # bounds memory: files are read and checked in parallel, a chunk at a time
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for start in range(0, len(files), chunk):
                for relpath, data, error in pool.map(read, files[start:start + chunk]):
                    if error is not None:
                        skipped.append(relpath)
                        logging.warning("Skipping unreadable image %s: %s", os.path.join(self.folder, relpath),
                                        error)
                        continue
                    yield relpath, {"image": data, "label": self.labels[relpath], "file_name": relpath}
        num_images = len(files) + len(unlisted) - len(skipped)
        where = f"{self.folder!r}" + (f": its {prefix}/ folder" if prefix else "")
        if num_images == 0:
            raise DataError(f"config.input.image_folder={where}: none of its {len(skipped)} image files could be "
                            "read and decoded (see the warnings above)")
        self._skipped += skipped  # the metadata counts every split's
        self.info.metadata["num_skipped_files"] = len(self._skipped)
        self.info.metadata["skipped_files"] = sorted(self._skipped)[:_MAX_LISTED_SKIPS]
        logging.log(logging.WARNING if skipped else logging.INFO, "Image folder %s: %d images, %d skipped.",
                    os.path.join(self.folder, prefix), num_images, len(skipped))


def num_skipped_files(builder: tfds.core.DatasetBuilder) -> int:
    """Image files left out of a prepared dataset because they could not be decoded (0 for tfds datasets)."""
    metadata = builder.info.metadata
    return int(metadata.get("num_skipped_files", 0)) if metadata else 0


# ---------------------------------------------------------------------------------------------------------
# The offline demo: crops of the photographs shipped with scikit-image.
# ---------------------------------------------------------------------------------------------------------

# Natural photographs in `skimage.data` (colour, then grey). The two held out make the validation split.
TRAIN_PHOTOS = ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
                "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "camera.png", "coins.png", "moon.png",
                "grass.png", "gravel.png", "brick.png")
HELD_OUT_PHOTOS = ("chelsea.png", "coffee.png")
DEMO_TRAIN_CROPS_PER_PHOTO = 160
DEMO_VALIDATION_CROPS_PER_PHOTO = 8
_DEMO_MAX_SIDE = 192  # crops are downscaled to at most this shorter side: small records, fast decoding


def _skimage_photo(filename: str):
    from PIL import Image
    import skimage.data
    with Image.open(os.path.join(os.path.dirname(skimage.data.__file__), filename)) as image:
        return image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode)


def _random_crops(photo, num_crops: int, rng: np.random.Generator, scale: tuple[float, float],
                  first_whole: bool) -> Iterator[bytes]:
    from PIL import Image
    width, height = photo.size
    for i in range(num_crops):
        if first_whole and i == 0:
            box = (0, 0, width, height)
        else:
            area = width * height * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            w = int(min(width, round(np.sqrt(area * aspect))))
            h = int(min(height, round(np.sqrt(area / aspect))))
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (left, top, left + w, top + h)
        crop = photo.crop(box)
        shrink = min(crop.size) / _DEMO_MAX_SIDE
        if shrink > 1:
            crop = crop.resize((round(crop.size[0] / shrink), round(crop.size[1] / shrink)), Image.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        yield buffer.getvalue()


class DemoPhotos(_LocalBuilder, skip_registration=True):
    """Random crops of scikit-image's sample photographs: a real-image dataset that needs no download."""

    name = "mae_demo"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Random crops (JPEG) of the sample photographs shipped with scikit-image; the validation "
                        f"split holds crops of {', '.join(HELD_OUT_PHOTOS)}, which train never shows.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "file_name": tfds.features.Text(),  # "<photo>/<crop index>"
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(TRAIN_PHOTOS, DEMO_TRAIN_CROPS_PER_PHOTO, (0.05, 0.5), False),
            "validation": self._generate_examples(HELD_OUT_PHOTOS, DEMO_VALIDATION_CROPS_PER_PHOTO, (0.3, 0.8),
                                                  True),
        }

    def _generate_examples(self, photos, crops_per_photo, scale, first_whole):
        for photo_index, filename in enumerate(photos):
            rng = np.random.default_rng([2022, photo_index, crops_per_photo])
            photo = _skimage_photo(filename)
            for i, data in enumerate(_random_crops(photo, crops_per_photo, rng, scale, first_whole)):
                name = f"{os.path.splitext(filename)[0]}/{i:04d}"
                yield name, {"image": data, "file_name": name}


# ---------------------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits: a small labelled dataset for fine-tuning and linear-probe runs.
# ---------------------------------------------------------------------------------------------------------

DIGITS_TEST_SIZE = 360  # of 1,797: a stratified 1,437 / 360 split (sklearn's train_test_split, random_state 0)
DIGITS_SCALE = 4  # 8x8 -> 32x32, nearest neighbour: every digit pixel becomes a 4x4 block


def digits_levels(values: np.ndarray) -> np.ndarray:
    """sklearn's digit intensities (0..16) -> uint8 grey levels (0..255), rounded."""
    return np.round(np.asarray(values, np.float64) * (255.0 / 16.0)).astype(np.uint8)


def digits_split_indices() -> dict[str, np.ndarray]:
    """Indices into `sklearn.datasets.load_digits()` of each split, in stored order.

    train_test_split(stratify=y, random_state=0) picks the 360 test digits. The train split is stored in a
    fixed interleaved order (each class's examples spread evenly, with seeded jitter), so that any prefix,
    e.g. the tfds slice "train[:10%]", holds every class in proportion (within one example).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    labels = load_digits().target
    train, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels,
                                   random_state=0)
    rng = np.random.default_rng(0)
    position = np.empty(len(train))
    for c in np.unique(labels):
        members = np.flatnonzero(labels[train] == c)
        position[members] = (np.arange(len(members)) + rng.uniform(size=len(members))) / len(members)
    return {"train": train[np.argsort(position, kind="stable")], "test": np.sort(test)}


class Digits(_LocalBuilder, skip_registration=True):
    """scikit-learn's handwritten digits (UCI optdigits test set, 1,797 8x8 images, 10 classes).

    Stored as 32x32 RGB PNGs: intensities 0..16 scaled to 0..255 (`digits_levels`), upscaled by nearest
    neighbour (each pixel a 4x4 block, exact and reversible), grey repeated into R, G, B. "train" (1,437) and
    "test" (360), split by `digits_split_indices`; written in that order (no tfds shuffling), so the slice
    "train[:10%]" is a class-balanced tenth. `file_name` is "digits/<index in load_digits()>".
    """

    name = "mae_digits"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's load_digits, 32x32 RGB (nearest-neighbour upscaled), stratified "
                        f"train / test split of {DIGITS_TEST_SIZE} test digits.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8 * DIGITS_SCALE, 8 * DIGITS_SCALE, 3)),  # PNG
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                "file_name": tfds.features.Text(),
            }),
            disable_shuffling=True,  # keep the stored order (see digits_split_indices)
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(indices) for split, indices in digits_split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits
        digits = load_digits()
        block = np.ones((DIGITS_SCALE, DIGITS_SCALE), np.uint8)
        for i in indices:
            grey = np.kron(digits_levels(digits.images[i]), block)
            name = f"digits/{i:04d}"
            yield name, {"image": np.repeat(grey[:, :, None], 3, axis=2), "label": int(digits.target[i]),
                         "file_name": name}
