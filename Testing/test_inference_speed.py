"""The fast inference path and the faster pipeline around it: same answers as the reference, chosen for the right
reasons. Nothing here is timed; the speed is measured by ``cmedl bench`` and ``benchmarks/inference_speed.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import PROJECT_ROOT, shared_data
from skimage.morphology import convex_hull_image

from cmedl import cpu
from cmedl.catalogue import builtin_model_path
from cmedl.inference import (
    InferenceEngine,
    choose_precision,
    flops_per_forward,
    fold_batchnorm,
    padded_size,
    required_multiple,
    tile_mode_from_env,
)
from cmedl.lungs import _convex_hull_per_slice, _row_modes
from cmedl.modelfile import load_model
from cmedl.nets import build_segmentor
from cmedl.phantom import make_phantom
from cmedl.segment import Segmenter, SegmentOptions
from cmedl.volumes import read_volume

CPU = torch.device("cpu")
SMALL = {"unet": {"base_channels": 4}, "densefcn": {"growth_rate": 4, "stem_channels": 8}, "mrrn": {"base_channels": 4}}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def trained_looking(name: str) -> torch.nn.Module:
    """A small segmentor whose BatchNorm layers hold running statistics that are not 0 and 1."""
    torch.manual_seed(0)
    network = build_segmentor(name, **SMALL[name]).train()
    with torch.no_grad():
        for _ in range(3):
            network(torch.randn(2, 1, 64, 64) * 2.0 + 0.5)
    return network.eval()


# -- BatchNorm folding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "folded"), [("unet", 18), ("densefcn", 0), ("mrrn", 58)])
def test_fold_batchnorm_gives_the_same_logits(name: str, folded: int) -> None:
    network = trained_looking(name)
    before = {key: value.clone() for key, value in network.state_dict().items()}
    copy = fold_batchnorm(network)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = network(x)
        actual = copy.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # U-Net and MRRN: every conv3x3 -> BN -> ReLU; FC-DenseNet's BN -> ReLU -> conv has nothing to fold into.
    assert copy.folded_batchnorm == folded
    remaining = sum(isinstance(m, torch.nn.BatchNorm2d) for m in copy.modules())
    assert remaining == sum(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules()) - folded
    after = network.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # the original is untouched


def test_a_folded_copy_refuses_training_and_needs_no_gradients() -> None:
    copy = fold_batchnorm(trained_looking("unet"))
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    copy.eval()  # allowed
    with pytest.raises(RuntimeError, match="folded"):
        copy.train()


# -- precision, threads, tiles ----------------------------------------------------------------------------------


def test_reduced_precision_only_where_the_cpu_has_it() -> None:
    assert choose_precision(CPU, flags=frozenset({"avx2", "fma"})).name == "fp32"
    assert "no native bf16" in choose_precision(CPU, flags=frozenset({"avx2"})).reason
    for flag in ("avx512_bf16", "amx_bf16"):
        chosen = choose_precision(CPU, flags=frozenset({"avx2", flag}))
        assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16 and flag in chosen.reason
    assert choose_precision(CPU, "fp32", flags=frozenset({"amx_bf16"})).dtype is None
    assert choose_precision(CPU, "bf16", flags=frozenset()).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        choose_precision(CPU, "int8")


def _fake_topology(root: Path, cores: list[tuple[int, int]]) -> Path:
    for index, (package, core) in enumerate(cores):
        folder = root / f"cpu{index}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_thread_rule_explicit_then_omp_then_physical_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu.inference_threads(3, environ={"OMP_NUM_THREADS": "7"}).count == 3
    assert cpu.inference_threads(None, environ={"OMP_NUM_THREADS": "7"}).count == 7
    with pytest.raises(ValueError):
        cpu.inference_threads(0)
    # Two hyperthreaded cores: four logical CPUs, siblings count once; an affinity to two siblings is one core.
    sys_cpu = _fake_topology(tmp_path / "cpu", [(0, 0), (0, 1), (0, 0), (0, 1)])
    assert cpu.physical_cores([0, 1, 2, 3], sys_cpu)[0] == 2
    assert cpu.physical_cores([0, 2], sys_cpu)[0] == 1
    assert cpu.physical_cores([0, 1, 2, 3], tmp_path / "missing")[0] == 4
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cpu.cgroup_cpu_limit(quota) == 2
    quota.write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(quota) is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu.inference_threads().count >= 1
    monkeypatch.setattr(cpu, "physical_cores", lambda: (4, "4 physical cores"))
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    assert cpu.inference_threads(busy=0).count == 4
    busy = cpu.inference_threads(busy=2)  # two cores kept busy by other processes: leave them alone
    assert busy.count == 2 and "2 busy" in busy.reason
    assert cpu.inference_threads(busy=9).count == 1
    assert cpu.inference_threads(3, busy=9).count == 3 and cpu.inference_threads(environ={}, busy=0).count == 4


def test_training_threads_share_the_idle_cores_among_one_machines_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "physical_cores", lambda: (4, "4 physical cores"))
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: None)
    assert cpu.training_threads(environ={}, busy=0).count == 4
    assert cpu.training_threads(environ={}, busy=1).count == 3
    shared = cpu.training_threads(environ={"LOCAL_WORLD_SIZE": "2"}, busy=0)
    assert shared.count == 2 and "shared by 2 training processes" in shared.reason
    assert cpu.training_threads(environ={"LOCAL_WORLD_SIZE": "8"}, busy=0).count == 1
    assert cpu.training_threads(environ={"LOCAL_WORLD_SIZE": "x"}, busy=0).count == 4
    # torchrun's (or the user's) OMP_NUM_THREADS is already per process
    assert cpu.training_threads(environ={"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, busy=0).count == 3


def test_busy_cores_come_from_two_readings_of_proc_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys_cpu = _fake_topology(tmp_path / "cpu", [(0, 0), (0, 1), (0, 0), (0, 1)])
    stat = tmp_path / "stat"
    readings = iter(
        [
            "cpu  0 0 0 0 0\ncpu0 100 0 0 100 0\ncpu1 100 0 0 100 0\ncpu2 100 0 0 100 0\ncpu3 100 0 0 100 0\n",
            # cpu2 worked all the time (a sibling of cpu0: core 0 is busy); cpu1 a little (core 1 is not)
            "cpu  0 0 0 0 0\ncpu0 100 0 0 200 0\ncpu1 110 0 0 190 0\ncpu2 200 0 0 100 0\ncpu3 100 0 0 190 10\n",
        ]
    )
    monkeypatch.setattr(cpu.time, "sleep", lambda seconds: stat.write_text(next(readings)))
    stat.write_text(next(readings))
    assert cpu.busy_cores([0, 1, 2, 3], interval=0.0, stat=stat, sys_cpu=sys_cpu) == 1


def test_a_gpu_run_does_not_sample_the_other_processes_cpu_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 0.2 s sample of /proc/stat is spent only where the CPU threads run the network."""
    from cmedl import inference

    sampled: list[bool] = []
    monkeypatch.setattr(cpu, "busy_cores", lambda *args, **kwargs: sampled.append(True) or 0)
    monkeypatch.setattr(cpu, "physical_cores", lambda *args, **kwargs: (4, "4 physical cores"))
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda *args, **kwargs: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        assert inference.configure_threads(count_busy_cores=False).count == 4 and not sampled
        assert inference.configure_threads().count == 4 and sampled
    finally:
        torch.set_num_threads(threads)


