"""Input pipelines: per-process batches of augmented, normalised images.

Interface used by the trainer (`mae_jax.train`):

    it = create_train_iterator(config, global_batch_size=..., process_index=..., process_count=..., state=None)
    it.num_examples          # examples in the training split (for steps per epoch)
    batch = next(it)         # {"images": np.ndarray [global_batch_size // process_count, H, W, C] float32}
    it.get_state()           # JSON-able position after the last batch returned; pass it back as `state`
                             # to continue exactly where it stopped

`config.dataset` selects the source: "synthetic" (random smooth images, for mechanics tests and benchmarks).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _image_size(config) -> tuple[int, int]:
    size = config.model.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


class SyntheticIterator(Iterator[dict]):
    """Smooth random images, normalised like ImageNet photographs.

    The image at global row r of batch b is a pure function of (seed, b, r), so a batch is the same
    however it is split over processes, and any position can be resumed exactly. Low-frequency content
    makes the masked patches predictable, so the loss of a working trainer falls.
    """

    def __init__(self, *, seed: int, image_size: tuple[int, int], num_channels: int, global_batch_size: int,
                 process_index: int, process_count: int, num_examples: int, state: dict | None = None):
        self.seed = seed
        self.height, self.width = image_size
        self.num_channels = num_channels
        self.local_batch_size = global_batch_size // process_count
        self.row_offset = process_index * self.local_batch_size
        self.num_examples = num_examples
        self.batch_index = int(state["batch_index"]) if state else 0

    def __next__(self) -> dict:
        rows = np.arange(self.row_offset, self.row_offset + self.local_batch_size)
        images = np.stack([self._image(self.batch_index, r) for r in rows])
        self.batch_index += 1
        return {"images": images}

    def _image(self, batch_index: int, row: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, batch_index, row])
        y = np.linspace(0.0, 1.0, self.height, dtype=np.float32)[:, None, None]
        x = np.linspace(0.0, 1.0, self.width, dtype=np.float32)[None, :, None]
        fy, fx, py, px = rng.uniform(0.5, 3.0, size=(4, self.num_channels)).astype(np.float32) * [[6], [6], [1], [1]]
        image = 0.5 + 0.4 * np.sin(fy * y + py) * np.cos(fx * x + px)  # [H, W, C] in (0.1, 0.9)
        mean, std = IMAGENET_MEAN[:self.num_channels], IMAGENET_STD[:self.num_channels]
        if self.num_channels != 3:
            mean, std = np.float32(0.5), np.float32(0.25)
        return ((image - mean) / std).astype(np.float32)

    def get_state(self) -> dict:
        return {"batch_index": self.batch_index}


def create_train_iterator(config, *, global_batch_size: int, process_index: int, process_count: int,
                          state: dict | None = None) -> Iterator[dict]:
    """The training input for this process; see the module docstring."""
    if config.dataset == "synthetic":
        return SyntheticIterator(
            seed=config.seed, image_size=_image_size(config), num_channels=config.model.num_channels,
            global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
            num_examples=config.synthetic_num_examples, state=state)
    raise ValueError(f"dataset {config.dataset!r} is not supported: use 'synthetic'")
