r"""Multi-scale pretraining: which process should resize to the step's size? Images per second of both ways.

  "pipeline": the input pipeline emits each step's size (what mae_jax implements: `config.input.image_sizes`);
  "device":   the pipeline always emits the largest size and the compiled step resizes the batch to the step's
              size on the device (jax.image.resize, bicubic, antialiased), then runs the same train step.

Two measurements, rounds alternating between the two ways (this shared machine drifts between minutes), each
in images per second (wall) and in CPU milliseconds per image (the process's CPU time, every thread: what the
host spends, much less sensitive than the wall time to other processes on a busy machine):
  --measure input  the tf.data pipeline alone (read, decode, RandomResizedCrop, flip) on 500 x 375 JPEGs
                   (benchmarks/input_pipeline.py's photographs), at --sizes (default 224,256,288), one process;
  --measure run    a tiny run: configs/tiny.py's model and batch, data from --data (synthetic, or the same JPEG
                   folder), at --run_sizes (default 32,48), the compiled steps dispatched as the trainer does.
Prints one JSON line per round and a summary line with the medians.

  python benchmarks/multiscale_input.py --measure input
  python benchmarks/multiscale_input.py --measure run --data synthetic
  python benchmarks/multiscale_input.py --measure run --data folder
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mae_jax import runtime  # noqa: E402

runtime.configure()

import jax  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.input_pipeline import write_jpegs  # noqa: E402
from configs import tiny, vit_base  # noqa: E402
from mae_jax import input_pipeline, loop, parallel, pixels, train, trainer  # noqa: E402

WAYS = ("pipeline", "device")


def _iterator(input_config, way: str, sizes, batch_size: int, seed: int = 0):
    """The training input of `way`: every step's size, or always the largest."""
    input_config = input_config.copy_and_resolve_references()
    largest = max(sizes)
    input_config.image_sizes = tuple(sizes) if way == "pipeline" else ()
    with contextlib.redirect_stdout(sys.stderr):
        return input_pipeline.create_train_iterator(input_config, image_shape=(largest, largest, 3), seed=seed,
                                                    global_batch_size=batch_size, process_index=0, process_count=1)


def _record(results: dict, measure: str, way: str, round_: int, images: int, seconds: float, cpu_seconds: float,
            **more) -> None:
    rate, cpu_ms = images / seconds, 1000 * cpu_seconds / images
    results[way].append((rate, cpu_ms))
    print(json.dumps({"measure": measure, "way": way, "round": round_, "images_per_second": round(rate, 1),
                      "cpu_ms_per_image": round(cpu_ms, 3), **more}), flush=True)


def measure_input(args, folder: str, data_dir: str) -> dict:
    config = vit_base.get_config()
    config.input.dataset, config.input.image_folder, config.input.data_dir = "folder", folder, data_dir
    results = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        for way in WAYS:
            it = _iterator(config.input, way, args.sizes, args.batch_size)
            for _ in range(3):
                next(it)
            start, cpu_start = time.perf_counter(), time.process_time()
            pixels_out = 0
            for _ in range(args.batches):
                images = next(it)["images"]
                pixels_out += images.shape[1] * images.shape[2]
            images = args.batches * args.batch_size
            _record(results, "input", way, round_, images, time.perf_counter() - start, time.process_time() - cpu_start,
                    mean_output_side=round((pixels_out / args.batches) ** 0.5, 1))
            del it
    return results


def _device_resize_step(step_fn, size: int):
    """The "device" way's step at `size`: the largest size's uint8 batch, normalised, resized on the device."""

    def fn(state, batch):
        images = pixels.model_input(batch["images"])
        n, _, _, c = images.shape
        images = jax.image.resize(images, (n, size, size, c), method="bicubic", antialias=True)
        return step_fn(state, {"images": images})

    return fn


