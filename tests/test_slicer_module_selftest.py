"""Runs MPCLSegmentation.py's own Logic, self-test and QProcess runner on slicer-core.

slicer-core has the MRML scene, nodes, segmentations logic and ``slicer.util`` (addVolumeFromArray,
arrayFromSegmentBinaryLabelmap, ...) but no application. The few application pieces the module
touches are stood in for here, and only those: the ScriptedLoadableModule base classes, ``slicer.i18n``,
``slicer.app.temporaryPath``, ``slicer.modules.segmentations.logic()``, ``slicer.util.loadSegmentation``
(via Slicer's segmentation storage node) and, for the widget's runner, ``qt.QProcess``, emulated over
``subprocess`` with PythonQt's calling conventions (string signal signatures, QByteArray.data() bytes).
The emulation checks the runner's own logic (line buffering, exit handling, kill on cancel); that it
behaves the same under PythonQt is checked only in a real Slicer. The runtime section's install and
version-check code runs on stand-in widgets, pip and dialogs (``panel``), in the same sense.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
import unittest
from pathlib import Path

import pytest

pytest.importorskip("slicer_core", reason="needs the slicer-core wheel (pip install -e .[slicer])")
slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' module is not slicer-core's", allow_module_level=True)
import slicer.util  # noqa: E402

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "MPCLSegmentation"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from MPCLSegmentationLib import testdata  # noqa: E402
from MPCLSegmentationLib.process import SegmentOptions  # noqa: E402


class _QByteArray:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def data(self) -> bytes:
        return self._data


class _QProcess:
    """subprocess behind the subset of PythonQt's qt.QProcess API the runner uses; ``pump`` delivers
    output in split chunks (to exercise partial lines) and then the finished signal."""

    NotRunning, Running = 0, 2
    MergedChannels = 1
    NormalExit, CrashExit = 0, 1
    FailedToStart = 0

    def __init__(self) -> None:
        self.slots, self.buffer, self.process, self.running, self.environment = {}, b"", None, False, {}
        self.on_line = None

    def setProcessChannelMode(self, mode) -> None:
        assert mode == self.MergedChannels

    def setProcessEnvironment(self, environment) -> None:
        self.environment = environment.values

    def connect(self, signature: str, slot) -> None:
        self.slots[signature] = slot

    def state(self) -> int:
        return self.Running if self.running else self.NotRunning

    def start(self, program: str, arguments: list[str]) -> None:
        try:
            self.process = subprocess.Popen(
                [program, *arguments], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.environment
            )
        except OSError:
            self.slots["errorOccurred(QProcess::ProcessError)"](self.FailedToStart)
            return
        self.running = True

    def pump(self) -> None:
        for raw in iter(self.process.stdout.readline, b""):
            for chunk in (raw[:3], raw[3:]):
                self.buffer += chunk
                self.slots["readyReadStandardOutput()"]()
            if self.on_line is not None:
                self.on_line()
        code = self.process.wait()
        self.running = False
        status = self.CrashExit if code < 0 else self.NormalExit
        self.slots["finished(int,QProcess::ExitStatus)"](max(code, 0), status)

    def canReadLine(self) -> bool:
        return b"\n" in self.buffer

    def readLine(self) -> _QByteArray:
        end = self.buffer.index(b"\n") + 1
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return _QByteArray(line)

    def readAll(self) -> _QByteArray:
        data, self.buffer = self.buffer, b""
        return _QByteArray(data)

    def kill(self) -> None:
        self.process.kill()

    def processId(self) -> int:
        return self.process.pid if self.process is not None else 0


class _QProcessEnvironment:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def insert(self, key: str, value: str) -> None:
        self.values[key] = value


class _SelfTestCase(unittest.TestCase):
    """ScriptedLoadableModuleTest's role: a TestCase with delayDisplay (not collected by pytest itself)."""

    __test__ = False

    def __init__(self, methodName: str = "runTest") -> None:
        super().__init__(methodName)

    def delayDisplay(self, message, msec=0):
        pass


