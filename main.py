r"""Pretrains, fine-tunes or linearly probes an MAE:

  python main.py --config configs/vit_base.py --workdir DIR [--config.field=value ...]            # pretraining
  python main.py --config configs/finetune_vit_base.py --workdir DIR --config.init_from=PRETRAINED  # fine-tuning
  python main.py --config configs/linprobe_vit_base.py --workdir DIR --config.init_from=PRETRAINED  # linear probe

Flags only. The logic lives in the importable library (`mae_jax.train` for pretraining, `mae_jax.finetune`
for configs with `task = "finetune"` or `"linprobe"`) so that it can be tested and used from a notebook. Re-running the same command resumes from the latest checkpoint in DIR. The config fields,
their defaults and meanings are in configs/vit_base.py (and README.md, "Pretraining"). Errors are one line;
`-v 1` also shows their traceback and third-party INFO logs.
"""

import os
import sys

from mae_jax import runtime

SETTINGS = runtime.configure()  # process-wide settings, before JAX and TensorFlow start (mae_jax/runtime.py)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mae_jax import config_lib  # noqa: E402  (the tasks import TensorFlow: in main(), after the flags are read)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file, e.g. configs/vit_base.py; override any field with "
    "--config.<field>=<value>. The fields, defaults and meanings are documented in configs/vit_base.py; "
    "--show_config lists them with their values.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
flags.DEFINE_bool("show_config", False, "Print every config field with its value and meaning, then exit.")
flags.mark_flags_as_required(["config"])


def parse_flags(argv):
    """absl's parsing, with a one-line error (not a traceback) for a misspelt --config.* field."""
    for i, arg in enumerate(argv[1:], 1):  # a missing config file: say so, not that it "is not available"
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if arg == "--config" and \
            i + 1 < len(argv) else None
        if path is not None and not os.path.isfile(path.split(":", 1)[0]):
            sys.exit(f"{argv[0]}: error: --config {path}: no such file (e.g. configs/vit_base.py)")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"{argv[0]}: error: {' '.join(str(e).split())}")
    except SyntaxError as e:  # the config file itself
        sys.exit(f"{argv[0]}: error: --config: {e.filename}:{e.lineno}: {e.msg}")
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
    if FLAGS.show_config:
        config_file = FLAGS["config"].config_filename.split(":", 1)[0]
        configs_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
        bases = [os.path.join(configs_dir, "vit_base.py")]
        if "task" in FLAGS.config:
            bases.append(os.path.join(configs_dir, "finetune_vit_base.py"))
        print(config_lib.describe(FLAGS.config, [*bases, config_file]))
        return
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory for checkpoints, metrics and TensorBoard events")
    logging.get_absl_handler().python_handler.stream = sys.stdout  # progress goes to stdout
    verbose = runtime.quiet_logs()  # Orbax's narration of every save, jax's search for accelerators
    logging.info("Process settings: %s.", SETTINGS)
    try:
        if "task" not in FLAGS.config:  # pretraining configs have no task
            from mae_jax import train as task
        else:
            from mae_jax import finetune as task
        task.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # closes everything it opened before returning
    except (ValueError, OSError, FloatingPointError) as e:  # bad settings, data or weights; a NaN stop
        if verbose:
            raise
        end_process(1, f"{sys.argv[0]}: error: {' '.join(str(e).split())}")
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves at the next step and exits normally)
        if verbose:
            raise
        print(f"{sys.argv[0]}: interrupted: stopped without saving; re-run to resume from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
    end_process(0)


def end_process(status: int, message: str | None = None) -> None:
    """Ends the process now, after `train_and_evaluate` has written and closed everything it opened (also when it
    raised): skips the interpreter's teardown, which waits seconds for tf.data's autotuning thread and collects
    every object (3-40 s after the last step line otherwise), and whose collection of Orbax's and TensorStore's
    leftovers could print after the one-line error. The message comes last: after everything already logged."""
    sys.stdout.flush()  # the step lines, before the message, also when both streams go to one pipe
    if message is not None:
        print(message, file=sys.stderr)
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