def measure_run(args, folder: str | None, data_dir: str | None) -> dict:
    config = tiny.get_config()
    config.input.image_sizes = tuple(args.run_sizes)
    if folder:
        config.input.dataset, config.input.image_folder, config.input.data_dir = "folder", folder, data_dir
    config.visualize_every_steps = 0
    task = train.Pretraining(config, platform=jax.devices()[0].platform)
    num_examples = task.num_train_examples(config)
    setup = trainer.build(config, task, jax.devices(), num_examples)
    # "pipeline": the trainer's programs, one per size, dispatched by the batch's shape.
    compiled = {name: setup.programs[name].lower().compile() for name in setup.train_steps}
    pipeline_step = loop.dispatch_by_batch_shapes([(setup.programs[n].args[1], compiled[n]) for n in setup.train_steps])
    # "device": one program per size, all taking the largest size's batch, dispatched by the step's size.
    big = setup.programs["train_step"]
    device_programs = {
        size: trainer.Program(f"resize to {size}", setup.mesh, _device_resize_step(task.train_step(setup), size),
                              big.args, big.out_shardings, big.donate_argnums).lower().compile()
        for size in sorted(set(args.run_sizes))}
    sharding = parallel.batch_sharding(setup.mesh)
    results = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        for way in WAYS:
            it = _iterator(config.input, way, args.run_sizes, config.batch_size, seed=config.seed)
            state = setup.init_state()
            steps = 3 + args.steps
            start = cpu_start = None
            for step in range(steps):
                if step == 3:
                    jax.block_until_ready(state)
                    start, cpu_start = time.perf_counter(), time.process_time()
                batch = {"images": parallel.global_batch(next(it)["images"], sharding)}
                if way == "pipeline":
                    state, metrics = pipeline_step(state, batch)
                else:
                    size = input_pipeline.step_image_size(config.seed, step, args.run_sizes)
                    state, metrics = device_programs[size](state, batch)
            jax.block_until_ready((state, metrics))
            _record(results, "run", way, round_, args.steps * config.batch_size, time.perf_counter() - start,
                    time.process_time() - cpu_start, last_loss=round(float(metrics["loss"]), 4))
            del it
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=("input", "run"), default="input")
    parser.add_argument("--data", choices=("synthetic", "folder"), default="synthetic", help="--measure run's data")
    parser.add_argument("--sizes", type=lambda s: tuple(map(int, s.split(","))), default=(224, 256, 288))
    parser.add_argument("--run_sizes", type=lambda s: tuple(map(int, s.split(","))), default=(32, 48))
    parser.add_argument("--num_files", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=128, help="--measure input's batch")
    parser.add_argument("--batches", type=int, default=30, help="--measure input: timed batches per round")
    parser.add_argument("--steps", type=int, default=60, help="--measure run: timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.set_verbosity(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        folder, data_dir = os.path.join(tmp, "images"), os.path.join(tmp, "tfds")
        if args.measure == "input" or args.data == "folder":
            os.makedirs(folder)
            write_jpegs(folder, args.num_files)
        if args.measure == "input":
            results = measure_input(args, folder, data_dir)
        else:
            results = measure_run(args, folder if args.data == "folder" else None, data_dir)
    rates = {way: round(statistics.median(r for r, _ in rounds), 1) for way, rounds in results.items()}
    cpu = {way: round(statistics.median(c for _, c in rounds), 3) for way, rounds in results.items()}
    print(json.dumps({
        "benchmark": "multiscale_input", "measure": args.measure,
        "data": "500x375 JPEG folder" if args.measure == "input" or args.data == "folder" else "synthetic",
        "sizes": args.sizes if args.measure == "input" else args.run_sizes,
        "median_images_per_second": rates, "pipeline_over_device": round(rates["pipeline"] / rates["device"], 3),
        "median_cpu_ms_per_image": cpu, "device_cpu_over_pipeline_cpu": round(cpu["device"] / cpu["pipeline"], 3),
        "rounds": args.rounds, "cpu_cores": os.cpu_count(), "cpu": common.cpu_info(),
        "load_average_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
