"""The `keras-fsp` command: train a teacher, distil a student, evaluate,
export and visualise, with runs that resume after an interruption.

    keras-fsp SUBCOMMAND [--flag=value ...]
    python -m keras_fsp.apps.cli SUBCOMMAND [--flag=value ...]

Subcommands (`keras_fsp.apps.commands`):
    train-teacher   train the teacher (--teacher: a .keras file, a
                    keras.applications name or module:function; default
                    ResNet-<teacher_depth>) on the labels
    distill         distil a student (--student, as --teacher takes it;
                    default ResNet-<student_depth>) from a teacher with
                    --method (`keras_fsp.papers.methods`)
    evaluate        test accuracy of a trained model (--model)
    export          a trained model (--model) as .keras, SavedModel, LiteRT
                    (float or int8) or ONNX files (--formats)
    visualize       pictures comparing the teacher and a student
    reproduce       every run of a results table, then the table

A training run writes into --model_dir (`keras_fsp.training.RunFolder`):
its settings (every flag's value), the log, one row of metrics per epoch,
checkpoints, the result and, once complete, the trained network. Running the
same command again continues from the last checkpoint and ends with the
weights an uninterrupted run would have. `--epochs N` stops after N epochs
in all (run again without it to continue); `--learning_rate_scale` may
change when a run continues (e.g. after a NaN stop, whose message gives the
command). `--overwrite` starts over and moves the earlier run aside rather
than deleting it. `--plugins my_method.py` imports your own methods, terms
or datasets first (they register themselves).

Examples (the digits data set is bundled with scikit-learn, no download):

    keras-fsp train-teacher --dataset digits --teacher_depth 14 --schedule_scale 0.01
    keras-fsp distill --method fsp --dataset digits --teacher_depth 14 --schedule_scale 0.01
    keras-fsp evaluate --dataset digits --model runs/distill-fsp-digits

`run(argv)` does the work and returns a dict; `main` maps errors to one-line
messages and exit codes (2: bad input, 1: training failed, 130: interrupted).
"""

import contextlib
import logging as logging_module
import signal
import sys
import threading

from keras_fsp.apps.config import (FLAG_SUBCOMMANDS, SUBCOMMANDS, CLIError, Config, flag_names,
                                   flag_values, flags_of, import_code)

SUMMARIES = {
    "train-teacher": "train the teacher (--teacher, default ResNet-<teacher_depth>) on the labels",
    "distill": "distil --student (default ResNet-<student_depth>) from --teacher with --method",
    "evaluate": "test accuracy of --model (a .keras file or a run folder)",
    "export": "--model as --formats (.keras, SavedModel, LiteRT, int8 LiteRT, ONNX) into "
              "--model_dir",
    "visualize": "pictures of --teacher vs --model (student) into --model_dir",
    "reproduce": "every run of a results table, then the table (keras-fsp reproduce --help)",
}
USAGE = "Usage: keras-fsp [--plugins=FILE,...] SUBCOMMAND [--flag=value ...]\n\nSubcommands:\n" + (
    "\n".join(f"  {name:<14} {SUMMARIES[name]}" for name in SUBCOMMANDS)
    + "\n\n`keras-fsp SUBCOMMAND --help` lists the flags of one subcommand.")
