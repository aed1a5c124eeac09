"""Data-parallel training: real two-process runs on CPU (Gloo) through torchrun, resumed in one process.

The multi-process tests start ``python -m torch.distributed.run`` as a child, as a user would. This file is
also a worker script (``test_distributed.py worker CT RUN`` under torchrun): it compares the gradients the
wrapped networks get with the mean of the gradients each process's batch gives an unwrapped objective, and
checks that a run folder rank 0 refuses, or a user error in one process, stops every process alike.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_CMEDL

from cmedl.errors import ConfigError
from cmedl.training import distributed
from cmedl.training.config import TrainConfig
from cmedl.training.objectives import CMEDLObjective, CTOnlyObjective

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ONE_EPOCH_CMEDL = {**TINY_CMEDL, "epochs": 1}


needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed with the Gloo backend",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun_command(*args: str, processes: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
    ]  # fmt: skip


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two processes share the machine's cores
    return env


def _write_config(path: Path, settings: dict) -> Path:
    path.write_text(json.dumps(TrainConfig.from_dict(settings).to_dict()))
    return path


def _train(config_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    command = _torchrun_command("-m", "cmedl", "train", "--config", str(config_path), "--progress", "none")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())


# -- one process: the helpers are the identity -------------------------------------------------------------


def test_the_launch_is_read_from_torchrun_variables() -> None:
    assert distributed.launch_from_environment({}) is None
    assert distributed.launch_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    launch = distributed.launch_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert launch == distributed.Launch(rank=3, local_rank=1, world_size=4)
    with pytest.raises(ConfigError, match="RANK"):
        distributed.launch_from_environment({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="outside"):
        distributed.launch_from_environment({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_without_a_process_group_the_helpers_change_nothing() -> None:
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    distributed.barrier()
    assert distributed.all_reduce_mean(2.5) == 2.5
    assert distributed.any_process(True) and not distributed.any_process(False)
    assert distributed.mean_over_processes({"a": 1.0}) == {"a": 1.0}
    assert distributed.broadcast_object({"x": 1}) == {"x": 1}
    assert distributed.all_gather_object(3) == [3]
    with distributed.process_group(torch.device("cpu")) as device:
        assert device == torch.device("cpu") and not distributed.is_initialized()


def test_an_objective_steps_its_own_networks_until_it_is_distributed() -> None:
    config = TrainConfig.from_dict({**TINY, "ct": "ct", "out": "run"}).validate()
    objective = CTOnlyObjective(config, torch.device("cpu"), None)
    assert objective.replica("student") is objective.student
    objective.distribute(lambda module: torch.nn.Sequential(module))
    assert objective.replica("student")[0] is objective.student
    assert objective.state_dict()["networks"]["student"].keys() == objective.student.state_dict().keys()


# -- two processes ----------------------------------------------------------------------------------------


@needs_gloo
def test_a_two_process_run_writes_one_run_folder_that_resumes_in_one_process(
    small_phantoms: Path, tmp_path: Path
) -> None:
    from cmedl.modelfile import load_model
    from cmedl.training.runfolder import RunFolder
    from cmedl.training.trainer import Trainer

    out = tmp_path / "run"
    config = _write_config(tmp_path / "config.json", {**TINY, "ct": str(small_phantoms / "ct"), "out": str(out)})
    result = _train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    # both processes finished the run themselves (none was killed by torchrun)
    assert result.stdout.count(f"{out}: finished") == 2, result.stdout
    run = RunFolder(out)
    for name in ("config.json", "run.json", "data.json", "status.json", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert (out / "previews" / "epoch_002.png").is_file()
    status = run.read_status()
    assert status["state"] == "finished" and status["world_size"] == 2
    metrics = run.read_metrics()
    assert [record["epoch"] for record in metrics] == [1, 2]
    assert all(0.0 <= record["loss_seg_ct"] <= 1.0 for record in metrics)
    log = run.log_path.read_text()
    assert log.count("epoch 1:") == 1  # one writer
    checkpoint = run.load_checkpoint()
    saved = checkpoint["objective"]["networks"]["student"]
    assert not any(key.startswith("module.") for key in saved)
    model = load_model(run.model_path)
    assert model.network.state_dict().keys() == saved.keys()
    assert model.card.training["world_size"] == 2
    with torch.no_grad():
        assert model.network(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the children: on a shared machine more threads only wait for each other
    try:
        resumed = Trainer.resume_run(out, epochs=3).fit()
    finally:
        torch.set_num_threads(threads)
    assert resumed["state"] == "finished" and resumed["world_size"] == 1
    assert [record["epoch"] for record in run.read_metrics()] == [1, 2, 3]


@needs_gloo
def test_a_stop_signal_to_one_process_stops_both_cleanly(small_phantoms: Path, tmp_path: Path) -> None:
    from cmedl.training.runfolder import RunFolder

    out = tmp_path / "run"
    settings = {**TINY, "ct": str(small_phantoms / "ct"), "out": str(out), "epochs": 200}
    config = _write_config(tmp_path / "config.json", settings)
    command = _torchrun_command("-m", "cmedl", "train", "--config", str(config), "--progress", "none")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint.pt").exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        rank_zero = RunFolder(out).read_status()["pid"]  # status.json is written by rank 0
        os.kill(rank_zero, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    # each process stopped by itself, in the same epoch, and said so
    stopped = [line for line in stdout.splitlines() if line.startswith(f"{out}: stopped")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], stdout
    run = RunFolder(out)
    assert run.read_status()["state"] == "stopped"
    assert [record["epoch"] for record in run.read_metrics()] == list(range(1, run.load_checkpoint()["epoch"] + 1))


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> Path:
    from cmedl.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("unpaired")
    write_phantom_dataset(out, n_ct=3, n_mr=2, seed=21, size=96)
    return out


@needs_gloo
def test_a_two_process_cmedl_run_exports_student_and_translator(unpaired: Path, tmp_path: Path) -> None:
    from cmedl.modelfile import load_model
    from cmedl.training.runfolder import RunFolder

    out = tmp_path / "run"
    settings = {**ONE_EPOCH_CMEDL, "ct": str(unpaired / "ct"), "mr": str(unpaired / "mr"), "out": str(out)}
    result = _train(_write_config(tmp_path / "config.json", settings))
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunFolder(out)
    assert run.read_status()["world_size"] == 2
    (record,) = run.read_metrics()
    for term in ("adv_g", "cyc", "cx", "adv_d", "seg_ct", "seg_pm", "hint"):
        assert f"loss_{term}" in record, term
    networks = run.load_checkpoint()["objective"]["networks"]
    assert set(networks) == {"translator", "teacher", "student"}
    keys = [key for state in networks.values() for key in state]
    assert any(key.startswith("g_ct_to_mr.") for key in keys) and not any("module." in key for key in keys)
    assert (out / "translator.safetensors").is_file()
    assert load_model(run.model_path).card.method == "cmedl"


@needs_gloo
def test_two_processes_average_gradients_and_share_refusals_and_failures(small_phantoms: Path, tmp_path: Path) -> None:
    taken = tmp_path / "run"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    before = sorted(taken.iterdir())
    command = _torchrun_command(str(Path(__file__).resolve()), "worker", str(small_phantoms / "ct"), str(taken))
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=_environment())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        for case in ("paper", "seg_rm_only"):
            assert f"rank {rank} {case}: gradients match" in result.stdout, result.stdout
        assert f"rank {rank} refused: {taken} already holds a run" in result.stdout, result.stdout
        assert f"rank {rank} failed: no images found on rank 1" in result.stdout, result.stdout
    assert sorted(taken.iterdir()) == before


# -- the worker of the test above (run by torchrun, not by pytest) ----------------------------------------


def _batch(seed: int, labelled_mr: list[bool]) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ct = torch.rand(2, 1, 32, 32, generator=generator) * 2 - 1
    labels = (torch.rand(2, 32, 32, generator=generator) > 0.8).long()
    mr = torch.rand(2, 1, 32, 32, generator=generator) * 2 - 1
    return {"ct": (ct, labels, torch.ones(2, dtype=torch.bool)), "mr": (mr, labels.flip(1), torch.tensor(labelled_mr))}


def _objective(**changes) -> CMEDLObjective:
    torch.manual_seed(0)
    config = TrainConfig.from_dict({**ONE_EPOCH_CMEDL, "ct": "ct", "mr": "mr", "out": "run", **changes}).validate()
    return CMEDLObjective(config, torch.device("cpu"), None)


def _gradients(objective: CMEDLObjective) -> dict[str, list[torch.Tensor]]:
    # After a step each network holds the gradients of its own update (every update starts from none).
    return {
        name: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]
        for name, module in objective.trained_modules().items()
    }


def _check_gradients(rank: int) -> None:
    """Each wrapped network's gradient must be the mean of what each process's batch gives it alone."""
    import functools

    import cmedl.nets.vgg

    # The frozen contextual-loss VGG is built last and never wrapped: build it once for all objectives here.
    cmedl.nets.vgg.load_vgg16_features = functools.lru_cache(cmedl.nets.vgg.load_vgg16_features)
    # Only rank 0's batch has a labelled MRI sample: the L_seg^rM term exists on one process only. In the
    # second case it is the teacher's only loss, so rank 1's teacher would get no gradient of its own.
    batches = [_batch(0, [True, False]), _batch(1, [False, False])]
    cases = {"paper": {}, "seg_rm_only": {"use_seg_pm": False, "hint_to_teacher": False}}
    for case, changes in cases.items():
        references = []
        for batch in batches:
            alone = _objective(**changes)
            alone.step(batch)
            references.append(_gradients(alone))
        wrapped = _objective(**changes)
        wrapped.distribute(lambda module: distributed.wrap(module, torch.device("cpu")))
        wrapped.step(batches[rank])
        for name, gradients in _gradients(wrapped).items():
            for index, gradient in enumerate(gradients):
                expected = (references[0][name][index] + references[1][name][index]) / 2
                if not torch.allclose(gradient, expected, rtol=1e-4, atol=1e-7):
                    error = float((gradient - expected).abs().max())
                    raise SystemExit(f"rank {rank} {case}: {name} parameter {index} differs by {error}")
        print(f"rank {rank} {case}: gradients match", flush=True)


def _check_refusal(rank: int, ct: str, taken: str) -> None:
    """A run folder that rank 0 refuses is refused, with the same error, by every process."""
    from cmedl.errors import InputError
    from cmedl.training.trainer import Trainer

    try:
        Trainer(TrainConfig.from_dict({**TINY, "ct": ct, "out": taken})).fit()
    except InputError as error:
        print(f"rank {rank} refused: {error}", flush=True)


def _check_shared_failure(rank: int) -> None:
    """A user error in one process (data missing on one node, say) is raised by all of them."""
    from cmedl.errors import InputError
    from cmedl.training.trainer import Trainer

    def prepare() -> str:
        if rank == 1:
            raise InputError("no images found on rank 1")
        return "prepared"

    try:
        Trainer._on_every_process(prepare)
    except InputError as error:
        print(f"rank {rank} failed: {error}", flush=True)


def _worker(ct: str, taken: str) -> None:
    torch.distributed.init_process_group("gloo")
    try:
        rank = torch.distributed.get_rank()
        _check_gradients(rank)
        _check_refusal(rank, ct, taken)
        _check_shared_failure(rank)
        # Both ranks leave together: gloo can abort a process ("terminate called without an active exception")
        # when its peer tears the group down while it is still finishing its last collective.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(*sys.argv[2:4])