@pytest.fixture
def module(monkeypatch, tmp_path):
    """MPCLSegmentation.py imported against slicer-core plus the application stand-ins."""
    scene = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)

    def load_segmentation(path):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
        return node

    base = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic"):
        setattr(base, name, type(name, (), {"__init__": lambda self, *args: None}))
    base.ScriptedLoadableModuleTest = _SelfTestCase
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    qt = types.ModuleType("qt")
    qt.QProcess, qt.QProcessEnvironment = _QProcess, _QProcessEnvironment
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    segmentations_module = types.SimpleNamespace(logic=lambda: segmentations)
    monkeypatch.setattr(
        slicer, "modules", types.SimpleNamespace(segmentations=segmentations_module), raising=False
    )
    monkeypatch.setattr(slicer.util, "loadSegmentation", load_segmentation)
    monkeypatch.delitem(sys.modules, "MPCLSegmentation", raising=False)
    module = importlib.import_module("MPCLSegmentation")
    yield module
    sys.modules.pop("MPCLSegmentation", None)


def test_module_self_test_passes(module):
    test = module.MPCLSegmentationTest()
    test.runTest()
    assert test.skipped == []  # the runtime is installed here: everything ran


def test_module_self_test_skips_without_the_runtime(module, monkeypatch, caplog):
    """On the Extensions build servers the runtime is absent: the tests needing it skip, not fail."""
    monkeypatch.setattr(module, "runtime_version", lambda: None)
    ran = []
    monkeypatch.setattr(module.MPCLSegmentationLogic, "process", lambda *args, **kwargs: ran.append(args))
    test = module.MPCLSegmentationTest()
    with caplog.at_level("WARNING"):
        test.runTest()
    assert test.skipped == ["test_SegmentSampleVolume", "test_InvalidModelIsReported"]
    assert ran == []  # nothing tried to segment
    assert "mpcl runtime is not installed" in caplog.text


def _job(module, volume):
    options = SegmentOptions(device="cpu", uncertainty=True)
    return module.MPCLSegmentationLogic().prepare(volume, str(testdata.default_test_model()), options)


def test_qprocess_runner_feeds_the_shared_parser_and_cancels(module):
    array, ijk_to_ras, truth = testdata.sample_volume()
    volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name="sample")
    logic = module.MPCLSegmentationLogic()

    job = _job(module, volume)
    progress, outcomes, lines = [], [], []
    run = module.QProcessSegmentation(
        job, progress.append, lambda job, outcome: outcomes.append(outcome), lines.append
    )
    run.start()
    run.process.pump()
    fractions = [step.fraction for step in progress]  # start, runtime, backend, the slices, done
    assert fractions[:3] == [0.02, 0.05, 0.2] and fractions[-1] == 1.0
    assert len(fractions) > 4 and fractions == sorted(fractions)
    assert len(outcomes) == 1 and outcomes[0].ok and outcomes[0].device == "cpu"
    assert job.monitor.child_pid == run.process.processId()  # no launcher here: the child itself
    assert any("backend:" in line and "on cpu" in line for line in lines)  # the user's log
    assert any(line.startswith("[1/1] done") for line in lines)
    assert not any(line.startswith("@mpcl") for line in lines)
    output = logic.finish(job, outcomes[0])
    assert output.voxel_counts == {
        name: int((truth == value).sum()) for value, name in enumerate(testdata.CLASS_NAMES) if value
    }

    job = _job(module, volume)
    outcomes = []
    run = module.QProcessSegmentation(job, lambda step: None, lambda job, outcome: outcomes.append(outcome))
    run.start()
    run.process.on_line = run.cancel  # the user presses Cancel once the child has printed something
    run.process.pump()
    assert len(outcomes) == 1 and outcomes[0].cancelled and not outcomes[0].ok
    assert run.process.process.returncode != 0  # stopped, not finished
    with pytest.raises(module.SegmentationError) as raised:
        logic.finish(job, outcomes[0])
    assert raised.value.cancelled and not job.work_dir.exists()

    job = _job(module, volume)
    job.command[0] = str(Path(job.work_dir) / "no-such-python")
    outcomes = []
    run = module.QProcessSegmentation(job, lambda step: None, lambda job, outcome: outcomes.append(outcome))
    run.start()
    assert len(outcomes) == 1 and "Could not start" in outcomes[0].message
    logic.discard(job)