def test_threads_are_set_only_in_the_command_line_process(monkeypatch: pytest.MonkeyPatch) -> None:
    network = build_segmentor("threshold", 1, 2)
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "_cli_process", False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(2)
        engine = InferenceEngine(network, CPU)
        assert torch.get_num_threads() == 2 and engine.thread_choice is None  # a library leaves threads alone
        monkeypatch.setattr(cpu, "_cli_process", True)
        engine = InferenceEngine(network, CPU)
        assert torch.get_num_threads() == 1 and engine.thread_choice.reason == "OMP_NUM_THREADS=1"
    finally:
        torch.set_num_threads(before)


def test_required_multiples_and_padding() -> None:
    assert [required_multiple(build_segmentor(n, **SMALL[n])) for n in ("unet", "densefcn", "mrrn")] == [16, 32, 16]
    assert required_multiple(build_segmentor("threshold", 1, 2)) == 1
    assert required_multiple(torch.nn.Identity()) == 1
    assert padded_size((100, 70), 16) == (112, 80) and padded_size((5, 32), 32) == (32, 32)
    assert tile_mode_from_env({"CMEDL_TILES": "slice"}) == "slice" and tile_mode_from_env({}) == "training"


class _RecordsInputDevice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.seen: list[torch.device] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.seen.append(inputs.device)
        return self.conv(inputs)


