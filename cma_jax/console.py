"""What the command-line programs print: their own log lines, real warnings, one line per error.

Each CLI (`cma_jax.main`, `cma_jax.demo`, `cma_jax.search`) calls `setup(verbose)` once, library code never:
other libraries' INFO chatter is dropped, log lines are written between progress bars, and the noise a failed
checkpoint restore leaves behind is silenced. `print_error_or_raise` ends a CLI on bad input or a full disk
with one `error:` line, `parse_flags` is absl's flag parsing with `--help` exiting 0, and `without_log_lines`
hushes, for one block, log lines that would mislead there. docs/training.md ("What the programs print")
describes what users see.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading

from absl import flags
from absl import logging as absl_logging
from tqdm import tqdm

from cma_jax import accelerators

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ORBAX = f"{os.sep}orbax{os.sep}"
_ORBAX_READ_ONLY = ("CheckpointManagerOptions.read_only=True, setting", "Given directory is read only")
_DISK_FULL_TEXT = ("No space left on device", "[Errno 28]")

_exiting_on_full_disk = False  # set once the program has reported a full disk (see error_line, setup)


# ----------------------------------------------------------------------------- full disk, errors
def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> OSError | bool:
    """The ENOSPC OSError in `e` or its causes (True for a library error that only says so); else False."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return x
    return any(t in str(x) for x in _chain(e) for t in _DISK_FULL_TEXT)


def error_line(e: BaseException, path: str) -> str | None:
    """The one line a CLI ends with for bad input (ValueError, OSError) or a full disk; None for a bug.

    `path`: what the program was writing (its workdir / index), named when the error names no file.
    After a full disk, the OSErrors that exit handlers and other threads then run into (flushing
    TensorBoard events, Orbax's background saves) are no longer printed: this line says it all.
    """
    global _exiting_on_full_disk
    full = disk_full(e)
    if full:
        _exiting_on_full_disk = True
        where = full.filename if isinstance(full, OSError) and full.filename else path
        return (f"error: the disk is full (no space left on device) writing {where}; free some space or "
                "write to another disk, then run the same command again")
    if isinstance(e, (ValueError, OSError)):
        return f"error: {e}"
    return None