def test_logic_refuses_a_runtime_of_another_version_unless_allowed(module, monkeypatch):
    """The module knows its runtime version (here: this checkout's pyproject) and compares it with the
    installed runtime's before segmenting: a mismatch is refused with one sentence naming both."""
    check = module.runtimeCheck()
    assert check.ok and check.expected == check.installed  # this checkout's runtime is installed
    array, ijk_to_ras, truth = testdata.sample_volume()
    volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name="sample")
    logic = module.MPCLSegmentationLogic()
    monkeypatch.setattr(module, "runtime_version", lambda: "0.0.1")
    before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    for run in (
        lambda: logic.process(volume, str(testdata.default_test_model()), device="cpu"),
        lambda: logic.prepare(volume, str(testdata.default_test_model()), SegmentOptions(device="cpu")),
    ):
        with pytest.raises(module.SegmentationError) as raised:
            run()
        message = str(raised.value)
        assert "0.0.1" in message and check.expected in message and "allowVersionMismatch=True" in message
        assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before  # nothing ran

    output = logic.process(
        volume, str(testdata.default_test_model()), device="cpu", allowVersionMismatch=True
    )
    assert output.outcome.ok and output.voxel_counts["left ventricle"] == int((truth == 1).sum())


class _Widget:
    """A stand-in for one of the panel's Qt widgets: the properties and calls the widget code uses."""

    def __init__(self) -> None:
        self.text = self.currentText = self.currentPath = self.toolTip = self.style = ""
        self.enabled, self.collapsed, self.items = True, True, []

    def setStyleSheet(self, style) -> None:
        self.style = style

    def clear(self) -> None:
        self.items = []

    def addItems(self, items) -> None:
        self.items = list(items)

    def currentNode(self):
        return None


class _Ui:
    def __init__(self) -> None:
        self.widgets = {}

    def __getattr__(self, name):
        return self.__dict__["widgets"].setdefault(name, _Widget())


@pytest.fixture
def panel(module, monkeypatch, tmp_path):
    """The module's widget on stand-in Qt widgets, in a built extension's folder whose Resources/Wheels
    holds mpcl 0.1.0 (a file name is all the choice needs), with pip and the dialogs recorded."""
    wheels = tmp_path / "extension" / "Resources" / "Wheels"
    wheels.mkdir(parents=True)
    (wheels / "mpcl-0.1.0-py3-none-any.whl").write_bytes(b"")
    (wheels / "mpcl-0.1.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    (wheels / "mpcl-0.0.1-py3-none-any.whl").write_bytes(b"")
    (wheels / "mpcl-version.txt").write_text("0.1.0\n")
    monkeypatch.setattr(module, "MODULE_DIR", str(wheels.parents[1]))
    monkeypatch.setattr(module, "_setting", lambda key, default: default)
    state = types.SimpleNamespace(installed=None, pip=[], asked=[], errors=[], answer=True, restart=[])

    def pip_install(arguments):
        state.pip.append(list(arguments))
        state.installed = "0.1.0"  # what installing the bundled wheel leaves

    def confirm(question, **kwargs):
        state.asked.append(question)
        return state.answer

    monkeypatch.setattr(module, "runtime_version", lambda: state.installed)
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(
        slicer.util, "confirmYesNoDisplay", lambda question, **kwargs: bool(state.asked.append(question))
    )
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda message, **kwargs: state.errors.append(message))
    monkeypatch.setattr(slicer.util, "restart", lambda: state.restart.append(True))
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None)
    monkeypatch.setattr(
        slicer.util, "createProgressDialog", lambda **kwargs: types.SimpleNamespace(close=lambda: None)
    )
    monkeypatch.setattr(slicer.app, "processEvents", lambda: None, raising=False)
    widget = module.MPCLSegmentationWidget.__new__(module.MPCLSegmentationWidget)
    widget.ui, widget.run, widget.gpu, widget.logic = _Ui(), None, None, None
    return widget, state, wheels


def test_install_runtime_installs_the_bundled_wheel_file(panel):
    widget, state, wheels = panel
    widget.updateRuntimeStatus()
    assert "mpcl-0.1.0-py3-none-any.whl" in widget.ui.runtimeStatusLabel.text  # says where it comes from
    assert widget.ensureRuntime()
    assert "mpcl-0.1.0-py3-none-any.whl" in state.asked[0] and "no download" in state.asked[0]
    wheel = str(wheels / "mpcl-0.1.0-py3-none-any.whl")
    assert state.pip == [[wheel, "--find-links", str(wheels)]]  # exactly that file, not another version
    assert "0.1.0 installed" in widget.ui.statusLabel.text and not state.errors
    assert "the version this module was built with" in widget.ui.runtimeStatusLabel.text

    widget.onInstallRuntimeButton()  # the same version again: its files are replaced
    assert state.pip[-1] == [wheel, "--find-links", str(wheels), "--force-reinstall", "--no-deps"]