def test_flops_are_counted_on_the_device_the_network_lives_on() -> None:
    # `cmedl bench --device cuda` counts FLOPs of a network already moved to the GPU, where a CPU probe input
    # fails. The meta device stands in for any device other than the CPU.
    network = _RecordsInputDevice()
    expected = 2 * 4 * 9 * 32 * 32  # multiply and add per output value, 3x3 kernel, one input channel
    assert flops_per_forward(network, (32, 32)) == expected
    assert flops_per_forward(network.to("meta"), (32, 32)) == expected
    assert [device.type for device in network.seen] == ["cpu", "meta"]
    assert flops_per_forward(torch.nn.Identity(), (8, 8)) == 0


def test_whole_slices_tiles_and_skipped_air_agree_for_a_pointwise_network() -> None:
    # A pointwise network answers every pixel alone: however a slice is cut, the answer must be the same.
    network = build_segmentor("threshold", 1, 2, level=-0.5, sharpness=50.0)
    rng = np.random.default_rng(1)
    slices = [(k, rng.uniform(-1, 1, size=(150, 90)).astype(np.float32)) for k in range(3)]
    slices[1][1][:, :] = -1.0  # air only: its tiles are skipped on the fast path
    args = {"num_classes": 2, "patch": 64, "overlap": 0.25, "batch_size": 4, "outside_level": -0.9}
    reference = dict(InferenceEngine(network, CPU, fast=False).predict(slices, **args))
    whole = InferenceEngine(network, CPU, tiles="slice")
    tiled_fast = InferenceEngine(network, CPU)
    small_budget = InferenceEngine(network, CPU, tiles="slice", budget_bytes=40_000)
    for engine in (whole, tiled_fast, small_budget):
        answers = dict(engine.predict(slices, **args))
        assert list(answers) == [0, 1, 2]
        for key, probabilities in answers.items():
            np.testing.assert_allclose(probabilities, reference[key], atol=2e-3)
    assert "per slice" in whole.tiling and "memory budget" in small_budget.tiling
    np.testing.assert_allclose(dict(tiled_fast.predict(slices, **args))[1][0], 1.0, atol=1e-6)  # skipped: background


# -- agreement of the whole pipeline with the reference path ----------------------------------------------------


@pytest.fixture(scope="module")
def builtin():
    return load_model(builtin_model_path())


def _both_paths(model, ct: sitk.Image):
    reference = Segmenter(model, SegmentOptions(device="cpu"), fast=False).segment(ct)
    fast = Segmenter(model, SegmentOptions(device="cpu"), fast=True).segment(ct)
    return reference, fast


def _agree(reference, fast) -> float:
    a = sitk.GetArrayViewFromImage(reference.label) == 1
    b = sitk.GetArrayViewFromImage(fast.label) == 1
    return dice(a, b)


def test_fast_path_agrees_with_the_reference_on_a_phantom(builtin) -> None:
    ct = make_phantom("ct", seed=5, size=128).image
    reference, fast = _both_paths(builtin, ct)
    assert _agree(reference, fast) >= 0.99
    summary = fast.summary()
    assert summary["precision"] in ("fp32", "bf16") and summary["precision_reason"]
    path = summary["fast_path"]
    assert path["enabled"] and path["channels_last"] and path["batchnorm_folded"] == 18 and path["tiles"] == "training"
    assert path["threads"] >= 1 and "tiles" in path["tiling"]
    assert reference.summary()["fast_path"] == {
        "enabled": False,
        "tiling": reference.summary()["fast_path"]["tiling"],
        "prefetch": 0,  # a CPU prepares no tiles ahead
        "threads": path["threads"],
        "threads_reason": path["threads_reason"],
    }


def test_fast_path_agrees_with_the_reference_on_a_real_ct(builtin) -> None:
    ct = read_volume(shared_data("ct_lungmask/cip_ct-64.nrrd"))
    reference, fast = _both_paths(builtin, ct)
    assert _agree(reference, fast) >= 0.99
    probabilities = [sitk.GetArrayViewFromImage(r.probabilities).astype(int) for r in (reference, fast)]
    assert np.abs(probabilities[0] - probabilities[1]).max() <= 2  # of 255


