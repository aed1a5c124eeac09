"""The engine as a child process: command and environment, progress events, errors, cancelling process trees,
detached runs. Every test starts real child processes of this interpreter; none loads a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from cmedl.errors import CancelledError, CMEDLError, InputError, ModelFileError, OutputError
from cmedl.jobs import (
    STDERR_LINE_CHARS,
    STDERR_TAIL_CHARS,
    STDERR_TAIL_LINES,
    Job,
    JobResult,
    child_environment,
    engine_command,
    engine_root,
    start_detached,
    start_detached_command,
)
from cmedl.processes import process_alive, process_create_time, terminate_tree

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POSIX = os.name == "posix"


_STARTED: list[Job] = []


@pytest.fixture(autouse=True)
def _stop_leftover_jobs():
    """A failing test must not leave sleeping children behind."""
    yield
    while _STARTED:
        _STARTED.pop().cancel(grace_seconds=0.5)


def python_job(script: str, *arguments: str, **kwargs) -> Job:
    """A job that runs ``script`` (with ``arguments`` in its sys.argv) with this interpreter."""
    job = Job.start_command([sys.executable, "-c", textwrap.dedent(script), *arguments], **kwargs)
    _STARTED.append(job)
    return job


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def first_event(job: Job, kind: str, seconds: float = 10.0) -> dict:
    """Poll ``job`` until an event of ``kind`` arrives."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for event in job.poll():
            if event["event"] == kind:
                return event
        time.sleep(0.02)
    raise AssertionError(f"no {kind} event within {seconds} s; stderr: {job.stderr_tail()}")


# -- command and environment -------------------------------------------------------------------------


def test_engine_command_runs_the_package_with_the_given_interpreter() -> None:
    assert engine_command(["info", "--json"]) == [sys.executable, "-m", "cmedl", "info", "--json"]
    assert engine_command(["demo"], python="/opt/Slicer/bin/PythonSlicer")[:3] == [
        "/opt/Slicer/bin/PythonSlicer",
        "-m",
        "cmedl",
    ]
    with pytest.raises(TypeError):
        engine_command("segment ct.nii.gz")


