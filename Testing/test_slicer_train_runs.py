"""CMEDLTrain's run code: panel values to engine configuration, run folders read without torch, and real
detached training processes started, followed from fresh readers and other processes, stopped, resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, parameter_node_values

from cmedl.catalogue import list_models
from cmedl.errors import ConfigError, InputError
from cmedl.processes import process_create_time
from cmedl.training.config import TrainConfig
from cmedl.training.launch import (
    kill_run,
    model_name_for,
    register_model,
    request_stop,
    resume_training,
    training_command,
    wait_for_run,
)
from cmedl.training.runs import CONSOLE_LOG, LAUNCH_CONFIG, LAUNCHER_RECORD, list_runs, read_run
from cmedl.volumes import list_volumes
from CMEDLTrainLib.launcher import start_training
from CMEDLTrainLib.settings import (
    VGG_RANDOM_NOTE,
    DataFolders,
    TrainingSettings,
    paper_defaults,
    settings_problem,
    training_config,
    vgg_weights_note,
)

UI_FILE = PROJECT_ROOT / "CMEDLTrain" / "Resources" / "UI" / "CMEDLTrain.ui"
TINY = {
    "method": "ct_only", "segmentor": "unet", "epochs": 2, "iterations_per_epoch": 2, "batch_size": 1,
    "patch_size": 32, "spacing_mm": 6.0, "validation_fraction": 0.25, "device": "cpu",
    "extra": {"segmentor_options": {"base_channels": 2}},
}  # fmt: skip


def tiny(**changes) -> TrainingSettings:
    return TrainingSettings(**{**TINY, **changes})


def folders_of(dataset: Path) -> DataFolders:
    return DataFolders(ct_images=str(dataset / "images"), ct_labels=str(dataset / "labels"))


# -- the panel's values and the engine's configuration -----------------------------------------------------


def test_the_panel_defaults_are_the_engine_defaults_and_fit_their_widgets() -> None:
    from CMEDLTrainLib.parameters import SETTINGS_FIELDS

    defaults, ranges = parameter_node_values("CMEDLTrain")
    engine = paper_defaults()
    assert engine["lambda_cyc"] == TrainConfig().lambda_cyc == 10.0 and engine["lambda_seg"] == 5.0
    for parameter, setting in SETTINGS_FIELDS.items():
        assert parameter in defaults, parameter
        assert setting in engine, setting
        assert defaults[parameter] == engine[setting], (parameter, defaults[parameter], engine[setting])
    for parameter, (low, high) in ranges.items():
        assert low <= defaults[parameter] <= high, parameter
    # A QDoubleSpinBox rounds to its decimals: a learning rate shown with 2 decimals would become 0.
    bound = {}
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        if widget.get("class") == "QDoubleSpinBox" and "SlicerParameterName" in props:
            bound[props["SlicerParameterName"].findtext("string")] = int(props["decimals"].findtext("number"))
    assert {"lrSegmentor", "lrTranslator", "spacingMm", "validationFraction"} <= set(bound)
    for parameter, decimals in bound.items():
        assert round(defaults[parameter], decimals) == defaults[parameter], parameter


def test_every_value_the_panel_offers_the_engine_accepts() -> None:
    """Each end of a parameter's range (the spin box's, set from WithinRange when the panel binds it) is a value
    TrainConfig.validate() accepts: a range wider than the engine's would only lead to a refusal."""
    from CMEDLTrainLib.parameters import SETTINGS_FIELDS

    _, ranges = parameter_node_values("CMEDLTrain")
    assert {"epochs", "patchSize", "lrSegmentor", "validationFraction", "freezeEncoderEpochs"} <= set(ranges)
    for parameter, bounds in ranges.items():
        field = SETTINGS_FIELDS[parameter]
        if field == "gpus":
            continue  # the processes torchrun starts: the panel's own value, not the configuration's
        for value in bounds:
            value = (value, value) if field == "spacing_mm" else value
            # init: a frozen encoder needs a model to start from
            TrainConfig(ct="ct", out="run", init="model", **{field: value}).validate()