# -- the pipeline around the network ----------------------------------------------------------------------------


def test_convex_hull_per_slice_is_skimages(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    body = np.zeros((6, 40, 50), dtype=bool)
    for z in range(6):
        for _ in range(z + 1):  # blobs of growing count, some slices with a single pixel or a line
            top, left = rng.integers(1, 37), rng.integers(1, 47)
            body[z, top : top + rng.integers(1, 6), left : left + rng.integers(1, 6)] = True
    body[0] = False
    body[0, 10, 10:20] = True  # a line: its hull is the line
    hull = _convex_hull_per_slice(body)
    for z in range(6):
        np.testing.assert_array_equal(hull[z], convex_hull_image(body[z]), err_msg=f"slice {z}")


def test_row_modes_match_numpy_unique() -> None:
    rng = np.random.default_rng(2)
    rows = rng.integers(-3, 3, size=(20, 31)).astype(np.int16)
    rows[4] = -2048
    values, counts = _row_modes(rows)
    for row, value, count in zip(rows, values, counts):
        unique, tally = np.unique(row, return_counts=True)
        assert (value, count) == (unique[np.argmax(tally)], tally.max())


@pytest.mark.parametrize(
    "args",
    [["--help"], ["models", "list"], ["lungs", "ct_lungmask/cip_ct-64.nrrd"]],
    ids=["help", "models-list", "lungs"],
)
def test_commands_without_a_network_do_not_import_torch(args: list[str]) -> None:
    if args[0] == "lungs":
        args = ["lungs", str(shared_data(args[1]))]
    _assert_no_torch(args)


def test_info_does_not_import_torch() -> None:
    _assert_no_torch(["info"])


def _assert_no_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from cmedl.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "TORCH False" in done.stdout, done.stdout[-500:] + done.stderr[-500:]


def test_busy_cores_since_the_command_line_started_leave_out_this_processs_own_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a reading taken when the command line started: no wait, and this process's own CPU time (it was
    importing and reading meanwhile) is not taken for another process's."""
    sys_cpu = _fake_topology(tmp_path / "cpu", [(0, 0), (0, 1)])
    stat = tmp_path / "stat"
    own = iter([1.0, 2.0, 1.0, 3.5])  # this process's CPU seconds at each reading
    monkeypatch.setattr(cpu, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(cpu, "_clock_ticks", lambda: 100)
    monkeypatch.setattr(cpu.time, "sleep", lambda seconds: pytest.fail("no wait when the reading is old enough"))

    def started_5_s_ago() -> tuple:
        stat.write_text("cpu  0 0 0 0 0\ncpu0 100 0 0 100 0\ncpu1 100 0 0 100 0\n")
        when, times, seconds = cpu.watch_point(stat)
        return when - 5.0, times, seconds

    # Each CPU ran 500 jiffies since: 560 busy in all, 100 of them this process's (1.0 s): the others kept
    # 460 / 500 = 0.92 of a CPU busy.
    start = started_5_s_ago()
    stat.write_text("cpu  0 0 0 0 0\ncpu0 600 0 0 100 0\ncpu1 160 0 0 540 0\n")
    assert cpu.busy_cores([0, 1], stat=stat, sys_cpu=sys_cpu, since=start) == 1
    # 300 busy, 250 of them this process's (2.5 s: more than one thread at times): the others 0.1 of a CPU.
    start = started_5_s_ago()
    stat.write_text("cpu  0 0 0 0 0\ncpu0 350 0 0 350 0\ncpu1 150 0 0 550 0\n")
    assert cpu.busy_cores([0, 1], stat=stat, sys_cpu=sys_cpu, since=start) == 0
    # A reading younger than the sample interval: the usual wait and two readings instead.
    waited: list[float] = []
    monkeypatch.setattr(cpu.time, "sleep", waited.append)
    fresh = (cpu.time.monotonic(), {}, 0.0)
    assert cpu.busy_cores([0, 1], interval=0.2, stat=stat, sys_cpu=sys_cpu, since=fresh) == 0 and waited == [0.2]
