"""What the CLIs print: library INFO dropped, warnings kept, logs between progress bars, one error line."""

import asyncio
import errno
import io
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm

from cma_jax import console

PACKAGE = os.path.dirname(console.__file__)
SITE = "/venv/lib/python3.11/site-packages"


def record(level, path, msg, exc=None):
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("absl", level, path, 1, msg, None, exc_info)


@pytest.fixture
def quiet():
    return console.QuietLibraries().filter


def test_library_info_is_dropped_and_warnings_kept(quiet):
    tpu = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"
    assert not quiet(record(logging.INFO, f"{SITE}/jax/_src/xla_bridge.py", tpu))
    assert not quiet(record(logging.INFO, f"{SITE}/tensorflow_datasets/core/dataset_info.py", "Load dataset info"))
    assert quiet(record(logging.INFO, f"{PACKAGE}/train.py", "step 10 loss 1.2"))  # our own lines stay
    assert quiet(record(logging.WARNING, f"{SITE}/jax/_src/xla_bridge.py", "a real warning"))
    assert quiet(record(logging.ERROR, f"{SITE}/orbax/checkpoint/checkpoint_manager.py", "a real error"))


def test_orbax_read_only_notices_are_dropped(quiet):
    for msg in ("CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
                "Given directory is read only=/runs/x/checkpoints"):
        assert not quiet(record(logging.WARNING, f"{SITE}/orbax/checkpoint/checkpoint_manager.py", msg))


def test_orbax_errors_about_a_full_disk_are_left_to_the_one_error_line(quiet):
    path = f"{SITE}/orbax/checkpoint/_src/checkpointers/async_checkpointer.py"
    full = OSError(errno.ENOSPC, "No space left on device")
    assert not quiet(record(logging.ERROR, path, "Failed to run 5 Handler Commit operations", full))
    assert quiet(record(logging.ERROR, path, "Failed to run 5 Handler Commit operations", PermissionError(13, "no")))


def test_log_lines_go_between_progress_bars():
    out = io.StringIO()
    bar = tqdm(total=10, file=out, desc="train", ascii=True, bar_format="{desc} {n_fmt}/{total_fmt}")
    bar.update(3)
    console.BetweenBars(out).write("I1129 step 3 loss 1.0\n")
    bar.close()
    text = out.getvalue()
    before, after = text.split("I1129 step 3 loss 1.0\n")
    assert before.endswith("\r" + " " * len("train 3/10") + "\r")  # the bar was cleared first...
    assert after.startswith("\rtrain 3/10")  # ...and redrawn below the line
    assert console.BetweenBars(out) == out  # absl's handler treats it as the terminal itself


def _closed_loop_error():
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        # as tensorstore reports it: from C, so the traceback starts in call_soon_threadsafe
        return e, e.__traceback__.tb_next


def test_only_the_closed_event_loop_callbacks_are_silenced():
    seen = []
    hook = console._unraisable_hook(seen.append)
    exc, tb = _closed_loop_error()
    hook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=exc, exc_traceback=tb, object=None))
    assert seen == []
    other = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                  exc_traceback=None, object=None)
    hook(other)
    assert seen == [other]


def test_error_lines(monkeypatch):
    monkeypatch.setattr(console, "_exiting_on_full_disk", False)
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/20/params/d/ab12")
    assert console.error_line(full, "/runs/x") == (
        "error: the disk is full (no space left on device) writing /runs/x/checkpoints/20/params/d/ab12; "
        "free some space or write to another disk, then run the same command again")
    assert console._exiting_on_full_disk  # the exit hooks now keep quiet about the OSErrors that follow
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert console.error_line(wrapped, "/runs/x").startswith("error: the disk is full (no space left on "
                                                             "device) writing /runs/x; ")
    tensorstore = ValueError('Error writing local file "/runs/x/a": [OS error 28: No space left on device]')
    assert console.error_line(tensorstore, "/runs/x").startswith("error: the disk is full")
    missing = FileNotFoundError("/data: no such folder")
    assert console.error_line(missing, "/runs/x") == "error: /data: no such folder"
    assert console.error_line(KeyError("params"), "/runs/x") is None  # a bug: keeps its traceback


def test_an_entry_point_prints_one_error_line_or_reraises_a_bug(capsys):
    try:
        raise FileNotFoundError("/data: no such folder")
    except Exception as e:
        console.print_error_or_raise(e, "/runs/x")
    assert capsys.readouterr().err == "error: /data: no such folder\n"
    with pytest.raises(KeyError, match="params"):
        try:
            raise KeyError("params")
        except Exception as e:
            console.print_error_or_raise(e, "/runs/x")
    assert capsys.readouterr().err == ""


def test_without_log_lines_drops_only_those_lines_and_only_inside_the_block():
    seen = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with console.without_log_lines("config.backbone=random"):
            absl_logging.warning("config.backbone=random: the CLIP backbone is randomly initialised")
            logging.getLogger("cma_jax.loader").warning("config.backbone=random: ...")
            absl_logging.warning("a real warning")
        absl_logging.warning("config.backbone=random: outside the block")
    finally:
        root.removeHandler(handler)
    assert seen == ["a real warning", "config.backbone=random: outside the block"]


@pytest.fixture
def flag_values():
    fv = flags.FlagValues()
    flags.DEFINE_flag(app.HelpFlag(), fv)
    flags.DEFINE_integer("num_processes", None, "processes", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv)
    return fv


def test_asking_for_help_exits_0(flag_values, capsys):  # capsys: absl prints the help
    with pytest.raises(SystemExit) as e:
        console.parse_flags(["main.py", "--help"], flag_values)
    assert e.value.code == 0  # absl itself exits 1


def test_a_flag_that_does_not_parse_is_one_error_line(flag_values):
    with pytest.raises(SystemExit) as e:
        console.parse_flags(["main.py", "--num_processes=two"], flag_values)
    assert e.value.code == ("error: flag --num_processes=two: invalid literal for int() with base 10: 'two' "
                            "(--help lists the flags)")


def test_a_config_files_own_error_is_one_line_without_its_traceback(flag_values, tmp_path):
    config = tmp_path / "cfg.py"
    config.write_text("def get_config(arg):\n    raise ValueError(f'cfg: unknown variant {arg!r}')\n")
    with pytest.raises(SystemExit) as e:
        console.parse_flags(["demo", f"--config={config}:fast"], flag_values)
    assert e.value.code == f"error: flag --config={config}:fast: cfg: unknown variant 'fast' (--help lists the flags)"


def test_python_warnings_go_between_progress_bars_too():
    code = textwrap.dedent("""
        import warnings
        from tqdm import tqdm
        from cma_jax import console
        console.setup()
        bar = tqdm(total=10, desc="train", ascii=True, bar_format="{desc} {n_fmt}/{total_fmt}")
        bar.update(3)
        warnings.warn("a library's warning")
        bar.close()
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,  # bytes: keep each \r
                       env={**os.environ, "PYTHONPATH": root})
    err = p.stderr.decode()
    assert p.returncode == 0, err
    before, line, after = err.partition("WARNING: <string>:8: UserWarning: a library's warning\n")  # (+ "\n")
    assert line, err
    assert before.endswith("\r" + " " * len("train 3/10") + "\r") and after.startswith("\n\rtrain 3/10"), err
