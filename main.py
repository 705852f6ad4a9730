r"""Pretrains, fine-tunes or linearly probes an MAE:

  python main.py --config configs/vit_base.py --workdir DIR [--config.field=value ...]            # pretraining
  python main.py --config configs/finetune_vit_base.py --workdir DIR --config.init_from=PRETRAINED  # fine-tuning
  python main.py --config configs/linprobe_vit_base.py --workdir DIR --config.init_from=PRETRAINED  # linear probe

Flags only. The logic lives in the importable library (`mae_jax.trainer.train_and_evaluate`, which runs the task
that `config.task` names) so that it can be tested and used from a notebook. Re-running the same command resumes
from the latest checkpoint in DIR. The config fields,
their defaults and meanings are in configs/vit_base.py (and README.md, "Pretraining"). Errors are one line;
`-v 1` also shows their traceback and third-party INFO logs.
"""

import errno
import os
import shlex
import sys

from mae_jax import runtime

SETTINGS = runtime.configure()  # process-wide settings, before JAX and TensorFlow start (mae_jax/runtime.py)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mae_jax import config_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file, e.g. configs/vit_base.py; override any field with "
    "--config.<field>=<value>. The fields, defaults and meanings are documented in configs/vit_base.py; "
    "--show_config lists them with their values.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
flags.DEFINE_bool("show_config", False, "Print every config field with its value and meaning, then exit.")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def usage() -> str:
    """--help: what this command does, the shipped configs (one line each) and the flags."""
    configs = config_lib.shipped_configs(CONFIGS_DIR)
    width = max(map(len, configs)) + len("configs/")
    listed = "\n".join(f"  {'configs/' + name:<{width}}  {summary}" for name, summary in configs.items())
    return (f"{__doc__.strip()}\n\nShipped configs (--config configs/NAME.py):\n{listed}\n\nflags:\n"
            f"{FLAGS.main_module_help()}\n\nabsl's own flags (-v 1 for the libraries' logs, ...): --helpfull")


def parse_flags(argv):
    """absl's parsing with our one-line errors (a missing or misspelt --config file, a misspelt --config.*
    field, a missing --config) and a --help that lists the shipped configs and exits 0."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        if "--helpfull" in argv[1:]:
            FLAGS(argv[:1])  # absl's full help needs parsed flags
            print(f"{usage()}\n\n{FLAGS.get_help()}")
        else:
            print(usage())
        sys.exit(0)
    for i, arg in enumerate(argv[1:], 1):  # a missing config file: say so, not that it "is not available"
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if arg == "--config" and \
            i + 1 < len(argv) else None
        if path is not None and not os.path.isfile(path.split(":", 1)[0]):
            closest = config_lib.closest_config(path.split(":", 1)[0], CONFIGS_DIR)
            hint = f"; did you mean {os.path.relpath(closest)}?" if closest else " (e.g. configs/vit_base.py)"
            sys.exit(f"{argv[0]}: error: --config {path}: no such file{hint}")
    try:
        argv = FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message:  # get_config's own error: its message, not the traceback
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"{argv[0]}: error: {' '.join(message.split())}")
    except SyntaxError as e:  # the config file itself
        sys.exit(f"{argv[0]}: error: --config: {e.filename}:{e.lineno}: {e.msg}")
    except (AttributeError, KeyError) as e:  # ml_collections: the locked config has no such field
        while isinstance(e, Exception) and e.args:
            e = e.args[0]
        key, _, hint = str(e).partition("\n")
        key = key.strip("'\"")
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        sys.exit(f"{argv[0]}: error: {bad[0] if bad else '--config'}: the config has no field {key!r}. {hint}")
    if FLAGS.config is None:
        sys.exit(f"{argv[0]}: error: --config is required: a config file, e.g. --config configs/demo.py "
                 f"({argv[0]} --help lists the shipped configs)")
    return argv


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.show_config:
        config_file = FLAGS["config"].config_filename.split(":", 1)[0]
        print(config_lib.describe(FLAGS.config, config_lib.description_sources(FLAGS.config, config_file,
                                                                               CONFIGS_DIR)))
        return
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory for checkpoints, metrics and TensorBoard events")
    logging.get_absl_handler().python_handler.stream = sys.stdout  # progress goes to stdout
    problem = workdir_problem(FLAGS.workdir)
    if problem:
        end_process(1, runtime.error_line(sys.argv[0], f"--workdir {FLAGS.workdir}: {problem}"))
    logging.info("Process settings: %s.", SETTINGS)
    from mae_jax import trainer  # JAX and Orbax start here, after the flags: --help and flag errors answer at once

    # Bad settings, data or weights, a NaN stop: one line (-v 1: the traceback, and third-party INFO logs).
    with runtime.one_line_errors(sys.argv[0], (ValueError, OSError, FloatingPointError),
                                 exit=lambda line: end_process(1, line)) as verbose:
        try:
            trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, command=shlex.join(["python", *sys.argv]))
        except KeyboardInterrupt:  # a second Ctrl-C, or one before training started (the first in training saves)
            if verbose:
                raise
            from mae_jax import checkpoints

            latest = checkpoints.latest_step(os.path.join(FLAGS.workdir, "checkpoints"))
            end_process(130, f"{sys.argv[0]}: interrupted before anything was saved; re-running the same command "
                        "starts again" if latest is None else f"{sys.argv[0]}: interrupted: stopped without saving; "
                        f"re-run the same command to resume from the last checkpoint (step {latest})")
    end_process(0)


def workdir_problem(path: str) -> str | None:
    """Why `path` cannot be this run's workdir (it cannot be created, or written to), or None."""
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        if "://" in path:  # gs://, s3://: checked when the run opens it
            return None
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as e:
        where = f" at {e.filename}" if e.filename and e.filename not in (path, probe) else ""
        code = errno.errorcode.get(e.errno, "?")
        return f"{e.strerror or e} ({code}){where}: use a directory you can create and write"
    return None


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
