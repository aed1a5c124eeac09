"""CMEDL Train's "Start from model" (issue 14, part 4), without Qt: the models offered, choosing one (the built-in
model's card, a model file, a CT-only and a CMEDL run folder), the hidden values kept through the parameter node
(and a saved scene), clearing with the offer to reset, and the fine-tuning fields.

The parameter node here is a real ``vtkMRMLScriptedModuleNode`` holding every value as text, read and written by
attribute as the panel's ``parameterNodeWrapper`` does (which slicer-core lacks).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import FakeCombo

from cmedl.catalogue import ModelEntry, builtin_model_path
from cmedl.filebase import CARD_KEY, FORMAT_KEY, FORMAT_NAME
from cmedl.training.config import TrainConfig
from cmedl.training.finetune import fine_tuning_lr
from cmedl.training.runfolder import MODEL_FILE, TRANSLATOR_FILE

pytestmark = pytest.mark.slicer

DEMO = builtin_model_path()
DEMO_EXTRA = {"segmentor_options": {"base_channels": 16}, "hu_window": [-1000.0, 500.0]}


class MRMLParameters:
    """The panel's parameter node as attributes over the text parameters of a real scripted module node."""

    def __init__(self, node, initialise: bool = True) -> None:
        from CMEDLTrainLib.parameters import EXTRA_FIELD, parameter_defaults

        defaults = {**parameter_defaults(), "runName": "", "randomVgg": False, EXTRA_FIELD: ""}
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_types", {name: type(value) for name, value in defaults.items()})
        if initialise:
            for name, value in defaults.items():
                setattr(self, name, value)

    def __getattr__(self, name: str):
        if name not in self._types:
            raise AttributeError(name)
        kind, text = self._types[name], self._node.GetParameter(name)
        return text == "true" if kind is bool else kind(text)

    def __setattr__(self, name: str, value) -> None:
        if name not in self._types:
            raise AttributeError(name)
        self._node.SetParameter(name, ("true" if value else "false") if isinstance(value, bool) else str(value))


class Prompts:
    def __init__(self, answer: bool = False) -> None:
        self.answer, self.asked, self.errors = answer, [], []

    def ask(self, text: str) -> bool:
        self.asked.append(text)
        return self.answer

    def error(self, text: str, details: str = "") -> None:
        self.errors.append(text)


class Dialogs:
    """The file dialogs, answering with the paths the test sets (``""``: cancelled)."""

    def __init__(self) -> None:
        self.folder = self.file = ""
        self.starts: list[str] = []

    def run_folder(self, start: str) -> str:
        self.starts.append(start)
        return self.folder

    def model_file(self, start: str) -> str:
        self.starts.append(start)
        return self.file


