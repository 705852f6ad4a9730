r"""Pretrains an MAE: `python main.py --config configs/vit_base.py --workdir DIR [--config.field=value ...]`.

Flags only. The logic lives in the importable library `mae_jax.train` so that it can be tested and used
from a notebook. Re-running the same command resumes from the latest checkpoint in DIR.
"""

import logging as std_logging
import re
import sys

from mae_jax import runtime

SETTINGS = runtime.configure()  # process-wide settings, before JAX and TensorFlow start (mae_jax/runtime.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mae_jax import input_pipeline, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's parsing, with a one-line error (not a traceback) for a misspelt --config.* field."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"{argv[0]}: error: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: the locked config has no such field
        while isinstance(e, Exception) and e.args:
            e = e.args[0]
        key, _, hint = str(e).partition("\n")
        key = key.strip("'\"")
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        sys.exit(f"{argv[0]}: error: {bad[0] if bad else '--config'}: the config has no field {key!r}. {hint}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    handler = logging.get_absl_handler()
    handler.python_handler.stream = sys.stdout  # progress goes to stdout
    # Orbax narrates every save at INFO, and jax reports each accelerator it does not find: keep their
    # warnings and errors only.
    handler.addFilter(lambda r: r.levelno >= std_logging.WARNING or not re.search(r"/orbax/|xla_bridge", r.pathname))
    logging.info("Process settings: %s.", SETTINGS)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (train.ConfigError, input_pipeline.DataError) as e:  # bad settings: one line, no traceback
        sys.exit(f"{sys.argv[0]}: error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