def test_child_environment_hides_gpus_only_for_cpu_and_keeps_the_base() -> None:
    base = {"HOME": "/home/someone", "CUDA_VISIBLE_DEVICES": "1", "PYTHONPATH": "/elsewhere"}
    cpu = child_environment("cpu", base)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "-1"
    assert cpu["PYTHONUNBUFFERED"] == "1"
    assert cpu["HOME"] == "/home/someone"
    assert child_environment("auto", base)["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in child_environment("auto", {"HOME": "/home/someone"})
    assert "CUDA_VISIBLE_DEVICES" not in child_environment("cuda", {})
    assert base["CUDA_VISIBLE_DEVICES"] == "1" and "PYTHONUNBUFFERED" not in base
    entries = cpu["PYTHONPATH"].split(os.pathsep)
    assert Path(entries[0]) == engine_root() == PROJECT_ROOT and entries[1:] == ["/elsewhere"]
    # Building it again from its own output does not pile up the same folder.
    assert child_environment("cpu", cpu)["PYTHONPATH"] == cpu["PYTHONPATH"]
    with pytest.raises(ValueError, match="device"):
        child_environment("gpu")


def test_the_job_module_never_imports_the_heavy_libraries() -> None:
    script = "import sys, cmedl.jobs; print(sorted({'torch', 'numpy', 'SimpleITK'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=child_environment(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_child_in_another_folder_imports_this_engine(tmp_path: Path) -> None:
    # -S skips site-packages (and an editable install's path file): only PYTHONPATH can find the package.
    base = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    script = "import os, cmedl; print(os.path.dirname(os.path.dirname(cmedl.__file__))); print(os.getcwd())"
    events: list[dict] = []
    job = Job.start_command([sys.executable, "-S", "-c", script], env=base, cwd=tmp_path)
    result = job.wait(timeout=30, on_event=events.append)
    assert result.ok, result.error
    assert result.stderr == ""
    assert [Path(event["message"]) for event in events] == [PROJECT_ROOT, tmp_path]
    assert job.poll() == []  # wait() handed them all out


def test_engine_version_through_a_job(tmp_path: Path) -> None:
    events: list[dict] = []
    result = Job.start(["--version"], cwd=tmp_path, device="cpu").wait(timeout=30, on_event=events.append)
    assert result.ok and result.returncode == 0 and result.exit_code == 0 and result.error == ""
    assert events == [{"event": "log", "message": events[0]["message"]}]
    assert events[0]["message"].startswith("cmedl ")
    result.raise_for_error()  # nothing to raise


def test_a_missing_interpreter_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(CMEDLError, match="cannot start"):
        Job.start(["--version"], python=str(tmp_path / "no-python"))


# -- events and results ------------------------------------------------------------------------------

PROGRESS_SCRIPT = """
    import json, sys, time
    def send(**event):
        print(json.dumps(event), flush=True)
    for done in range(4):
        send(event="progress", stage="segment", done=done, total=4, message="slices")
        time.sleep(0.1)
    print("a plain line", flush=True)
    send(event="progress", stage="segment", done=3, total=4, message="slices")
    print("some warning on stderr", file=sys.stderr, flush=True)
    send(event="error", message="model.safetensors is truncated", exit_code=4)
    print("cmedl: error: model.safetensors is truncated", file=sys.stderr, flush=True)
    sys.exit(4)
"""


def test_poll_hands_out_events_in_order_while_the_child_runs() -> None:
    job = python_job(PROGRESS_SCRIPT)
    assert job.fraction() is None and job.stage == ""
    started = time.monotonic()
    events: list[dict] = []
    fractions: list[float | None] = []
    while job.running:
        batch = job.poll()  # never blocks
        events.extend(batch)
        if batch:
            fractions.append(job.fraction())
        time.sleep(0.02)
        assert time.monotonic() - started < 20
    assert job.returncode == 4
    result = job.wait(timeout=10, on_event=events.append)
    kinds = [event["event"] for event in events]
    assert kinds == ["progress"] * 4 + ["log", "progress", "error"]
    assert [event["done"] for event in events if event["event"] == "progress"] == [0, 1, 2, 3, 3]
    assert events[4] == {"event": "log", "message": "a plain line"}
    # Events arrived over time, not all at the end.
    assert len(fractions) >= 2 and fractions[0] is not None and fractions[0] < 0.75
    assert job.fraction() == pytest.approx(0.75)
    assert job.stage == "segment"
    assert job.latest_progress == {"event": "progress", "stage": "segment", "done": 3, "total": 4, "message": "slices"}
    assert isinstance(result, JobResult)
    assert not result.ok and not result.cancelled and not result.timed_out
    assert result.returncode == 4 and result.exit_code == 4
    assert result.error == "model.safetensors is truncated"
    assert result.events == 7
    assert result.stderr.splitlines() == ["some warning on stderr", "cmedl: error: model.safetensors is truncated"]
    with pytest.raises(ModelFileError, match="^model.safetensors is truncated$"):
        result.raise_for_error()


def test_wait_delivers_the_done_result() -> None:
    script = """
        import json
        print(json.dumps({"event": "progress", "stage": "phantom", "done": 2, "total": 2, "message": "cases"}))
        print(json.dumps({"event": "done", "result": {"output": "ct.seg.nrrd", "tumour_volume_ml": 12.5}}))
    """
    events: list[dict] = []
    job = python_job(script)
    result = job.wait(timeout=30, on_event=events.append)
    assert result.ok and result.error == "" and result.exit_code == 0
    assert result.result == {"output": "ct.seg.nrrd", "tumour_volume_ml": 12.5}
    assert [event["event"] for event in events] == ["progress", "done"]
    assert job.fraction() == 1.0


def test_progress_with_an_unknown_total_has_no_fraction() -> None:
    script = 'print(\'{"event": "progress", "stage": "data", "done": 5, "total": 0, "message": ""}\')'
    job = python_job(script)
    job.wait(timeout=30)
    assert job.stage == "data" and job.fraction() is None


def test_a_real_engine_error_arrives_as_an_event_and_an_exit_code(tmp_path: Path) -> None:
    events: list[dict] = []
    job = Job.start(["phantom", str(tmp_path / "out"), "--ct", "0", "--mr", "0", "--progress", "json"], device="cpu")
    result = job.wait(timeout=60, on_event=events.append)
    message = "ask for at least one case (--ct N and/or --mr M, not negative)"
    assert events == [{"event": "error", "message": message, "exit_code": 3}]
    assert result.returncode == 3 and result.exit_code == 3 and result.error == message
    assert result.stderr.strip() == f"cmedl: error: {message}"
    with pytest.raises(InputError, match="at least one case"):
        result.raise_for_error()
    assert not (tmp_path / "out").exists()


def test_a_command_line_usage_error_is_bad_input_not_no_lungs() -> None:
    result = Job.start(["segment"]).wait(timeout=30)
    assert result.returncode == 2  # argparse's own code, which is also "no lungs found"
    assert result.exit_code == 3
    assert result.error == "the following arguments are required: input, -o/--output"
    with pytest.raises(InputError):
        result.raise_for_error()


@pytest.mark.parametrize(
    ("script", "exit_code", "error_type", "message"),
    [
        # Without --progress json only stderr tells what happened: the engine's one error line wins.
        (
            "import sys; print('cmedl: error: cannot write out.nrrd', file=sys.stderr); "
            "print('later noise', file=sys.stderr); sys.exit(6)",
            6,
            OutputError,
            "cannot write out.nrrd",
        ),
        ("import sys; print('Segmentation fault', file=sys.stderr); sys.exit(1)", 1, CMEDLError, "Segmentation fault"),
        ("import sys; sys.exit(9)", 9, CMEDLError, "the engine stopped with exit code 9"),
    ],
)
def test_the_error_line_comes_from_stderr_when_there_is_no_event(
    script: str, exit_code: int, error_type: type, message: str
) -> None:
    result = python_job(script).wait(timeout=30)
    assert result.exit_code == exit_code and result.error == message
    with pytest.raises(error_type) as caught:
        result.raise_for_error()
    assert type(caught.value) is error_type
    assert str(caught.value) == message


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_a_child_killed_by_a_signal_says_so() -> None:
    script = "import os, signal, sys; print('a warning', file=sys.stderr, flush=True); os.kill(os.getpid(), 9)"
    result = python_job(script).wait(timeout=30)
    assert result.returncode == -9 and result.exit_code == 137 and not result.cancelled
    assert result.error == "the engine was stopped by signal SIGKILL"


def test_lots_of_stderr_neither_blocks_the_child_nor_grows_the_tail() -> None:
    script = """
        import json, sys
        line = "x" * 99
        for number in range(10_000):
            sys.stderr.write(f"{number:06d} {line}\\n")
        sys.stderr.write("y" * 400_000 + "\\n")
        sys.stderr.write("last words\\n")
        sys.stderr.flush()
        print(json.dumps({"event": "done", "result": {"lines": 10_002}}))
    """
    started = time.monotonic()
    result = python_job(script).wait(timeout=30)
    assert result.ok and not result.timed_out
    assert result.result == {"lines": 10_002}
    assert time.monotonic() - started < 15
    lines = result.stderr.splitlines()
    assert len(lines) <= STDERR_TAIL_LINES
    assert len(result.stderr) <= STDERR_TAIL_CHARS + STDERR_TAIL_LINES
    assert lines[-1] == "last words"
    assert lines[-2] == "y" * STDERR_LINE_CHARS  # the runaway line is cut, not kept whole
    assert lines[-3] == "009999 " + "x" * 99


def test_poll_returns_at_once_while_the_child_is_quiet() -> None:
    with python_job("import time; time.sleep(30)") as job:
        started = time.monotonic()
        assert job.poll() == []
        assert time.monotonic() - started < 0.5
        assert job.running and job.returncode is None
    assert not job.running and job.cancelled  # leaving the block cancelled it


# -- cancelling --------------------------------------------------------------------------------------

TREE_SCRIPT = """
    import json, subprocess, sys, time
    own_session = len(sys.argv) > 1  # such a grandchild is found only as a descendant, not by its group
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=own_session)
    print(json.dumps({"event": "log", "message": str(grandchild.pid)}), flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "own-session"])
def test_cancel_stops_the_child_and_its_grandchild(own_session: bool) -> None:
    job = python_job(TREE_SCRIPT, *(["own-session"] if own_session else []))
    grandchild = int(first_event(job, "log")["message"])
    child = job.pid
    assert process_alive(child) and process_alive(grandchild)
    grandchild_process = psutil.Process(grandchild)
    assert grandchild_process.ppid() == child
    started = time.monotonic()
    assert job.cancel(grace_seconds=3.0) is True
    assert time.monotonic() - started < 5
    assert not job.running
    assert wait_gone(child) and wait_gone(grandchild)
    result = job.wait(timeout=10)
    assert result.cancelled and not result.ok and not result.timed_out
    assert result.exit_code == 130 and result.error == "cancelled by the user"
    assert result.returncode is not None and result.returncode != 0
    with pytest.raises(CancelledError):
        result.raise_for_error()
    # Cancelling again, after the end, does nothing and changes nothing.
    assert job.cancel() is False
    assert job.wait(timeout=1).cancelled


@pytest.mark.skipif(not POSIX, reason="SIGTERM can be ignored only on POSIX")
@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "own-session"])
def test_cancel_kills_what_ignores_the_polite_request(own_session: bool) -> None:
    script = """
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        grandchild = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=len(sys.argv) > 1)
        time.sleep(0.3)  # the grandchild installs its handler
        print(json.dumps({"event": "log", "message": str(grandchild.pid)}), flush=True)
        time.sleep(60)
    """
    job = python_job(script, *(["own-session"] if own_session else []))
    grandchild = int(first_event(job, "log")["message"])
    started = time.monotonic()
    job.cancel(grace_seconds=0.5)
    assert time.monotonic() - started < 4
    assert wait_gone(job.pid, 2) and wait_gone(grandchild, 2)
    assert job.returncode == -9


@pytest.mark.skipif(not POSIX, reason="process groups are POSIX")
def test_cancel_reaches_an_orphan_left_in_the_childs_group() -> None:
    # The middle process exits at once: its child is re-parented and no longer a descendant of the job's child.
    script = """
        import json, subprocess, sys, time
        middle = (
            "import subprocess, sys; "
            "orphan = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(orphan.pid)"
        )
        orphan = int(subprocess.run([sys.executable, "-c", middle], capture_output=True, text=True).stdout)
        print(json.dumps({"event": "log", "message": str(orphan)}), flush=True)
        time.sleep(60)
    """
    job = python_job(script)
    orphan = int(first_event(job, "log")["message"])
    assert process_alive(orphan)
    assert orphan not in [process.pid for process in psutil.Process(job.pid).children(recursive=True)]
    job.cancel(grace_seconds=3.0)
    assert wait_gone(job.pid) and wait_gone(orphan)


def test_cancel_after_a_normal_end_leaves_the_result_alone() -> None:
    job = python_job("print('fine')")
    result = job.wait(timeout=30)
    assert job.cancel() is False
    assert result.ok and job.wait(timeout=1).ok and not job.cancelled


def test_wait_with_a_timeout_cancels_the_child() -> None:
    job = python_job("import time; print('started', flush=True); time.sleep(60)")
    started = time.monotonic()
    result = job.wait(timeout=1.0)
    assert time.monotonic() - started < 6
    assert result.cancelled and result.timed_out and not result.ok
    assert result.error == "timed out after 1 s"
    assert not process_alive(job.pid)
    with pytest.raises(CancelledError, match="timed out"):
        result.raise_for_error()


def test_an_exception_in_the_event_handler_cancels_the_child() -> None:
    job = python_job(TREE_SCRIPT)
    seen: list[int] = []

    def refuse(event: dict) -> None:
        seen.append(int(event["message"]))
        raise RuntimeError("the caller gave up")

    with pytest.raises(RuntimeError, match="gave up"):
        job.wait(timeout=30, on_event=refuse)
    assert job.cancelled
    assert wait_gone(job.pid) and wait_gone(seen[0])


# -- detached runs -----------------------------------------------------------------------------------


def test_detached_child_is_followed_and_stopped_by_pid(tmp_path: Path) -> None:
    log = tmp_path / "runs" / "run1" / "train.log"
    script = """
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(worker.pid, flush=True)
        print("a warning", file=sys.stderr, flush=True)
        time.sleep(60)
    """
    pid = start_detached_command([sys.executable, "-c", textwrap.dedent(script)], log)
    try:
        created = process_create_time(pid)
        assert created is not None and abs(created - time.time()) < 30
        assert process_alive(pid) and process_alive(pid, created)
        assert not process_alive(pid, created - 100)  # as if the pid now named a process started later
        assert not terminate_tree(pid, create_time=created - 100)
        assert process_alive(pid)
        if POSIX:
            assert os.getsid(pid) == pid  # its own session: closing the terminal or Slicer does not reach it
        deadline = time.monotonic() + 10
        while "a warning" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        worker_pid_line, warning = log.read_text().splitlines()
        assert warning == "a warning"
        worker = int(worker_pid_line)
        assert process_alive(worker)
        assert terminate_tree(pid, grace_seconds=3.0, create_time=created) is True
        assert not process_alive(pid) and not process_alive(pid, created)
        assert wait_gone(worker, 2)
        assert terminate_tree(pid) is False
    finally:
        terminate_tree(pid, grace_seconds=0.5)


@pytest.mark.skipif(not POSIX, reason="sessions are POSIX")
def test_stopping_a_finished_detached_child_stops_what_it_left_running(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    script = """
        import subprocess, sys
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(worker.pid, flush=True)
    """
    pid = start_detached_command([sys.executable, "-c", textwrap.dedent(script)], log)
    worker = None
    try:
        assert wait_gone(pid, 10)
        worker = int(log.read_text())
        assert process_alive(worker) and os.getpgid(worker) == pid
        assert terminate_tree(pid, grace_seconds=3.0) is True
        assert wait_gone(worker, 2)
        assert terminate_tree(pid) is False
    finally:
        if worker is not None and process_alive(worker):
            psutil.Process(worker).kill()


def test_detached_engine_appends_to_its_log_and_is_reaped(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text("earlier run\n")
    pid = start_detached(["--version"], log, device="cpu", cwd=tmp_path)
    deadline = time.monotonic() + 30
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # It exited; though it is a child of this process it does not linger as a live-looking zombie.
    assert not process_alive(pid)
    if POSIX:
        assert not psutil.pid_exists(pid)  # reaped, not a zombie
    assert log.read_text().splitlines()[0] == "earlier run"
    assert log.read_text().splitlines()[1].startswith("cmedl ")
    assert terminate_tree(pid) is False


def test_detached_log_that_cannot_be_written_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write the log"):
        start_detached(["--version"], blocker / "train.log")


def test_process_queries_for_pids_that_do_not_exist() -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert not process_alive(finished.pid)
    assert process_create_time(finished.pid) is None
    assert not process_alive(0) and not process_alive(-5)
    assert process_alive(os.getpid(), process_create_time(os.getpid()))
    assert terminate_tree(finished.pid) is False
    with pytest.raises(ValueError):
        terminate_tree(os.getpid())


def test_results_are_plain_data() -> None:
    result = JobResult(
        returncode=0, cancelled=False, timed_out=False, result={"a": 1}, error="", exit_code=0, stderr=""
    )
    assert result.ok
    assert json.loads(json.dumps(result.result)) == {"a": 1}
    cancelled = JobResult(0, True, False, {}, "cancelled by the user", 130, "")
    assert not cancelled.ok
    with pytest.raises(CancelledError):
        cancelled.raise_for_error()