def test_a_mismatched_runtime_is_reported_at_start_and_refused_unless_confirmed(panel, module, monkeypatch):
    widget, state, wheels = panel
    state.installed = "0.0.2"
    widget.updateRuntimeStatus()  # what setup() does when the module starts
    for text in (widget.ui.runtimeStatusLabel.text, widget.ui.statusLabel.text):
        assert "0.0.2" in text and "0.1.0" in text and "reinstall" in text
    assert (
        widget.ui.statusLabel.style == module.ERROR_STYLE and not widget.ui.runtimeCollapsibleButton.collapsed
    )
    assert widget.ui.installRuntimeButton.text == "Reinstall mpcl runtime 0.1.0"

    clicked = {}

    class _MessageBox:
        Warning, AcceptRole, DestructiveRole, Cancel = 2, 0, 2, 0x400000

        def __init__(self, parent=None) -> None:
            self.buttons = []

        def setWindowTitle(self, title) -> None:
            pass

        def setIcon(self, icon) -> None:
            pass

        def setText(self, text) -> None:
            clicked["text"] = text

        def addButton(self, button, role=None):
            self.buttons.append(button)
            return button

        def exec_(self) -> None:
            pass

        def clickedButton(self):
            return next(b for b in self.buttons if isinstance(b, str) and b.startswith(clicked["choice"]))

    monkeypatch.setattr(module.qt, "QMessageBox", _MessageBox, raising=False)
    clicked["choice"] = "Segment with mpcl 0.0.2"
    assert widget.confirmRuntimeVersion() and state.pip == []  # the user chose to run anyway
    assert "0.0.2" in clicked["text"] and "0.1.0" in clicked["text"]

    _MessageBox.clickedButton = lambda self: self.buttons[-1]  # Cancel
    assert not widget.confirmRuntimeVersion()
    assert widget.ui.statusLabel.text.startswith("Segmenting was not started") and state.pip == []

    clicked["choice"] = "Reinstall mpcl 0.1.0"
    _MessageBox.clickedButton = lambda self: next(b for b in self.buttons if b == clicked["choice"])
    assert widget.confirmRuntimeVersion()  # reinstalled: now the versions match
    assert state.pip == [[str(wheels / "mpcl-0.1.0-py3-none-any.whl"), "--find-links", str(wheels)]]
    assert any("Restart Slicer now?" in question for question in state.asked)  # mpcl 0.0.2 was loaded here


def test_the_sample_model_button_chooses_the_bundled_sample_and_shows_its_card(panel, module, monkeypatch):
    """Beside "choose a model folder": the button sets the model path to Resources/SampleModel and the
    panel shows what model.json says about it (data, test Dice, not for clinical use), before the runtime
    is installed too; with the runtime, the validated classes come first."""
    from MPCLSegmentationLib.samplemodel import is_sample_model, model_description

    widget, state, _wheels = panel
    monkeypatch.setattr(module, "MODULE_DIR", str(PLUGIN))  # the module folder that holds the sample
    card = model_description(PLUGIN / "Resources" / "SampleModel")
    widget.onSampleModelButton()
    assert is_sample_model(widget.ui.modelPathLineEdit.currentPath, PLUGIN)
    assert widget.ui.modelInfoLabel.text == card and widget.ui.modelInfoLabel.style == ""
    for needle in ("not for clinical use", "ACDC", "3 labelled patients", "distilled", "Test Dice", "LV 0."):
        assert needle in card, needle

    state.installed = "0.1.0"  # the runtime validates the package (checksums included)
    widget.onSampleModelButton()
    summary, text = widget.ui.modelInfoLabel.text.split("\n", 1)
    assert summary == "Sample model: ACDC cardiac (demo): 3 classes (RV, myocardium, LV)" and text == card

    widget.run = object()  # while a segmentation runs, the model cannot be switched
    widget.updateButtons()
    assert not widget.ui.sampleModelButton.enabled and not widget.ui.modelPathLineEdit.enabled