def print_error_or_raise(e: BaseException, path: str) -> None:
    """An entry point's `except Exception as e:`: print its one error line (the traceback is logged at
    debug level: `--verbosity=1` shows it), or re-raise `e` when it is a bug, which keeps its traceback."""
    line = error_line(e, path)
    if line is None:
        raise e
    absl_logging.debug("traceback", exc_info=e)
    print(line, file=sys.stderr, flush=True)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=console.parse_flags)`, except that asking for help
    exits 0 (absl exits 1 after printing it) and a bad flag ends in one `error:` line."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        line = str(e).splitlines()[0]
        wrapped = "Error whilst parsing config file:"  # ml_collections: a traceback of the config's own error follows
        if line.endswith(wrapped):
            *_, cause = _chain(e)
            line = line[:-len(wrapped)] + str(cause)
        sys.exit(f"error: {line} (--help lists the flags)")
    except SystemExit as e:  # only absl's --help, --helpshort, --helpfull and --helpxml exit while parsing
        if e.code == 1:
            sys.exit(0)
        raise


def plural(n: int, one: str, many: str) -> str:
    """'1 video', '3 videos'."""
    return f"{n} {one if n == 1 else many}"


# ----------------------------------------------------------------------------- logging
class QuietLibraries(logging.Filter):
    """Keeps warnings and errors, cma_jax's own INFO lines, and drops the rest (see `setup`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return record.pathname.startswith(_PACKAGE)
        if _ORBAX in record.pathname:
            if record.getMessage().startswith(_ORBAX_READ_ONLY):
                return False
            if record.exc_info and disk_full(record.exc_info[1]):
                return False  # the program's own error line reports the full disk, once
        return True


class BetweenBars:
    """A console stream for log handlers: clears the progress bars, writes, redraws them."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        with tqdm.external_write_mode(file=self.stream):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)

    # It *is* the terminal stream as far as handlers are concerned: absl's handler then neither
    # copies FATAL lines to stderr a second time nor closes the stream at exit.
    def __eq__(self, other):
        return self.stream == (other.stream if isinstance(other, BetweenBars) else other)

    def __hash__(self):
        return hash(self.stream)


def _console_handler(handler: logging.Handler) -> logging.StreamHandler | None:
    """The StreamHandler that writes `handler`'s records to the terminal (not yet between bars), if any."""
    if isinstance(handler, absl_logging.ABSLHandler):
        handler = handler.python_handler
    if (isinstance(handler, logging.StreamHandler) and not isinstance(handler.stream, BetweenBars)
            and handler.stream in (sys.stdout, sys.stderr)):
        return handler
    return None


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def without_log_lines(*prefixes: str):
    """While the block runs, drop the log lines that start with one of `prefixes` (a stage that does on
    purpose what such a line warns about); every other line is kept."""
    drop = _DropLines(prefixes)
    targets = [logging.getLogger("absl"), *logging.getLogger().handlers]  # absl's logger and every handler
    for t in targets:
        t.addFilter(drop)
    try:
        yield
    finally:
        for t in targets:
            t.removeFilter(drop)


# ----------------------------------------------------------------------------- exceptions nobody can catch
def _closed_loop_callback(exc: BaseException, tb) -> bool:
    """A callback of a finished tensorstore read that found Orbax's event loop closed."""
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _orphaned_orbax_read(args) -> bool:
    """A read of a damaged checkpoint that Orbax started and never awaited once another read failed.

    The restore that owns it has already failed with the same error, which the caller handles (the
    run skips that checkpoint and says so): its garbage-collected sibling coroutines have nothing to add.
    """
    obj = args.object
    return (type(obj).__name__ == "coroutine" and _ORBAX in getattr(getattr(obj, "cr_code", None), "co_filename", "")
            and getattr(obj, "cr_frame", True) is None)


def _unraisable_hook(previous):
    def hook(args):
        if _closed_loop_callback(args.exc_value, args.exc_traceback) or _orphaned_orbax_read(args):
            return
        if _exiting_on_full_disk and isinstance(args.exc_value, OSError):
            return
        previous(args)
    return hook


def _thread_hook(previous):
    def hook(args):
        if _exiting_on_full_disk and isinstance(args.exc_value, OSError):
            return
        previous(args)
    return hook


def setup(verbose: bool = False) -> None:
    """Once per CLI program, before it logs or starts JAX's backends (never in library code): its filters, hooks
    and libtpu's settings on a machine without TPUs (`accelerators.libtpu_without_chips`).

    INFO lines of other libraries are dropped (JAX's "Unable to initialize backend 'tpu'", Orbax's per-save
    chatter, TFDS's dataset-info lines), and so are Orbax's notices that it opened a checkpoint read-only
    (which we ask for); their warnings and errors stay, and so do cma_jax's own INFO lines. `verbose`
    (`--verbosity=1`) keeps every line. Log lines, Python warnings among them, are written between progress
    bars (tqdm's external_write_mode), not into them. After a restore that fails, tensorstore still completes the reads
    already in flight and hands their results to Orbax's asyncio loop, which the failure has closed: each
    prints an `Event loop is closed` traceback (through sys.unraisablehook), and its sibling read
    coroutines, never awaited, print the very error the failed restore already raised. Those, and only
    those, are dropped (besides the OSErrors that follow a reported full disk: `error_line`).
    """
    accelerators.libtpu_without_chips()  # libtpu, if installed, says nothing of TPUs this machine lacks
    root = logging.getLogger()
    if not root.handlers:  # not an absl program: one plain stderr handler ("WARNING: ...")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        if not verbose and not any(isinstance(f, QuietLibraries) for f in handler.filters):
            handler.addFilter(QuietLibraries())
        console = _console_handler(handler)
        if console is not None:
            console.setStream(BetweenBars(console.stream))
    logging.captureWarnings(True)  # Python warnings as log lines too: between the bars, not written into them
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    threading.excepthook = _thread_hook(threading.excepthook)