HELP_WORDS = ("-h", "--help", "-help", "--helpfull", "help")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends before it kills), handled as
    Ctrl-C is: the last checkpoint kept, one line, exit status 143."""

    what, code = "terminated (SIGTERM)", 143


def _terminate(signum, frame):
    raise Terminated()


def load_plugins(argv):
    """Imports the `--plugins` of `argv` (files or module names), before the
    flags are read: the methods, terms and datasets they register are then
    known to `--method`, `--dataset` and `--help`.

    Raises:
        CLIError: for a file or module that cannot be imported.
    """
    plugins = _plugin_args(argv)[0]
    for plugin in plugins:
        try:
            import_code(plugin, "keras_fsp_plugin")
        except FileNotFoundError:
            raise CLIError(f"--plugins {plugin}: no such file.") from None
        except Exception as e:  # noqa: BLE001 - the plugin is the user's code
            raise CLIError(f"--plugins {plugin}: cannot import it ({type(e).__name__}: "
                           f"{e}).") from None
    return plugins


def _plugin_args(argv):
    """`(plugins, the other arguments)` of `argv`."""
    plugins, rest, skip = [], [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--plugins="):
            plugins += arg.split("=", 1)[1].split(",")
        elif arg == "--plugins":
            plugins += argv[i + 1].split(",") if i + 1 < len(argv) else []
            skip = True
        else:
            rest.append(arg)
    return [p for p in plugins if p], rest


def _help(subcommand=None):
    """The help of `subcommand` (its flags only), or of the command (every
    subcommand, the flags all of them take)."""
    import textwrap

    fv = flag_values()
    if subcommand is None:
        lines = [USAGE, "", "Flags of every subcommand (--name=value; booleans --name / --noname):"]
        names = [n for n in flag_names() if n not in FLAG_SUBCOMMANDS]
    else:
        lines = [f"Usage: keras-fsp {subcommand} [--flag=value ...]", "",
                 f"{subcommand}: {SUMMARIES[subcommand]}.", "",
                 "Flags (--name=value; booleans --name / --noname):"]
        names = flags_of(subcommand)
    for name in sorted(names):
        flag = fv[name]
        value = (",".join(flag.default) or "none") if isinstance(flag.default, list) else flag.default
        default = "" if flag.default is None else f" (default: {value})"
        text = " ".join(flag.help.split())  # absl's own additions bring line breaks
        lines.append(textwrap.fill(f"--{name}: {text}{default}", width=79,
                                   initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def parse(argv):
    """The checked, resolved `Config` of the command line `argv`."""
    from absl import flags

    fv = flag_values()
    try:
        rest = fv(list(argv) or ["keras-fsp"])[1:]
    except flags.Error as e:
        raise CLIError(f"{e}. Run `keras-fsp --help` for the flags.") from None
    if not rest:
        raise CLIError(f"no subcommand; choose one of {', '.join(SUBCOMMANDS)}.")
    if len(rest) > 1:
        raise CLIError(f"unexpected arguments {rest[1:]}: flags take the form --name=value.")
    given = {name for name in flag_names() if fv[name].present}
    return Config.from_flags(fv, rest[0]).resolved(given)


def run(argv):
    """Runs the command line `argv` (`argv[0]` is the program name).

    Returns:
        the run's result as a dict (what its metrics.json holds).

    Raises:
        CLIError: bad input (exit code 2, nothing trained or overwritten),
            a NaN/inf loss (1) or an interruption (130), with a one-line
            message.
    """
    plugins = load_plugins(argv)
    rest = _plugin_args(argv)[1]
    if rest[1:2] == ["reproduce"]:  # its own flags (keras_fsp.apps.reproduce)
        from keras_fsp.apps import reproduce

        return reproduce.main(rest[1:], plugins)
    config = parse(argv)
    from absl import logging

    from keras_fsp.apps.commands import COMMANDS, io_message
    from keras_fsp.training import Log

    logging.set_verbosity(logging.WARNING)
    log = Log(echo=config.verbose != 0)
    try:
        with _library_messages_to(log):
            return COMMANDS[config.subcommand](config, log, argv)
    except OSError as e:  # whatever a command writes: one line, no traceback
        raise CLIError(io_message(e, config.model_dir), code=1) from None


class _ToLog(logging_module.Handler):
    def __init__(self, log):
        super().__init__(logging_module.INFO)
        self.log = log

    def emit(self, record):
        for line in record.getMessage().splitlines():
            self.log(line)


@contextlib.contextmanager
def _library_messages_to(log):
    """The library's INFO messages (the automatic pairing) into the run's
    log while a command runs, and not printed twice."""
    logger = logging_module.getLogger("keras_fsp")
    handler, level, propagate = _ToLog(log), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging_module.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def main(argv=None):
    """The `keras-fsp` console script."""
    argv = sys.argv if argv is None else argv
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        rest = _plugin_args(argv)[1]
        if rest[1:2] != ["reproduce"] and any(a in HELP_WORDS for a in argv[1:]):
            load_plugins(argv)
            named = [a for a in rest[1:] if a in SUBCOMMANDS]
            print(_help(named[0] if named else None))
            return 0
        run(argv)
    except CLIError as e:
        print(f"keras-fsp: error: {e.message}", file=sys.stderr)
        return e.code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