def test_settings_become_a_validated_engine_configuration(small_phantoms: Path, tmp_path: Path) -> None:
    folders = folders_of(small_phantoms / "ct")
    assert settings_problem(tiny(), folders) == ""
    config = training_config(tiny(lambda_cyc=7.5), folders, tmp_path / "run")
    assert isinstance(config, TrainConfig)
    assert config.ct == str(small_phantoms / "ct") and config.mr == "" and config.out == str(tmp_path / "run")
    assert config.spacing_mm == (6.0, 6.0) and config.segmentor_options == {"base_channels": 2}
    assert config.lambda_cyc == 7.5 and config.lr_segmentor == TrainConfig().lr_segmentor
    assert not (tmp_path / "run" / "datasets").exists()  # images/ and labels/ beside each other: used as they are


def test_invalid_combinations_are_refused_with_the_engines_reason(small_phantoms: Path) -> None:
    folders = folders_of(small_phantoms / "ct")
    with pytest.raises(ConfigError) as engine:
        TrainConfig.from_dict({"ct": "x", "out": "y", "patch_size": 100}).validate()
    assert settings_problem(tiny(patch_size=100), folders) == str(engine.value)
    assert "multiple of 32" in settings_problem(tiny(patch_size=100), folders)
    ablated = tiny(method="cmedl", use_seg_rm=False, use_seg_pm=False, lambda_hint=0.0)
    problem = settings_problem(ablated, DataFolders(**{**folders.__dict__, "mr_images": str(small_phantoms)}))
    assert problem == "method cmedl with no teacher loss (use_seg_rm, use_seg_pm and lambda_hint all off)"
    assert "MRI images" in settings_problem(tiny(method="cmedl"), folders)
    assert "CT labels" in settings_problem(tiny(), DataFolders(ct_images=folders.ct_images))
    assert "lr_segmentor must be positive" in settings_problem(tiny(lr_segmentor=0.0), folders)
    assert "validation_fraction" in settings_problem(tiny(validation_fraction=1.0), folders)
    assert vgg_weights_note("random") == VGG_RANDOM_NOTE and "torch hub" in vgg_weights_note("")


def test_separate_image_and_label_folders_are_linked_into_the_run(small_phantoms: Path, tmp_path: Path) -> None:
    images, labels = small_phantoms / "ct" / "images", small_phantoms / "ct" / "labels"
    mr_images = tmp_path / "scans"
    mr_images.mkdir()
    for path in list_volumes(images)[:2]:
        (mr_images / path.name).symlink_to(path)
    (tmp_path / "labels").mkdir()  # beside the MRI images, but not chosen: must not be used
    settings = tiny(method="cmedl", vgg_weights="random")
    folders = DataFolders(ct_images=str(images), ct_labels=str(labels), mr_images=str(mr_images))
    config = training_config(settings, folders, tmp_path / "run")
    assert config.ct == str(small_phantoms / "ct")
    mr = Path(config.mr)
    assert mr == tmp_path / "run" / "datasets" / "mr"
    assert (mr / "images").resolve() == mr_images.resolve() and not (mr / "labels").exists()
    assert [p.name for p in list_volumes(mr / "images")] == [p.name for p in list_volumes(images)[:2]]
    with pytest.raises(ConfigError, match="already exists"):
        training_config(settings, folders, tmp_path / "run")


