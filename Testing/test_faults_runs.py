"""Issue 12, training runs and their configuration: every fault found by trying bad inputs, reproduced.

- runs: two runs into one folder, a run with no checkpoint yet, leftovers of an interrupted checkpoint write;
- stops: SIGTERM and SIGINT in every phase of ``cmedl train`` (data, training steps, validation) and during
  ``cmedl segment``, each in a real child process signalled once it has reached that phase;
- values that ended as "unexpected error" (exit 1) or were taken silently: learning rates, betas, batch sizes
  that cannot fit, ``--resume``/``--out`` paths, phantom sizes, label files that are not 0 and 1;
- a pickle checkpoint, and the learning rate of a finished run resumed with more epochs.

The child processes are started together at the beginning (module fixture), and tests that train in this
process use two 64x64 phantoms, 32x32 patches and a 4-channel U-Net, so the file stays short on a busy machine.
"""

from __future__ import annotations

import fractions
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import PROJECT_ROOT, SECONDS_RUN

from cmedl.cli import main
from cmedl.errors import ConfigError, InputError, RunInUseError
from cmedl.progress import CallbackProgress
from cmedl.training.config import TrainConfig
from cmedl.training.data import CasePaths, prepare_volume
from cmedl.training.inventory import scan_folder
from cmedl.training.objectives import build_objective
from cmedl.training.runfolder import LOCK_FILE, RunFolder
from cmedl.training.trainer import Trainer
from cmedl.volumes import normalise_hu

POSIX = os.name == "posix"
pytestmark = pytest.mark.skipif(not POSIX, reason="signals and mounts as on Linux")

#: a run that takes seconds (no validation unless a test asks)
RUN = SECONDS_RUN
STOP_WITHIN_S = 5.0  # the issue's bound from the signal to the stopped state on disk
# ... and to the exit, which adds the interpreter's teardown (torch's, slow on a loaded machine).
EXIT_WITHIN_S = 20.0
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": str(PROJECT_ROOT),
    # Children that share two busy cores: more threads only wait for each other.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def write_config(path: Path, **changes) -> Path:
    path.write_text(json.dumps({**RUN, **changes}))
    return path


