r"""Images per second of the training input pipeline (read + decode + RandomResizedCrop + flip + normalise).

Writes ImageNet-sized JPEGs (500 x 375, crops of scikit-image's photographs, quality 95) into a temporary
folder, prepares it as a `dataset="folder"` source, then times `next()` on the training iterator for one
process. Prints one JSON line.

  python benchmarks/input_pipeline.py [--num_files 512] [--batch_size 128] [--image_size 224] [--batches 30]
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mae_jax import runtime  # noqa: E402

runtime.configure()  # what main.py applies (TensorFlow's INFO lines hidden, host memory)

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from absl import logging  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import vit_base  # noqa: E402
from mae_jax import input_pipeline  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


def write_jpegs(folder: str, num_files: int, width: int = 500, height: int = 375) -> float:
    """Writes `num_files` distinct photographic JPEGs; returns their mean size in kB."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    sizes = []
    for i in range(num_files):
        photo = photos[i % len(photos)]
        zoom = rng.uniform(1.0, 1.5)  # a random window of the photo, scaled to 500 x 375
        w = min(photo.width, int(photo.width / zoom))
        h = min(photo.height, int(w * height / width))
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        image = photo.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()))
        with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
            f.write(buffer.getvalue())
    return float(np.mean(sizes)) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_files", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=30, help="timed batches, after 3 warm-up batches")
    parser.add_argument("--threads", type=int, default=0, help="config.input.threads (0: one per core)")
    args = parser.parse_args()
    logging.set_verbosity(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        mean_kb = write_jpegs(folder, args.num_files)
        config = vit_base.get_config()
        config.model.image_size = (args.image_size, args.image_size)
        config.input.dataset, config.input.image_folder = "folder", folder
        config.input.data_dir, config.input.threads = os.path.join(tmp, "tfds"), args.threads
        with contextlib.redirect_stdout(sys.stderr):  # tfds prints while preparing; stdout is for the result
            it = input_pipeline.create_train_iterator(
                config.input, image_shape=(args.image_size, args.image_size, 3), seed=0,
                global_batch_size=args.batch_size, process_index=0, process_count=1)
        for _ in range(3):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        seconds = time.perf_counter() - start
    assert batch["images"].shape == (args.batch_size, args.image_size, args.image_size, 3)
    print(json.dumps({
        "benchmark": "input_pipeline",
        "images_per_second": round(args.batches * args.batch_size / seconds, 1),
        "source": f"500x375 JPEG, quality 95, mean {mean_kb:.0f} kB",
        "output": f"{args.image_size}x{args.image_size}x3 float32",
        "batch_size": args.batch_size,
        "timed_images": args.batches * args.batch_size,
        "cpu_cores": os.cpu_count(),
        "cpu": common.cpu_info(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