def test_several_gpus_start_torchrun() -> None:
    assert training_command(["train"], "py", 1) is None
    command = training_command(["train", "--config", "c.json"], "py", 4)
    assert command[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert command[6:] == ["-m", "cmedl", "train", "--config", "c.json"]


def test_a_process_that_cannot_start_leaves_no_run_folder(small_phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot start"):
        start_training(tiny(name="nope"), folders_of(small_phantoms / "ct"), tmp_path, str(tmp_path / "no-python"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="not a usable run name"):
        start_training(tiny(name="two words"), folders_of(small_phantoms / "ct"), tmp_path, sys.executable)
    with pytest.raises(ConfigError, match="multiple of 32"):
        start_training(tiny(patch_size=48), folders_of(small_phantoms / "ct"), tmp_path, sys.executable)
    assert list(tmp_path.iterdir()) == []


# -- reading run folders -----------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def ended_process() -> dict:
    """A launcher record of a real process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    create_time = process_create_time(process.pid)
    process.wait()
    return {"pid": process.pid, "create_time": create_time, "mode": "start", "started": "2026-01-01T00:00:00+00:00"}


def test_status_metrics_with_a_torn_line_and_previews_are_read(tmp_path: Path) -> None:
    run = tmp_path / "run"
    status = {
        "state": "finished", "epoch": 3, "epochs": 3, "last_losses": {"seg_ct": 0.25, "hint": 0.5},
        "best_validation_dice": 0.81, "best_epoch": 2, "eta_seconds": 0.0, "message": "finished 3 epochs",
        "updated": "2026-01-01T00:00:05+00:00",
    }  # fmt: skip
    write_json(run / "status.json", status)
    records = [{"epoch": e, "loss_seg_ct": 1.0 / e, "validation_dice": 0.2 * e} for e in (1, 2, 3)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + '{"epoch": 4, "loss_se')  # killed while writing
    (run / "previews").mkdir()
    for epoch in (1, 2, 10):
        (run / "previews" / f"epoch_{epoch:03d}.png").write_bytes(b"png")
    write_json(run / "previews" / "columns.json", {"columns": ["CT", "pseudo-MRI", "student"]})
    snapshot = read_run(run)
    assert snapshot.state == "finished" and not snapshot.alive and snapshot.error == ""
    assert [r["epoch"] for r in snapshot.metrics] == [1, 2, 3]
    assert snapshot.preview == run / "previews" / "epoch_010.png"
    assert snapshot.preview_columns == ["CT", "pseudo-MRI", "student"]
    assert snapshot.fraction() == 1.0 and snapshot.best_validation_dice == 0.81 and snapshot.best_epoch == 2
    assert snapshot.losses_text() == "seg_ct 0.2500, hint 0.5000"
    assert snapshot.summary_line() == "finished, epoch 3/3, best validation Dice 0.810 (epoch 2)"
    assert snapshot.model is None and not snapshot.resumable


def test_a_failed_run_shows_the_engines_one_line_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    record = ended_process()
    write_json(run / LAUNCHER_RECORD, record)
    (run / CONSOLE_LOG).write_text("loading\ncmedl: error: none of the 3 training CT labels contains a tumour\n")
    snapshot = read_run(run)
    assert snapshot.state == "failed"
    assert snapshot.error == "none of the 3 training CT labels contains a tumour"
    assert snapshot.summary_line().endswith(": none of the 3 training CT labels contains a tumour")
    # Without an error line, the status message the engine wrote says why.
    (run / CONSOLE_LOG).write_text("Traceback ...\n")
    write_json(run / "status.json", {"state": "failed", "message": "loss seg_ct became non-finite at epoch 2"})
    assert read_run(run).error == "loss seg_ct became non-finite at epoch 2"
    # An error of an earlier launch (before the log offset) does not count for a later one.
    old = "cmedl: error: an old problem\n"
    (run / CONSOLE_LOG).write_text(old + "resumed fine\n")
    write_json(run / "status.json", {"state": "stopped", "message": "stopped by the user",
                                     "updated": "2026-01-02T00:00:00+00:00"})  # fmt: skip
    write_json(run / LAUNCHER_RECORD, {**record, "mode": "resume", "log_offset": len(old)})
    snapshot = read_run(run)
    assert snapshot.state == "stopped" and snapshot.error == ""
    # A resume the engine refused at once leaves the older status behind: the new error says what happened.
    write_json(run / LAUNCHER_RECORD, {**record, "mode": "resume", "log_offset": len(old),
                                       "started": "2026-01-03T00:00:00+00:00"})  # fmt: skip
    with open(run / CONSOLE_LOG, "a", encoding="utf-8") as log:
        log.write("cmedl: error: checkpoint RUN/checkpoint.pt cannot be read: truncated\n")
    snapshot = read_run(run)
    assert snapshot.state == "failed" and snapshot.error == "checkpoint RUN/checkpoint.pt cannot be read: truncated"


def test_a_reused_pid_is_not_the_run_and_a_vanished_run_is_interrupted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_json(run / "status.json", {"state": "running", "epoch": 1, "epochs": 5})
    (run / "checkpoint.pt").write_bytes(b"x")
    # This very process is alive, but it is not the one that was started (another start time).
    write_json(run / LAUNCHER_RECORD, {"pid": os.getpid(), "create_time": 12345.0})
    snapshot = read_run(run)
    assert not snapshot.alive and snapshot.state == "interrupted" and snapshot.resumable
    write_json(run / LAUNCHER_RECORD, {"pid": os.getpid(), "create_time": process_create_time(os.getpid())})
    assert read_run(run).alive and read_run(run).state == "running"


def test_runs_are_listed_newest_first(tmp_path: Path) -> None:
    for name, age in (("b-old", 100), ("a-new", 80), ("c-mid", 90)):
        write_json(tmp_path / name / "status.json", {"state": "finished"})
        stamp = time.time() - age
        os.utime(tmp_path / name / "status.json", (stamp, stamp))
    (tmp_path / "not-a-run").mkdir()
    assert [path.name for path in list_runs(tmp_path)] == ["a-new", "c-mid", "b-old"]
    assert list_runs(tmp_path / "missing") == []


# -- real detached runs ------------------------------------------------------------------------------------


def reader_in_another_process(run: Path) -> dict:
    """What a fresh process (a restarted Slicer) sees of the run."""
    script = (
        "import json, sys\n"
        "from cmedl.training.runs import read_run\n"
        "s = read_run(sys.argv[1])\n"
        "print(json.dumps({'alive': s.alive, 'state': s.state, 'epochs': s.epochs}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "CMEDLTrain")])}
    result = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, env=env,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def finished_run(small_phantoms: Path, tmp_path_factory) -> Path:
    """A tiny CT-only run started detached, exactly as the panel starts one, and waited for."""
    root = tmp_path_factory.mktemp("runs")
    run = start_training(tiny(name="tiny-unet"), folders_of(small_phantoms / "ct"), root, python=sys.executable)
    snapshot = wait_for_run(run, timeout=300)
    assert snapshot.state == "finished", (snapshot.error, (run / CONSOLE_LOG).read_text()[-3000:])
    return run


def test_a_detached_run_finishes_and_leaves_everything_the_panel_shows(finished_run: Path) -> None:
    launch = json.loads((finished_run / LAUNCH_CONFIG).read_text())
    assert launch["out"] == str(finished_run) and launch["name"] == "tiny-unet" and launch["patch_size"] == 32
    record = json.loads((finished_run / LAUNCHER_RECORD).read_text())
    assert record["mode"] == "start" and record["command"][1:4] == ["-m", "cmedl", "train"]
    assert isinstance(record["create_time"], float)
    snapshot = read_run(finished_run)  # a fresh reader: nothing kept from the start
    assert snapshot.state == "finished" and not snapshot.alive
    assert [r["epoch"] for r in snapshot.metrics] == [1, 2] and "loss_seg_ct" in snapshot.metrics[0]
    assert snapshot.epoch == 2 and snapshot.epochs == 2 and snapshot.fraction() == 1.0
    assert snapshot.model == finished_run / "model.safetensors" and snapshot.checkpoint
    assert snapshot.preview == finished_run / "previews" / "epoch_002.png"
    assert snapshot.preview_columns == ["CT", "student"]
    assert snapshot.best_validation_dice is not None and "seg_ct" in snapshot.last_losses
    assert reader_in_another_process(finished_run) == {"alive": False, "state": "finished", "epochs": 2}
    with pytest.raises(InputError, match="already exists"):
        start_training(tiny(name="tiny-unet"), folders_of(finished_run.parent), finished_run.parent, sys.executable)


def test_register_model_offers_the_runs_model_to_segmentation(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMEDL_HOME", str(tmp_path / "home"))
    assert model_name_for(finished_run) == "tiny-unet"
    entry = register_model(finished_run)
    assert entry.name == "tiny-unet" and entry.available
    listed = {model.name: model for model in list_models()}
    assert listed["tiny-unet"].path == tmp_path / "home" / "models" / "tiny-unet.safetensors"
    with pytest.raises(InputError, match="already exists"):
        register_model(finished_run)
    assert register_model(finished_run, overwrite=True).name == "tiny-unet"
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(InputError, match="no model yet"):
        register_model(empty)


def test_stop_leaves_a_checkpoint_and_resume_finishes_the_run(small_phantoms: Path, tmp_path: Path) -> None:
    run = start_training(tiny(epochs=300, name="long"), folders_of(small_phantoms / "ct"), tmp_path, sys.executable)
    try:
        deadline = time.monotonic() + 300
        snapshot = read_run(run)
        while not (snapshot.checkpoint and snapshot.epoch >= 1):
            assert snapshot.alive, (snapshot.state, snapshot.error)
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.2)
            snapshot = read_run(run)
        assert snapshot.state == "running" and snapshot.eta_text()
        # Re-attach: another process, knowing only the folder, sees the live run.
        assert reader_in_another_process(run) == {"alive": True, "state": "running", "epochs": 300}
        assert request_stop(run)
        assert read_run(run).state in ("stopping", "stopped")
        stopped = wait_for_run(run, timeout=120)
    finally:
        kill_run(run, grace_seconds=2.0)
    assert stopped.state == "stopped" and not stopped.alive and stopped.resumable, stopped.error
    assert "stopped" in stopped.status["message"]
    last = stopped.epoch
    assert not request_stop(run)

    resume_training(run, sys.executable, epochs=last + 1)
    record = json.loads((run / LAUNCHER_RECORD).read_text())
    assert record["mode"] == "resume" and record["history"][0]["mode"] == "start"
    assert record["command"][-2:] == ["--epochs", str(last + 1)]
    resumed = wait_for_run(run, timeout=300)
    assert resumed.state == "finished", resumed.error
    assert [r["epoch"] for r in resumed.metrics] == list(range(1, last + 2))
    with pytest.raises(InputError, match="no checkpoint"):
        empty = tmp_path / "never-ran"
        empty.mkdir()
        resume_training(empty, sys.executable)


def test_a_run_the_engine_refuses_shows_its_error(small_phantoms: Path, tmp_path: Path) -> None:
    import shutil

    import SimpleITK as sitk

    data = tmp_path / "ct"
    shutil.copytree(small_phantoms / "ct", data)
    for path in (data / "labels").iterdir():
        sitk.WriteImage(sitk.ReadImage(str(path)) * 0, str(path))
    run = start_training(tiny(name="no-tumour"), folders_of(data), tmp_path / "runs", sys.executable)
    snapshot = wait_for_run(run, timeout=300)
    assert snapshot.state == "failed"
    assert snapshot.error.startswith("none of the") and "contains a tumour" in snapshot.error
    assert "cmedl: error: none of the" in (run / CONSOLE_LOG).read_text()
    assert not snapshot.resumable


def test_several_processes_run_under_torchrun_and_stop_together(small_phantoms: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this PyTorch build has no torch.distributed with the Gloo backend")
    settings = tiny(epochs=300, gpus=2, name="two-processes")  # on the CPU: two Gloo processes
    run = start_training(settings, folders_of(small_phantoms / "ct"), tmp_path, sys.executable)
    try:
        deadline = time.monotonic() + 300
        snapshot = read_run(run)
        while snapshot.epoch < 1:
            assert snapshot.alive, (snapshot.state, snapshot.error, (run / CONSOLE_LOG).read_text()[-3000:])
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.2)
            snapshot = read_run(run)
        record = json.loads((run / LAUNCHER_RECORD).read_text())
        assert record["command"][1:3] == ["-m", "torch.distributed.run"] and record["gpus"] == 2
        assert snapshot.status["world_size"] == 2 and snapshot.status["pid"] != record["pid"]
        assert request_stop(run)
        stopped = wait_for_run(run, timeout=120)
    finally:
        kill_run(run, grace_seconds=2.0)
    assert stopped.state == "stopped" and stopped.resumable, stopped.error
    log = (run / CONSOLE_LOG).read_text()
    # Both processes stopped by themselves in the same epoch; torchrun had nothing to kill.
    assert log.count(f"{run}: stopped") == 2 and "SignalException" not in log and "error" not in log.lower()