# -- data ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two CT phantoms (64x64) as ``ct/images`` and ``ct/labels``, and ``many/``: 30 cases linked to them, so
    that reading the data takes a while (the data-preparation stop needs time to arrive in)."""
    from cmedl.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("faults_runs")
    write_phantom_dataset(root, n_ct=2, n_mr=0, seed=3, size=64)
    for kind in ("images", "labels"):
        (root / "many" / kind).mkdir(parents=True)
        for index in range(30):
            source = root / "ct" / kind / f"ct_{index % 2:04d}.nii.gz"
            (root / "many" / kind / f"case_{index:03d}.nii.gz").symlink_to(source)
    return root


# -- stop signals: real child processes, signalled in the phase under test ------------------------------------


class SignalledChild:
    """``python -m cmedl ARGS --progress json``, sent ``signum`` once an event satisfies ``trigger``."""

    def __init__(self, args: list[str], trigger: Callable[[dict], bool], signum: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cmedl", *args, "--progress", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
        )
        self.trigger, self.signum = trigger, signum
        self.events: list[dict] = []
        self.signalled_at: float | None = None
        self.signalled_wall: float | None = None  # time.time(), to compare with file times
        self.ended_at: float | None = None
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            self.events.append(event)
            if self.signalled_at is None and self.trigger(event):
                self.process.send_signal(self.signum)
                self.signalled_at, self.signalled_wall = time.monotonic(), time.time()
        self.process.wait()
        self.ended_at = time.monotonic()

    def finish(self, timeout: float = 240.0) -> tuple[int, str]:
        """The exit code and stderr, once the child has ended (killed and failed after ``timeout``)."""
        self.watcher.join(timeout)
        if self.watcher.is_alive():
            self.process.kill()
            pytest.fail(f"the child did not end; last events: {self.events[-3:]}")
        assert self.signalled_at is not None, f"the phase was never reached; last events: {self.events[-3:]}"
        assert self.process.stderr is not None
        return self.process.returncode, self.process.stderr.read()

    @property
    def seconds_to_stop(self) -> float:
        assert self.ended_at is not None and self.signalled_at is not None
        return self.ended_at - self.signalled_at


def stage(name: str, at_least: int = 0) -> Callable[[dict], bool]:
    return lambda event: event.get("stage") == name and event.get("done", 0) >= at_least


@pytest.fixture(scope="module", autouse=True)
def children(data: Path, tmp_path_factory) -> Iterator[dict[str, SignalledChild]]:
    """Every signal test's child, started together with the first test of the file: their start-up (importing
    torch) and their work overlap with each other and with the tests that run in this process; the signal tests
    come last and mostly collect the outcome."""
    root = tmp_path_factory.mktemp("signalled")
    (root / "seg").mkdir()
    started = {
        "data": SignalledChild(
            ["train", "--config", str(write_config(root / "data.json", ct=str(data / "many"))),
             "--out", str(root / "data_run")],
            stage("data", at_least=1),
            signal.SIGTERM,
        ),
        "training": SignalledChild(
            ["train", "--config", str(write_config(root / "train.json", ct=str(data / "ct"),
                                                   iterations_per_epoch=100_000)),
             "--out", str(root / "training_run")],
            stage("iteration", at_least=2),
            signal.SIGINT,
        ),
        # Validation tiles overlapping by 90% make one slice slow enough to be caught between slices (of every
        # slice: a sample of a few could be over before the signal).
        "validation": SignalledChild(
            ["train", "--config", str(write_config(root / "val.json", ct=str(data / "ct"), validation_fraction=0.5,
                                                   validation_overlap=0.9, validation_slices_per_case=0)),
             "--out", str(root / "validation_run")],
            stage("validation", at_least=1),
            signal.SIGTERM,
        ),
        "segment": SignalledChild(
            ["segment", str(data / "ct" / "images" / "ct_0000.nii.gz"), "-o", str(root / "seg" / "tumour.nii.gz"),
             "--device", "cpu"],
            stage("segment"),
            signal.SIGTERM,
        ),
    }  # fmt: skip
    yield started
    for child in started.values():
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


# -- runs: one process per folder, restarts, leftovers ---------------------------------------------------------


def _claim_in_child(run: Path) -> subprocess.Popen:
    code = "import sys, time\nfrom cmedl.training.runfolder import RunFolder\nRunFolder(sys.argv[1]).claim()\n" \
           "print('claimed', flush=True)\ntime.sleep(120)\n"  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    assert child.stdout is not None and child.stdout.readline().strip() == "claimed"
    return child


def test_a_second_train_into_a_folder_in_use_is_refused_and_a_dead_owner_is_taken_over(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    config = write_config(tmp_path / "config.json", ct=str(data / "ct"))
    owner = _claim_in_child(run)
    try:
        assert main(["train", "--config", str(config), "--out", str(run)]) == 6
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and f"in use by pid {owner.pid} on this host" in error, error
        (run / "config.json").write_text(json.dumps({**RUN, "ct": str(data / "ct"), "out": str(run)}))
        assert main(["train", "--resume", str(run)]) == 6  # nor resumed while it runs
        assert f"pid {owner.pid}" in capsys.readouterr().err
    finally:
        owner.kill()  # like SIGKILL of a training process: the lock stays behind
        owner.wait()
    assert (run / LOCK_FILE).exists()
    # what a kill during the first checkpoint write leaves
    (run / ".checkpoint.pt.k3j9x.partial.pt").write_bytes(b"torn")
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    log = (run / "train.log").read_text()
    assert "has no checkpoint (no epoch finished): starting it again from the beginning" in log
    assert "removed 1 unfinished file(s) of an interrupted write: .checkpoint.pt.k3j9x.partial.pt" in log
    assert not (run / LOCK_FILE).exists() and not list(run.glob(".*partial*"))
    assert RunFolder(run).read_status()["state"] == "finished"


def test_a_lock_from_another_host_is_refused_with_the_way_to_remove_it(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.lock_path.write_text(json.dumps({"pid": 1234, "host": "node-elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunInUseError, match=f"pid 1234 on host node-elsewhere.*remove {folder.lock_path}"):
        folder.claim()
    # two claims of one process (two trainers in Slicer's Python, say) exclude each other too
    folder.lock_path.unlink()
    first, second = RunFolder(tmp_path), RunFolder(tmp_path)
    first.claim()
    with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):
        second.claim()
    first.release()
    assert not folder.lock_path.exists()
    second.claim()
    second.release()


def test_a_run_without_checkpoint_restarts_in_place_and_other_cases_say_what_works(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.json", ct=str(data / "ct"))
    command = ["train", "--config", str(config), "--out", str(run)]
    assert main(command) == 0
    # as if killed during epoch 1: an epoch's metric line and model, but no checkpoint
    RunFolder(run).checkpoint_path.unlink()
    assert main(command) == 0, capsys.readouterr().err
    assert "never finished an epoch: starting it again" in (run / "train.log").read_text()
    assert [record["epoch"] for record in RunFolder(run).read_metrics()] == [1]
    capsys.readouterr()
    # with a checkpoint the same command points to --resume
    assert main(command) == 3
    assert f"already holds a run; resume it with cmedl train --resume {run}" in capsys.readouterr().err
    # without one, another configuration is refused with both ways out
    RunFolder(run).checkpoint_path.unlink()
    assert main([*command, "--seed", "9"]) == 3
    error = capsys.readouterr().err
    assert "seed 0 -> 9" in error and f"cmedl train --resume {run}" in error and "choose another --out" in error


def test_resume_and_out_paths_that_cannot_be_runs(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "config.json", ct=str(data / "ct"))
    a_file = tmp_path / "not_a_run.txt"
    a_file.write_text("x")
    assert main(["train", "--resume", str(a_file)]) == 3
    assert "--resume expects a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 3
    assert "holds no run (no config.json)" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(a_file)]) == 6
    assert "is a file, not a run folder" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(a_file / "run")]) == 6
    assert "cannot create the run folder" in capsys.readouterr().err


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs with the given options (``ro``, ``size=300k``); skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mount{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_out_on_a_read_only_or_full_file_system_is_an_output_error(
    data: Path, tmp_path: Path, small_mount: Callable[[str], Path], capsys: pytest.CaptureFixture
) -> None:
    config = write_config(tmp_path / "config.json", ct=str(data / "ct"))
    read_only = small_mount("ro,size=1m")
    assert main(["train", "--config", str(config), "--out", str(read_only / "run")]) == 6
    assert "Read-only file system" in capsys.readouterr().err
    # room for the small files, not for the checkpoint (about 750 kB)
    full = small_mount("size=400k")
    assert main(["train", "--config", str(config), "--out", str(full / "run")]) == 6
    lines = capsys.readouterr().err.strip().splitlines()
    # The run's log lines come first: the cache of prepared volumes gave way, and training went on without it.
    assert any(line.startswith("cache: ") and "training goes on without" in line for line in lines[:-1]), lines
    assert not any(line.startswith("cmedl") or "Traceback" in line for line in lines[:-1]), lines
    error = lines[-1]
    assert error.startswith("cmedl: error: cannot write"), error
    assert not (full / "run" / LOCK_FILE).exists()
    assert not list((full / "run").glob(".*partial*"))


# -- values ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("lr_segmentor=-1", "lr_segmentor must be positive"),
        ("lr_segmentor=NaN", "lr_segmentor must be positive and finite, got nan"),
        ("lr_translator=Infinity", "lr_translator must be positive and finite"),
        ("weight_decay=-5", "weight_decay must be at least 0"),
        ("betas=[2, 2]", "betas must be two numbers in [0, 1)"),
        ("batch_size=100000000", "batch_size must be at most 4,096"),
        ("patch_size=0", "patch_size must be at least 32"),
        ("epochs=1e400", "invalid value for epochs"),
        ("spacing_mm=[1e6, 1e6]", "spacing_mm must be two values from 0.01 to 50 mm"),
        ("spacing_mm=[1e-6, 1e-6]", "spacing_mm must be two values from 0.01 to 50 mm"),
        ("hu_window=[500, -1000]", "hu_window must be (low, high) with low < high"),
        ("hu_window=[0, 0]", "hu_window must be (low, high) with low < high"),
        ('segmentor_options={"base_channels": 1000000}', "base_channels must be an integer from 1 to 1024"),
        ("validation_overlap=1", "validation_overlap must be a finite number in [0, 0.9]"),
        ("label_value=0", "label_value must be at least 1"),
    ],
)
def test_out_of_range_training_values_are_configuration_errors(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, assignment: str, message: str
) -> None:
    config = write_config(tmp_path / "config.json", ct=str(data / "ct"))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--set", assignment]) == 7
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error, error
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the command line gave its handlers back


def test_a_batch_that_cannot_fit_is_refused_at_once_with_the_estimate(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_config(tmp_path / "config.json", ct=str(data / "ct"))
    started = time.monotonic()
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--batch-size", "4096",
                 "--patch-size", "4096"])  # fmt: skip
    assert code == 7 and time.monotonic() - started < 10
    assert "batch_size 4096 with 4096x4096 patches needs about" in capsys.readouterr().err
    problem = TrainConfig.from_dict({**RUN, "batch_size": 64, "patch_size": 512}).memory_problem(2**30, "RAM")
    assert "needs about" in problem and "1.0 GiB free in RAM" in problem
    assert TrainConfig.from_dict(RUN).memory_problem(2**30, "RAM") == ""


def test_a_phantom_too_large_for_this_machine_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "phantom"
    assert main(["phantom", str(out), "--ct", "1", "--mr", "0", "--size", "200000"]) == 3
    assert "--size must be at most 4096, got 200000" in capsys.readouterr().err
    monkeypatch.setattr("cmedl.phantom.case.available_ram_bytes", lambda: 2**30)
    assert main(["phantom", str(out), "--ct", "1", "--mr", "0", "--size", "1024"]) == 3
    assert "--size 1024 needs about 3.1 GiB of memory per case, more than the 1.0 GiB free" in capsys.readouterr().err
    assert not out.exists()


def _label_case(folder: Path, name: str, label: np.ndarray) -> CasePaths:
    """A small CT (air around a soft-tissue box holding a patch of lung, so that it looks like a CT to the check
    every CT training image passes) and its label volume ``label`` (any dtype) as files."""
    ct = np.full(label.shape, -1000, dtype=np.int16)
    ct[:, 2:-2, 2:-2] = 40
    ct[:, 10:13, 3:13] = -800
    paths = []
    for kind, array in (("images", ct), ("labels", label)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 3.0))
        paths.append(folder / kind / f"{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return CasePaths(name, paths[0], paths[1])


def _labels(values: list[float], dtype: type) -> np.ndarray:
    label = np.zeros((4, 16, 16), dtype=dtype)
    for index, value in enumerate(values):
        label[1 + index % 2, 6 + index, 6:9] = value
    return label


@pytest.mark.parametrize(
    ("values", "dtype", "message"),
    [
        ([2], np.uint8, "holds values 0, 2 (expected 0 and 1; use --set label_value=2 to take 2 as tumour)"),
        ([257, 256], np.int16, "holds values 0, 256, 257 (expected 0 and 1: one tumour value"),
        ([0.5], np.float32, "holds non-integer values such as 0.5 (expected 0 and 1)"),
        ([-1], np.int16, "holds values -1, 0 (expected 0 and 1: one tumour value"),
        ([1, 2], np.uint8, "holds values 0, 1, 2 (expected 0 and 1: one tumour value"),
    ],
)
def test_labels_that_are_not_zero_and_one_are_refused_with_the_values_found(
    tmp_path: Path, values: list[float], dtype: type, message: str
) -> None:
    case = _label_case(tmp_path, "case3", _labels(values, dtype))
    with pytest.raises(InputError) as refused:
        prepare_volume(case, (2.0, 2.0), lambda hu: normalise_hu(hu, (-1000.0, 500.0)))
    assert str(refused.value).startswith(f"{case.label} {message}")
    # the data check before a run finds it too
    (issue,) = [c.label_issue for c in scan_folder(tmp_path / "images", tmp_path / "labels").label_issues]
    assert issue.startswith(message)


def test_label_value_takes_another_value_as_tumour(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    case = _label_case(tmp_path / "twos", "case3", _labels([2, 2], np.uint8))
    volume = prepare_volume(case, (2.0, 2.0), lambda hu: normalise_hu(hu, (-1000.0, 500.0)), label_value=2)
    assert volume.label.dtype == np.uint8 and set(np.unique(volume.label)) == {0, 1}
    assert int(volume.label.sum()) == 6 and len(volume.tumour_slices) == 2
    # through the command line: the label file and its values are named, exit 3, nothing trained
    labels = tmp_path / "ct"
    (labels / "labels").mkdir(parents=True)
    (labels / "images").symlink_to(data / "ct" / "images")
    for path in (data / "ct" / "labels").iterdir():
        image = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8) * 2, str(labels / "labels" / path.name))
    config = write_config(tmp_path / "config.json", ct=str(labels))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 3
    error = capsys.readouterr().err
    assert f"{labels / 'labels' / 'ct_0000.nii.gz'} holds values 0, 2" in error and "label_value=2" in error
    assert RunFolder(tmp_path / "run").read_status()["state"] == "failed"
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--set", "label_value=2"]) == 0


def test_a_pickle_checkpoint_is_refused_without_torch_advice(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_json("config.json", {**RUN, "ct": str(data / "ct"), "out": str(run.path)})
    # Python objects besides tensors: what weights_only loading refuses (and torch advises loading unsafely)
    torch.save({"epoch": 1, "objective": {}, "payload": fractions.Fraction(1, 3)}, run.checkpoint_path)
    assert main(["train", "--resume", str(run.path)]) == 3
    error = capsys.readouterr().err
    # One error line, the last; before it only the run's own log lines (the data it read, say).
    lines = error.strip().splitlines()
    assert lines[-1].startswith("cmedl: error: ") and "holds Python objects besides tensors" in lines[-1], error
    assert not any(line.startswith("cmedl") or "Traceback" in line for line in lines[:-1]), error
    assert "weights_only" not in error and "trust" not in error
    assert not run.lock_path.exists()


# -- resumes ------------------------------------------------------------------------------------------------------


def test_resuming_a_finished_run_with_more_epochs_trains_at_the_new_schedules_rate(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig.from_dict({**RUN, "ct": str(data / "ct"), "out": str(out), "epochs": 2})
    assert Trainer(config).fit()["state"] == "finished"
    finished = RunFolder(out).load_checkpoint()
    assert finished["objective"]["optimizers"]["student"]["param_groups"][0]["lr"] == 0.0  # end of the decay
    # Epoch 3 of 4 with half the epochs decaying runs at 2/3 of the rate: set on loading, not one epoch later.
    longer = build_objective(TrainConfig.from_dict({**config.to_dict(), "epochs": 4}), torch.device("cpu"), None)
    longer.load_state_dict(finished["objective"])
    assert longer.optimizers["student"].param_groups[0]["lr"] == pytest.approx(config.lr_segmentor * 2 / 3)
    assert Trainer.resume_run(out, epochs=3).fit()["state"] == "finished"
    before = finished["objective"]["networks"]["student"]
    after = RunFolder(out).load_checkpoint()["objective"]["networks"]["student"]
    weights = [name for name in before if name.endswith(".weight") and before[name].dim() == 4]
    assert any(not torch.equal(before[name], after[name]) for name in weights), "epoch 3 trained at rate 0"


def test_a_stop_between_steps_is_saved_and_the_epoch_continues_on_resume(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig.from_dict({**RUN, "ct": str(data / "ct"), "out": str(out), "iterations_per_epoch": 3})
    handler = signal.getsignal(signal.SIGTERM)
    seen_handlers = []

    def on_event(event: dict) -> None:
        if event.get("stage") == "iteration":
            seen_handlers.append(signal.getsignal(signal.SIGTERM))
            if event["done"] == 1:
                trainer.request_stop()

    trainer = Trainer(config, CallbackProgress(on_event))
    status = trainer.fit()
    assert status["state"] == "stopped" and "during epoch 1 after iteration 1/3" in status["message"]
    # an engine used as a library (inside Slicer) leaves the host's signal handlers alone
    assert seen_handlers and all(seen is handler for seen in seen_handlers)
    state = RunFolder(out).load_checkpoint()
    assert state["epoch"] == 0 and state["partial"]["iteration"] == 1
    assert Trainer.resume_run(out).fit()["state"] == "finished"
    assert [record["epoch"] for record in RunFolder(out).read_metrics()] == [1]
    assert "after epoch 0, iteration 1 of epoch 1" in (out / "train.log").read_text()


def test_a_run_refused_by_its_configuration_leaves_no_lock_and_no_folder(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Trainer(TrainConfig.from_dict({**RUN, "ct": str(data / "ct"), "out": str(tmp_path / "run"), "betas": [1, 1]}))
    assert not (tmp_path / "run").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    with pytest.raises(InputError, match="already holds a run that never finished an epoch"):
        Trainer(TrainConfig.from_dict({**RUN, "ct": str(data / "ct"), "out": str(taken)})).fit()
    assert sorted(path.name for path in taken.iterdir()) == ["config.json"]


# -- stop signals: the children started at the beginning, by now signalled and ended --------------------------


def run_of(child: SignalledChild) -> RunFolder:
    args = child.process.args
    return RunFolder(args[args.index("--out") + 1])


def assert_stopped(child: SignalledChild, expected_in_message: str) -> RunFolder:
    code, stderr = child.finish()
    assert code == 130, stderr
    run = run_of(child)
    status = run.read_status()
    assert status["state"] == "stopped" and expected_in_message in status["message"], status
    assert not run.lock_path.exists(), "the run folder was not given back"
    assert child.signalled_wall is not None
    stopped_after = run.status_path.stat().st_mtime - child.signalled_wall
    assert stopped_after < STOP_WITHIN_S, f"{stopped_after:.1f} s from the signal to the stopped status"
    assert child.seconds_to_stop < EXIT_WITHIN_S, f"{child.seconds_to_stop:.1f} s from the signal to the exit"
    assert not list(run.path.glob(".*.partial*"))
    return run


def test_sigterm_while_preparing_data_stops_at_once(children: dict[str, SignalledChild]) -> None:
    run = assert_stopped(children["data"], "stopped by SIGTERM while preparing data")
    assert not run.has_checkpoint()
    done = [event for event in children["data"].events if event.get("stage") == "data"]
    assert done[-1]["done"] < done[-1]["total"], "the data were all read: the stop came too late to test"


def test_sigint_during_training_saves_the_finished_steps_and_exits_130(children: dict[str, SignalledChild]) -> None:
    run = assert_stopped(children["training"], "stopped by SIGINT during epoch 1 after iteration")
    state = run.load_checkpoint()
    assert state["epoch"] == 0 and state["partial"]["epoch"] == 1 and state["partial"]["iteration"] >= 2
    assert "seg_ct" in state["partial"]["sums"]


def test_sigterm_during_validation_stops_between_slices_and_resume_validates(
    children: dict[str, SignalledChild],
) -> None:
    child = children["validation"]
    run = assert_stopped(child, "stopped by SIGTERM while validating epoch 1")
    validated = [event for event in child.events if event.get("stage") == "validation"]
    assert validated[-1]["done"] < validated[-1]["total"], "validation had finished: the stop came too late"
    state = run.load_checkpoint()
    assert state["partial"] == {"epoch": 1, "iteration": 1, "sums": state["partial"]["sums"]}
    assert run.read_metrics() == []
    resumed = Trainer.resume_run(run.path, validation_overlap=0.0).fit()
    assert resumed["state"] == "finished"
    assert [record["epoch"] for record in run.read_metrics()] == [1]


def test_sigterm_during_segment_exits_130_and_leaves_nothing(children: dict[str, SignalledChild]) -> None:
    child = children["segment"]
    code, stderr = child.finish()
    assert code == 130
    assert stderr.strip() == "cmedl: error: stopped by SIGTERM; nothing written"
    assert child.seconds_to_stop < EXIT_WITHIN_S
    output_folder = Path(child.process.args[child.process.args.index("-o") + 1]).parent
    assert list(output_folder.iterdir()) == []
    assert child.events[-1] == {"event": "error", "message": "stopped by SIGTERM; nothing written", "exit_code": 130}
