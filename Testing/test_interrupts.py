"""Stop signals on the command line: a signal during an import waits for the import, then stops the command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, run_cmedl

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")

# A child that runs a slow import inside the command line's signal handling, as `cmedl segment` imports torch.
CHILD = textwrap.dedent(
    """
    import sys
    from cmedl.errors import Interrupted
    from cmedl.interrupts import stop_signals

    try:
        with stop_signals(cooperative={cooperative}):
            import slow_module
            print("AFTER IMPORT", flush=True)
            import time
            time.sleep(30)
    except Interrupted as stop:
        print("STOPPED BY", stop.signal_name, "IMPORTED", slow_module.DONE, flush=True)
        sys.exit(130)
    print("NOT STOPPED", flush=True)
    """
)
SLOW_MODULE = textwrap.dedent(
    """
    import time
    print("IMPORTING", flush=True)
    time.sleep(1.5)
    DONE = True
    """
)


def _start(tmp_path: Path, cooperative: bool = False) -> subprocess.Popen:
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE)
    env = dict(os.environ, PYTHONPATH=f"{PROJECT_ROOT}{os.pathsep}{tmp_path}")
    return subprocess.Popen([sys.executable, "-c", CHILD.format(cooperative=cooperative)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_an_import_stops_the_command_after_the_import(tmp_path: Path, signum: int) -> None:
    child = _start(tmp_path)
    try:
        assert child.stdout.readline().strip() == "IMPORTING"
        time.sleep(0.2)
        started = time.monotonic()
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    # The module finished initialising (no exception inside it), and the stop came right after it, not at the end.
    assert child.returncode == 130, err
    assert out.strip().splitlines()[-1] == f"STOPPED BY {signal.Signals(signum).name} IMPORTED True", out + err
    assert time.monotonic() - started < 10


def test_a_signal_outside_an_import_still_stops_at_once(tmp_path: Path) -> None:
    child = _start(tmp_path)
    try:
        assert child.stdout.readline().strip() == "IMPORTING"
        assert child.stdout.readline().strip() == "AFTER IMPORT"
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130 and "STOPPED BY SIGTERM" in out
    assert time.monotonic() - started < 10  # not the 30 s sleep


def test_segment_stopped_while_torch_loads_reports_a_stop_not_a_crash(tmp_path: Path) -> None:
    """The real case: Ctrl-C in the first second of `cmedl segment`, while torch is imported."""
    ct = tmp_path / "ct.nii.gz"
    assert run_cmedl("phantom", str(tmp_path / "data"), "--ct", "1", "--mr", "0", "--size", "64").returncode == 0
    next((tmp_path / "data" / "ct" / "images").iterdir()).rename(ct)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    for delay in (0.4, 0.7, 1.0):
        child = subprocess.Popen([sys.executable, "-m", "cmedl", "segment", str(ct), "-o", str(tmp_path / "o.nrrd"),
                                  "--progress", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)  # fmt: skip
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        # Stopped (130), or finished before the signal came (0); never a crash (-11, -6) or a traceback.
        assert child.returncode in (130, 0), (delay, child.returncode, err)
        if child.returncode == 130:
            assert lines == ["cmedl: error: stopped by SIGINT; nothing written"], err
        assert not (tmp_path / "o.nrrd").exists() or child.returncode == 0


def test_a_signal_after_the_command_has_ended_does_not_turn_its_success_into_a_kill() -> None:
    """A Cancel racing the end of a run (or Ctrl-C during the interpreter's shutdown): the outputs are in place and
    the exit code is decided, so the process exits with it instead of being killed (143)."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        from cmedl import cli

        command = cli.main

        def main_then_signal(argv=None):
            code = command(argv)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            return code

        cli.main = main_then_signal
        sys.argv = ["cmedl", "models", "list"]
        cli.console()
        """
    )
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "demo" in done.stdout