def write_translator(path: Path, options: dict) -> Path:
    """A CMEDL translator file as far as its card goes: a safetensors header with the card and no weights."""
    card = {"name": "run-translator", "kind": "translator", "architecture": "cyclegan", "architecture_options": options}
    header = json.dumps({"__metadata__": {FORMAT_KEY: FORMAT_NAME, CARD_KEY: json.dumps(card)}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.fixture
def panel(mrml):
    """(parameter node stand-in, its MRML node, the scene, prompts, dialogs, the controller)."""
    from CMEDLTrainLib.start_from_model import StartFromModel

    node = mrml.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CMEDLTrain")
    prompts, dialogs = Prompts(), Dialogs()
    return MRMLParameters(node), node, mrml.scene, prompts, dialogs, StartFromModel(prompts, dialogs)


def folders(root: Path | None = None):
    """The panel's data folders (made under ``root`` when given: a run's configuration needs them to exist)."""
    from CMEDLTrainLib.settings import DataFolders

    root = root or Path("/data")
    if root != Path("/data"):
        for name in ("images", "labels"):
            (root / "ct" / name).mkdir(parents=True, exist_ok=True)
    return DataFolders(ct_images=str(root / "ct" / "images"), ct_labels=str(root / "ct" / "labels"))


def test_the_builtin_models_card_fills_in_the_panel_and_its_hidden_values_survive_the_parameter_node(
    panel, tmp_path: Path
) -> None:
    from CMEDLTrainLib.parameters import settings_from_parameters
    from CMEDLTrainLib.settings import settings_problem, training_config
    from CMEDLTrainLib.start_from_model import CHOOSE_FILE, CHOOSE_FOLDER, NONE_CHOICE

    parameters, node, scene, prompts, dialogs, start = panel
    parameters.epochs = 7  # a value of the user's: the model leaves it alone
    choices = start.choices("")
    assert choices == [NONE_CHOICE, ("cmedl-demo-unet (built-in, unet)", "demo"), CHOOSE_FOLDER, CHOOSE_FILE]
    assert start.choose(parameters, "demo")
    assert (parameters.initModel, parameters.segmentor, parameters.patchSize, parameters.spacingMm) == (
        "demo", "unet", 128, 2.0
    )  # fmt: skip
    assert parameters.lrSegmentor == fine_tuning_lr(TrainConfig().lr_segmentor) and parameters.epochs == 7
    assert parameters.method == "ct_only" and json.loads(parameters.initExtra) == DEMO_EXTRA

    # Read back from the node's text, then from a saved and reloaded scene: extra is still there.
    scene.SetSaveToXMLString(1)
    scene.Commit()
    import slicer

    reloaded = slicer.vtkMRMLScene()
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(scene.GetSceneXMLString())
    reloaded.Import()
    again = MRMLParameters(reloaded.GetFirstNodeByName("CMEDLTrain"), initialise=False)
    settings = settings_from_parameters(again, device="cpu")
    assert settings.init == "demo" and json.loads(json.dumps(settings.extra)) == DEMO_EXTRA
    assert settings_problem(settings, folders()) == ""
    config = training_config(settings, folders(tmp_path), tmp_path / "run")
    assert config.segmentor_options == {"base_channels": 16} and tuple(config.hu_window) == (-1000.0, 500.0)
    assert config.patch_size == 128 and config.spacing_mm == (2.0, 2.0) and config.epochs == 7

    # The architecture stays the model's: another segmentor is named as the problem, with the engine's words.
    again.segmentor = "mrrn"
    problem = settings_problem(settings_from_parameters(again), folders())
    assert problem.startswith("--init demo is a unet network") and "conflicts" in problem
    assert not prompts.errors and not prompts.asked


def test_a_model_file_chosen_in_the_dialog_is_listed_and_a_cancel_changes_nothing(panel, tmp_path: Path) -> None:
    from CMEDLTrainLib.start_from_model import CHOOSE_FILE

    parameters, node, scene, prompts, dialogs, start = panel
    copy = Path(shutil.copy(DEMO, tmp_path / "site-model.safetensors"))
    assert not start.choose(parameters, CHOOSE_FILE[1], runs_root=str(tmp_path)), "cancelled"
    assert parameters.initModel == "" and dialogs.starts == [str(tmp_path)]
    dialogs.file = str(copy)
    assert start.choose(parameters, CHOOSE_FILE[1])
    assert parameters.initModel == str(copy) and parameters.patchSize == 128
    assert ("Model file: site-model.safetensors", str(copy)) in start.choices(parameters.initModel)
    assert not start.choose(parameters, str(copy)), "the same model again changes nothing"

    combo = FakeCombo()
    start.show_in(combo, parameters.initModel)
    assert combo.itemData(combo.current) == str(copy) and not combo.blocked
    start.show_in(combo, parameters.initModel)
    assert combo.cleared == 1, "an unchanged list is left alone"


def test_run_folders_fill_in_the_method_and_translator_and_a_bad_one_is_refused(panel, tmp_path: Path) -> None:
    from CMEDLTrainLib.parameters import settings_from_parameters
    from CMEDLTrainLib.start_from_model import CHOOSE_FOLDER

    parameters, node, scene, prompts, dialogs, start = panel
    ct_run = tmp_path / "ct-run"
    ct_run.mkdir()
    shutil.copy(DEMO, ct_run / MODEL_FILE)
    dialogs.folder = str(ct_run)
    assert start.choose(parameters, CHOOSE_FOLDER[1], runs_root=str(tmp_path))
    assert parameters.initModel == str(ct_run) and parameters.method == "ct_only" and parameters.patchSize == 128
    assert ("Run folder: ct-run", str(ct_run)) in start.choices(parameters.initModel)

    cmedl_run = tmp_path / "cmedl-run"
    cmedl_run.mkdir()
    shutil.copy(DEMO, cmedl_run / MODEL_FILE)
    write_translator(cmedl_run / TRANSLATOR_FILE, {"base_channels": 8, "n_blocks": 2})
    extra = json.loads(parameters.initExtra)
    parameters.initExtra = json.dumps({**extra, "cx_max_positions": 64})  # a value a script put there: it stays
    assert start.choose(parameters, str(cmedl_run))
    assert parameters.method == "cmedl" and parameters.lrTranslator == fine_tuning_lr(TrainConfig().lr_translator)
    settings = settings_from_parameters(parameters)
    assert settings.extra["translator"] == "cyclegan"
    assert settings.extra["translator_options"] == {"base_channels": 8, "n_blocks": 2}
    assert settings.extra["cx_max_positions"] == 64

    # Back to a plain model: the run's translator values go, the script's value stays.
    assert start.choose(parameters, "demo")
    assert json.loads(parameters.initExtra) == {**DEMO_EXTRA, "cx_max_positions": 64}

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    before = {name: node.GetParameter(name) for name in ("initModel", "initExtra", "patchSize", "method")}
    assert not start.choose(parameters, str(not_a_run))
    assert len(prompts.errors) == 1 and prompts.errors[0].startswith(f"Cannot start from {not_a_run}: ")
    assert "holds no model.safetensors" in prompts.errors[0]
    assert {name: node.GetParameter(name) for name in before} == before


@pytest.mark.parametrize("reset", [False, True])
def test_clearing_trains_from_scratch_and_offers_the_defaults(panel, reset: bool) -> None:
    from CMEDLTrainLib.parameters import parameter_defaults, settings_from_parameters
    from CMEDLTrainLib.settings import settings_problem
    from CMEDLTrainLib.start_from_model import RESET_QUESTION

    parameters, node, scene, prompts, dialogs, start = panel
    parameters.epochs = 9
    assert start.choose(parameters, "demo")
    parameters.freezeEncoderEpochs, parameters.warmupEpochs = 2, 1
    assert settings_problem(settings_from_parameters(parameters), folders()) == ""
    prompts.answer = reset
    assert start.choose(parameters, "")
    assert prompts.asked == [RESET_QUESTION]
    assert parameters.initModel == "" and parameters.initExtra == "" and parameters.freezeEncoderEpochs == 0
    assert settings_problem(settings_from_parameters(parameters), folders()) == ""
    if reset:
        assert {name: getattr(parameters, name) for name in parameter_defaults()} == parameter_defaults()
    else:
        assert (parameters.patchSize, parameters.epochs, parameters.warmupEpochs) == (128, 9, 1)
    assert not start.choose(parameters, ""), "nothing left to clear: no second question"
    assert len(prompts.asked) == 1


def test_reset_restores_every_default_and_the_engine_refuses_a_frozen_encoder_without_a_model(panel) -> None:
    from CMEDLTrainLib.parameters import parameter_defaults, settings_from_parameters
    from CMEDLTrainLib.settings import paper_defaults, settings_problem

    parameters, node, scene, prompts, dialogs, start = panel
    assert parameter_defaults()["freezeEncoderEpochs"] == paper_defaults()["freeze_encoder_epochs"] == 0
    assert parameter_defaults()["warmupEpochs"] == 0 and parameter_defaults()["initModel"] == ""
    start.choose(parameters, "demo")
    parameters.randomVgg, parameters.lambdaCyc = True, 3.0
    start.reset(parameters)
    assert {name: getattr(parameters, name) for name in parameter_defaults()} == parameter_defaults()
    assert parameters.initExtra == "" and parameters.randomVgg is False
    parameters.freezeEncoderEpochs = 3
    assert "freeze_encoder_epochs needs init" in settings_problem(settings_from_parameters(parameters), folders())


def test_the_list_offers_only_segmentation_models_on_this_computer_and_reads_the_catalogue_again(tmp_path) -> None:
    from CMEDLTrainLib.start_from_model import CATALOGUE_SECONDS, StartFromModel, path_label

    translator = write_translator(tmp_path / "translator.safetensors", {})
    entries = [
        ModelEntry("demo", "builtin", DEMO, title="cmedl-demo-unet", card={"architecture": "unet"}),
        ModelEntry("site", "user", DEMO, title="site", card={"architecture": "mrrn", "kind": "segmentor"}),
        ModelEntry("t", "user", translator, card={"architecture": "cyclegan", "kind": "translator"}),
        ModelEntry("remote", "download", None, title="Remote model"),
    ]
    now, reads = [0.0], []

    def lister(problems: list[str]) -> list[ModelEntry]:
        reads.append(now[0])
        return list(entries)

    start = StartFromModel(Prompts(), Dialogs(), lister=lister, clock=lambda: now[0])
    assert [value for _, value in start.choices("")] == ["", "demo", "site", "<choose run folder>",
                                                         "<choose model file>"]  # fmt: skip
    assert start.choices("")[2][0] == "site (your model, mrrn)"
    assert start.choices("gone")[-3] == ("gone (not in the catalogue)", "gone")
    now[0] = CATALOGUE_SECONDS
    start.choices("")
    assert reads == [0.0, CATALOGUE_SECONDS]
    assert path_label(str(tmp_path)) == f"Run folder: {tmp_path.name}"
