"""MPCL Segmentation: segment a volume in 3D Slicer with an MPCL model package.

The Qt-free work (geometry conversion, the mpcl-segment command line and its output parser, building
segmentation nodes) lives in ``MPCLSegmentationLib`` and is tested in CI against the slicer-core wheel;
this file holds what needs the Slicer application: the module description, the widget (with the
non-blocking QProcess that runs inference outside Slicer's process), the module logic, and the self-test.
"""

from __future__ import annotations

import logging
import os
import sys

import qt
import slicer
from MPCLSegmentationLib.logic import SceneSegmenter, SegmentationError, SegmentationJob, SegmentationOutput
from MPCLSegmentationLib.nodes import write_segmentation_file
from MPCLSegmentationLib.process import (
    BACKENDS,
    Progress,
    RunOutcome,
    SegmentOptions,
    child_environment,
    find_python_slicer,
    terminate_tree,
)
from MPCLSegmentationLib.runtime import (
    VersionCheck,
    expected_version,
    gpu_support,
    offered_devices,
    pip_arguments,
    python_supported,
    runtime_source,
    runtime_version,
    same_version,
    unsupported_python_message,
)
from MPCLSegmentationLib.samplemodel import has_sample_model, model_description, sample_model_path
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SETTINGS_PREFIX = "MPCLSegmentation/"
ERROR_STYLE = "color: #c0392b;"
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _setting(key: str, default):
    return slicer.util.settingsValue(SETTINGS_PREFIX + key, default)


def _set_setting(key: str, value) -> None:
    qt.QSettings().setValue(SETTINGS_PREFIX + key, value)


def runtimeCheck() -> VersionCheck:
    """The installed mpcl runtime's version against the one this module was built with (its build's
    record in Resources/Wheels, or the source checkout's pyproject.toml)."""
    return VersionCheck(expected_version(MODULE_DIR), runtime_version())


def runtimeSource():
    """Where "Install runtime" installs from: the PipRequirement setting if the user set one, else the
    wheel bundled with this extension, else the source checkout, else the package index."""
    return runtime_source(MODULE_DIR, _setting("PipRequirement", ""))


#
# MPCLSegmentation
#


class MPCLSegmentation(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MPCL Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MPCL project"]
        self.parent.helpText = _(
            "Segment a volume with an MPCL (multiple-prototype contrastive learning) model package, a "
            "semi-supervised 2D segmentation network; segments get standard SNOMED CT terminology. "
            "Choose the volume and the model package folder (or the bundled sample model, a small "
            "demonstration cardiac model distilled from one trained on ACDC MRI with 3 labelled patients: "
            "right ventricle, myocardium, left ventricle; not for clinical use), then Segment: one named, "
            "coloured segment per class is added, and optionally "
            "the voxel-wise uncertainty as a colour-mapped volume. "
            "Inference runs in a separate process (ONNX Runtime on the CPU out of the box, a GPU when one is "
            "usable), so Slicer stays responsive and Cancel stops it at once. "
            "See docs/slicer.md and plugins/slicer/README.md in the MPCL repository."
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer's scripted module template and segmentation infrastructure."
        )


#
# MPCLSegmentationWidget
#


class MPCLSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, options, runtime installation, progress and errors."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self.gpu = None  # GpuSupport, probed in setup (and again after installing the runtime)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MPCLSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MPCLSegmentationLogic()

        self.updateDevices()
        self.ui.backendComboBox.addItems(list(BACKENDS))
        self.restoreSettings()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.sampleModelButton.connect("clicked(bool)", self.onSampleModelButton)
        self.ui.sampleModelButton.visible = has_sample_model(MODULE_DIR)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.installRuntimeButton.connect("clicked(bool)", self.onInstallRuntimeButton)

        self.ui.progressBar.hide()
        self.updateRuntimeStatus()
        self.onModelPathChanged(self.ui.modelPathLineEdit.currentPath)
        if not self.ui.inputVolumeSelector.currentNode():
            self.ui.inputVolumeSelector.setCurrentNode(
                slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            )
        self.updateButtons()

    def cleanup(self) -> None:
        self.cancelRun()
        self.removeObservers()

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun()

    # -- settings ---------------------------------------------------------------------------------
    def restoreSettings(self) -> None:
        self.ui.modelPathLineEdit.currentPath = _setting("ModelPath", "")
        self.setDevice(_setting("Device", "auto"))
        self.ui.backendComboBox.currentText = _setting("Backend", "auto")
        self.ui.ttaCheckBox.checked = slicer.util.toBool(_setting("TTA", False))
        self.ui.uncertaintyCheckBox.checked = slicer.util.toBool(_setting("Uncertainty", False))
        self.ui.show3DCheckBox.checked = slicer.util.toBool(_setting("Show3D", True))

    def saveSettings(self) -> None:
        _set_setting("ModelPath", self.ui.modelPathLineEdit.currentPath)
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        _set_setting("Device", self.ui.deviceComboBox.currentText)
        _set_setting("Backend", self.ui.backendComboBox.currentText)
        _set_setting("TTA", self.ui.ttaCheckBox.checked)
        _set_setting("Uncertainty", self.ui.uncertaintyCheckBox.checked)
        _set_setting("Show3D", self.ui.show3DCheckBox.checked)

    # -- devices ----------------------------------------------------------------------------------
    def updateDevices(self) -> None:
        """Offer ``cuda`` only where a runtime in Slicer's Python can use it (the reason as tooltip)."""
        current = self.ui.deviceComboBox.currentText or _setting("Device", "auto")
        self.gpu = gpu_support()
        self.ui.deviceComboBox.clear()
        self.ui.deviceComboBox.addItems(list(offered_devices(self.gpu)))
        self.ui.deviceComboBox.toolTip = _(
            "auto: the GPU when a runtime can use one, otherwise the CPU (the result says which ran). "
            "cpu: always works. {detail}"
        ).format(detail=self.gpu.detail)
        self.setDevice(current)

    def setDevice(self, device: str) -> None:
        offered = offered_devices(self.gpu) if self.gpu is not None else ("auto", "cpu")
        if device not in offered:
            if device:
                self.showStatus(
                    _("Device {device} is not available here; using auto. {detail}").format(
                        device=device, detail=self.gpu.detail
                    )
                )
            device = "auto"
        self.ui.deviceComboBox.currentText = device

    # -- state ------------------------------------------------------------------------------------
    def updateButtons(self, *unused) -> None:
        running = self.run is not None
        ready = bool(self.ui.inputVolumeSelector.currentNode() and self.ui.modelPathLineEdit.currentPath)
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = (
            _("Segment the input volume with the model package.")
            if ready
            else _("Select an input volume and a model package folder first.")
        )
        self.ui.cancelButton.enabled = running
        for widget in (
            self.ui.inputVolumeSelector,
            self.ui.modelPathLineEdit,
            self.ui.sampleModelButton,
            self.ui.deviceComboBox,
            self.ui.backendComboBox,
            self.ui.ttaCheckBox,
            self.ui.uncertaintyCheckBox,
            self.ui.show3DCheckBox,
            self.ui.outputSegmentationSelector,
            self.ui.installRuntimeButton,
        ):
            widget.enabled = not running

    def updateRuntimeStatus(self) -> None:
        """The runtime section: installed or not, and whether it is the version this module was built with."""
        if not python_supported():
            self.ui.runtimeStatusLabel.text = unsupported_python_message()
            self.ui.runtimeStatusLabel.setStyleSheet(ERROR_STYLE)
            self.ui.installRuntimeButton.enabled = False
            self.ui.runtimeCollapsibleButton.collapsed = False
            return
        check = runtimeCheck()
        if check.installed:
            message = _("{check} Inference runs with {python}.")
            self.ui.runtimeStatusLabel.text = message.format(check=check.message, python=find_python_slicer())
            self.ui.runtimeStatusLabel.setStyleSheet(ERROR_STYLE if check.mismatch else "")
            self.ui.installRuntimeButton.text = (
                _("Reinstall mpcl runtime {version}").format(version=check.expected)
                if check.mismatch
                else _("Reinstall / update mpcl runtime")
            )
            if check.mismatch:  # said when the module starts, not only when segmenting
                self.ui.runtimeCollapsibleButton.collapsed = False
                self.showStatus(check.message, error=True)
        else:
            self.ui.runtimeStatusLabel.text = _(
                "The mpcl runtime is not installed in Slicer's Python. It is installed from {source} the "
                "first time you segment (or now, with the button below)."
            ).format(source=runtimeSource().description)
            self.ui.runtimeStatusLabel.setStyleSheet("")
            self.ui.runtimeCollapsibleButton.collapsed = False

    def onSampleModelButton(self) -> None:
        """Choose the bundled sample model: the model path becomes its folder (and its card shows)."""
        self.ui.modelPathLineEdit.currentPath = str(sample_model_path(MODULE_DIR))
        self.onModelPathChanged(self.ui.modelPathLineEdit.currentPath)

    def onModelPathChanged(self, path) -> None:
        """Show what the chosen package is: its classes (once the runtime validated it) and the text its
        model.json gives (for the sample model: data, test Dice, not for clinical use)."""
        self.updateButtons()
        self.ui.modelInfoLabel.setStyleSheet("")
        description = model_description(path)
        self.ui.modelInfoLabel.text = description
        if not path or not runtime_version():
            return
        try:
            from mpcl.errors import MPCLError
            from mpcl.model_package import load_model_package

            package = load_model_package(path)
        except MPCLError as error:
            self.ui.modelInfoLabel.text = str(error)
            self.ui.modelInfoLabel.setStyleSheet(ERROR_STYLE)
            return
        except ImportError:
            return
        names = ", ".join(label.name for label in package.classes if label.value)
        summary = _("{name}: {count} classes ({names})").format(
            name=package.name or os.path.basename(path), count=len(package.classes) - 1, names=names
        )
        self.ui.modelInfoLabel.text = "\n".join(text for text in (summary, description) if text)

    def showStatus(self, message: str, error: bool = False) -> None:
        self.ui.statusLabel.text = message
        self.ui.statusLabel.setStyleSheet(ERROR_STYLE if error else "")
        (logging.error if error else logging.info)(f"MPCLSegmentation: {message}")

    def showError(self, message: str, details: str = "") -> None:
        """Errors go to the module panel (and a dialog with the process log), not only to the console."""
        self.showStatus(message, error=True)
        extra = {"detailedText": details} if details else {}
        slicer.util.errorDisplay(message, windowTitle=_("MPCL Segmentation"), **extra)

    # -- runtime installation ---------------------------------------------------------------------
    def ensureRuntime(self) -> bool:
        """True when mpcl is importable; otherwise offer to pip-install it (after confirmation)."""
        if not python_supported():
            self.showError(unsupported_python_message())
            return False
        if runtime_version():
            return True
        source = runtimeSource()
        if source.kind == "wheel":
            download = _(
                "mpcl itself needs no download; its dependencies (ONNX Runtime, nibabel) are downloaded "
                "unless Slicer's Python already has them."
            )
        else:
            download = _("This downloads a few tens of MB and may take a few minutes.")
        question = _(
            "MPCL Segmentation needs the mpcl runtime (with ONNX Runtime and SimpleITK) in Slicer's "
            "Python. Install it now with pip from {source}? {download}"
        ).format(source=source.description, download=download)
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install mpcl runtime")):
            self.showStatus(_("The mpcl runtime is not installed; nothing was run."), error=True)
            return False
        return self.installRuntime(upgrade=False)

    def installRuntime(self, upgrade: bool) -> bool:
        """pip-install (or reinstall) the runtime: the bundled wheel, else the source checkout, else the
        package index (or the source set in the PipRequirement setting); errors go to the panel."""
        if not python_supported():
            self.showError(unsupported_python_message())
            return False
        source = runtimeSource()
        before = runtime_version()
        loaded = "mpcl" in sys.modules  # this Slicer imported mpcl already (the model information)
        arguments = pip_arguments(source, before, upgrade)
        self.showStatus(
            _("Installing the mpcl runtime from {source} with pip...").format(source=source.description)
        )
        logging.info("MPCLSegmentation: pip install %s", " ".join(arguments))
        dialog = slicer.util.createProgressDialog(
            labelText=_("Installing the mpcl runtime, please wait..."),
            maximum=0,
            windowTitle=_("MPCL Segmentation"),
        )
        slicer.app.processEvents()
        try:
            slicer.util.pip_install(arguments)  # a list keeps a path with spaces in one argument
        except Exception as error:  # pip failures come as CalledProcessError, network errors as OSError
            hint = (
                _("The package index is needed for this source: check the network connection. ")
                if source.needs_index
                else ""
            )
            self.showError(
                _(
                    "Installing the mpcl runtime from {source} failed ({error}). {hint}Install it from the "
                    "Python console with slicer.util.pip_install({arguments}) to see pip's full output. A "
                    "different package source (a wheel file or a folder) can be set in the Slicer setting "
                    "{key}."
                ).format(
                    source=source.description,
                    error=error,
                    hint=hint,
                    arguments=arguments,
                    key=SETTINGS_PREFIX + "PipRequirement",
                )
            )
            return False
        finally:
            dialog.close()
        self.updateRuntimeStatus()
        after = runtime_version()
        if not after:
            self.showError(_("pip finished but mpcl still cannot be imported; restart Slicer and try again."))
            return False
        check = runtimeCheck()
        self.showStatus(
            _("mpcl {version} installed.").format(version=after) if check.ok else check.message,
            error=not check.ok,
        )
        self.updateDevices()
        if loaded and before and not same_version(before, after):
            question = _(
                "mpcl {version} is installed. Segmenting uses it from now on (it runs in a new process), but "
                "this Slicer still has mpcl {old} loaded for the module panel. Restart Slicer now?"
            ).format(version=after, old=before)
            if slicer.util.confirmYesNoDisplay(question, windowTitle=_("MPCL Segmentation")):
                slicer.util.restart()
        self.onModelPathChanged(self.ui.modelPathLineEdit.currentPath)
        return True

    def onInstallRuntimeButton(self) -> None:
        self.installRuntime(upgrade=bool(runtime_version()))

    def confirmRuntimeVersion(self) -> bool:
        """True when segmenting may go ahead: the runtime is the module's version, or the user chose to
        reinstall it (and now it is) or to run with the other version anyway."""
        check = runtimeCheck()
        if not check.mismatch:
            return True
        if slicer.util.toBool(_setting("AllowVersionMismatch", False)):
            logging.warning(
                "MPCLSegmentation: %s (allowed by the AllowVersionMismatch setting)", check.message
            )
            return True
        self.showStatus(check.refusal, error=True)
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("MPCL Segmentation"))
        box.setIcon(qt.QMessageBox.Warning)
        box.setText(check.refusal)
        reinstall = box.addButton(
            _("Reinstall mpcl {version}").format(version=check.expected), qt.QMessageBox.AcceptRole
        )
        anyway = box.addButton(
            _("Segment with mpcl {version}").format(version=check.installed), qt.QMessageBox.DestructiveRole
        )
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        if box.clickedButton() == anyway:
            logging.warning("MPCLSegmentation: segmenting with a mismatched runtime: %s", check.message)
            return True
        if box.clickedButton() == reinstall and self.installRuntime(upgrade=True):
            check = runtimeCheck()
            if check.ok:
                return True
            self.showError(check.refusal)
        return False

    # -- running ----------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self.run is not None or not self.ensureRuntime() or not self.confirmRuntimeVersion():
            return
        self.saveSettings()
        try:
            options = SegmentOptions(
                device=self.ui.deviceComboBox.currentText,
                backend=self.ui.backendComboBox.currentText,
                tta=self.ui.ttaCheckBox.checked,
                uncertainty=self.ui.uncertaintyCheckBox.checked,
            )
            job = self.logic.prepare(
                self.ui.inputVolumeSelector.currentNode(),
                self.ui.modelPathLineEdit.currentPath,
                options,
                allowVersionMismatch=True,  # confirmRuntimeVersion asked
            )
        except (SegmentationError, ValueError, OSError) as error:
            self.showError(str(error))
            return
        self.run = QProcessSegmentation(job, self.onProgress, self.onRunFinished, self.onLogLine)
        self.ui.logTextEdit.clear()
        self.ui.progressBar.show()
        self.ui.progressBar.setRange(0, 0)  # busy until mpcl-segment reports real progress
        self.updateButtons()
        self.run.start()

    def onProgress(self, progress: Progress) -> None:
        self.showStatus(progress.message)
        if progress.fraction > 0.2:  # past loading: per-case (or per-slice) progress from the child
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = int(round(100 * progress.fraction))

    def onLogLine(self, line: str) -> None:
        """Each line the child prints goes to the module's log box (and Slicer's log)."""
        self.ui.logTextEdit.appendPlainText(line)
        logging.info("mpcl-segment: %s", line)

    def onCancelButton(self) -> None:
        self.cancelRun()

    def cancelRun(self) -> None:
        if self.run is not None:
            self.showStatus(_("Stopping the segmentation process..."))
            self.run.cancel()

    def onRunFinished(self, job: SegmentationJob, outcome: RunOutcome) -> None:
        self.run = None
        self.ui.progressBar.hide()
        self.updateButtons()
        if job.volume_node.GetScene() is None:
            self.logic.discard(job)
            self.showStatus(_("The input volume was removed during segmentation; nothing was added."), True)
            return
        try:
            with slicer.util.WaitCursor():
                output = self.logic.finish(
                    job,
                    outcome,
                    self.ui.outputSegmentationSelector.currentNode(),
                    self.ui.show3DCheckBox.checked,
                )
        except SegmentationError as error:
            if error.cancelled:
                self.showStatus(str(error))
            else:
                self.ui.logCollapsibleButton.collapsed = False
                self.showError(str(error), "\n".join(outcome.log))
            return
        self.ui.outputSegmentationSelector.setCurrentNode(output.segmentation_node)
        if output.uncertainty_node is not None:
            slicer.util.setSliceViewerLayers(
                background=job.volume_node, foreground=output.uncertainty_node, foregroundOpacity=0.4
            )
        else:
            slicer.util.setSliceViewerLayers(background=job.volume_node)
        counts = ", ".join(f"{name}: {count}" for name, count in output.voxel_counts.items())
        summary = _("{message} Voxels per segment: {counts}.")
        self.showStatus(summary.format(message=outcome.message, counts=counts))


class QProcessSegmentation:
    """Runs a prepared job's mpcl-segment command with a non-blocking qt.QProcess.

    Output lines go through the job's OutputMonitor (the parser the blocking path uses), so progress,
    the device that ran and failure messages are read the same way; the lines meant for the user go to
    ``onLine`` (the log box). Cancel stops the whole process tree (the PythonSlicer launcher, the Python
    child in its own process group, anything that started) and returns once it is gone, so the job's
    work folder is removed only after nothing writes into it any more.
    """

    def __init__(self, job: SegmentationJob, onProgress, onFinished, onLine=None) -> None:
        self.job = job
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.onLine = onLine
        self.cancelled = False
        self.reported = False
        self.process = qt.QProcess()
        self.process.setProcessChannelMode(qt.QProcess.MergedChannels)
        environment = qt.QProcessEnvironment()
        for key, value in child_environment().items():
            environment.insert(key, value)
        self.process.setProcessEnvironment(environment)
        self.process.connect("readyReadStandardOutput()", self.onReadyRead)
        self.process.connect("finished(int,QProcess::ExitStatus)", self.onProcessFinished)
        self.process.connect("errorOccurred(QProcess::ProcessError)", self.onProcessError)

    def start(self) -> None:
        logging.info("MPCLSegmentation: running %s", " ".join(self.job.command))
        self.onProgress(self.job.monitor.started())
        self.process.start(self.job.command[0], self.job.command[1:])

    def cancel(self) -> None:
        if self.process.state() == qt.QProcess.NotRunning:
            return
        self.cancelled = True
        self.onReadyRead()  # the "@mpcl pid" line may be waiting in the buffer
        if not terminate_tree(int(self.process.processId()), self.job.monitor.child_pid):
            logging.warning("MPCLSegmentation: some of the segmentation processes did not stop")
        if self.process.state() != qt.QProcess.NotRunning:
            self.process.kill()

    def onReadyRead(self) -> None:
        while self.process.canReadLine():
            self.feed(self.process.readLine())

    def feed(self, data) -> None:
        raw = data.data() if hasattr(data, "data") else data
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", errors="replace")
        for line in text.splitlines():
            progress = self.job.monitor.feed(line)
            if self.onLine is not None and line.strip() and not self.job.monitor.is_protocol(line):
                self.onLine(line)
            if progress is not None:
                self.onProgress(progress)

    def onProcessFinished(self, exitCode, exitStatus) -> None:
        self.feed(self.process.readAll())
        crashed = exitStatus == qt.QProcess.CrashExit
        self.report(self.job.monitor.finish(int(exitCode), crashed=crashed, cancelled=self.cancelled))

    def onProcessError(self, error) -> None:
        if error == qt.QProcess.FailedToStart:
            self.report(
                RunOutcome(False, _("Could not start {program}.").format(program=self.job.command[0]))
            )

    def report(self, outcome: RunOutcome) -> None:
        if not self.reported:
            self.reported = True
            self.onFinished(self.job, outcome)


#
# MPCLSegmentationLogic
#


class MPCLSegmentationLogic(ScriptedLoadableModuleLogic):
    """Segment volume nodes of the application's scene; usable from the Python console without the GUI.

    Example::

        logic = slicer.util.getModuleLogic("MPCLSegmentation")
        output = logic.process(volumeNode, "/path/to/model", device="cpu", uncertainty=True)
        logic.saveSegmentation(output.segmentation_node, "/tmp/result.seg.nrrd")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def segmenter(self) -> SceneSegmenter:
        """A SceneSegmenter bound to the current scene, Slicer's segmentations logic and PythonSlicer."""
        return SceneSegmenter(
            slicer.mrmlScene,
            slicer.modules.segmentations.logic(),
            python=find_python_slicer(),
            work_root=os.path.join(slicer.app.temporaryPath, "MPCLSegmentation"),
        )

    def checkRuntime(self, allowVersionMismatch: bool = False) -> VersionCheck:
        """Refuse (SegmentationError, one sentence naming both versions) when the installed runtime is
        not the version this module was built with, unless ``allowVersionMismatch``."""
        check = runtimeCheck()
        if check.mismatch:
            if not allowVersionMismatch:
                raise SegmentationError(check.refusal_message("pass allowVersionMismatch=True"))
            logging.warning("MPCLSegmentation: %s", check.message)
        return check

    def prepare(
        self, volumeNode, modelPath: str, options: SegmentOptions, allowVersionMismatch: bool = False
    ) -> SegmentationJob:
        self.checkRuntime(allowVersionMismatch)
        return self.segmenter().prepare(volumeNode, modelPath, options)

    def finish(self, job: SegmentationJob, outcome: RunOutcome, segmentationNode=None, show3D: bool = True):
        return self.segmenter().finish(job, outcome, segmentationNode, show3D)

    def discard(self, job: SegmentationJob) -> None:
        self.segmenter().discard(job)

    def process(
        self,
        volumeNode,
        modelPath: str,
        device: str = "auto",
        backend: str = "auto",
        tta: bool = False,
        uncertainty: bool = False,
        segmentationNode=None,
        show3D: bool = True,
        allowVersionMismatch: bool = False,
    ) -> SegmentationOutput:
        """Segment ``volumeNode`` and wait (the GUI is not refreshed meanwhile; the widget does not wait).

        Refused when the installed mpcl runtime is not the version this module was built with, unless
        ``allowVersionMismatch``.
        """
        self.checkRuntime(allowVersionMismatch)
        options = SegmentOptions(device=device, backend=backend, tta=tta, uncertainty=uncertainty)
        output = self.segmenter().segment(volumeNode, modelPath, options, segmentationNode, show3D)
        logging.info("MPCLSegmentation: %s", output.outcome.message)
        return output

    def saveSegmentation(self, segmentationNode, path: str):
        """Write ``segmentationNode`` as a .seg.nrrd (Slicer's writer, atomic rename)."""
        return write_segmentation_file(slicer.mrmlScene, segmentationNode, path)


#
# MPCLSegmentationTest
#


class MPCLSegmentationTest(ScriptedLoadableModuleTest):
    """Self-test: segment the synthetic sample volume with the shipped test model package.

    Run it in Slicer with ``Slicer --no-main-window --python-code
    "slicer.selfTests['MPCLSegmentation'](); slicer.util.exit()"``. Segmenting needs the mpcl runtime;
    where it is not installed (the Extensions build servers: the runtime is installed by the user, on
    demand) those tests are skipped with a warning, as SlicerTotalSegmentator skips its logic test.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.skipped = []
        self.setUp()
        self.test_ModuleLoadsWithoutRuntime()
        self.setUp()
        self.test_SegmentSampleVolume()
        self.setUp()
        self.test_InvalidModelIsReported()

    def runtimeMissing(self, test: str) -> bool:
        """True (and a warning) when the mpcl runtime is absent: the test is skipped, not failed."""
        if runtime_version():
            return False
        message = f"{test} skipped: the mpcl runtime is not installed in this Slicer"
        logging.warning(message)
        self.skipped.append(test)
        self.delayDisplay(message)
        return True

    def test_ModuleLoadsWithoutRuntime(self):
        """What needs no runtime: the Lib imports, the sample volume, the device choices."""
        from MPCLSegmentationLib import testdata

        array, ijkToRas, truth = testdata.sample_volume()
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRas, name="MPCL sample volume")
        self.assertEqual(slicer.util.arrayFromVolume(volume).shape, truth.shape)
        self.assertIn("cpu", offered_devices(gpu_support()))
        self.assertTrue(testdata.default_test_model().joinpath("model.json").is_file())
        self.assertTrue(has_sample_model(MODULE_DIR))  # the bundled sample model and its card
        self.assertIn("not for clinical use", model_description(sample_model_path(MODULE_DIR)))

    def test_SegmentSampleVolume(self):
        import tempfile

        import numpy as np
        from MPCLSegmentationLib import testdata

        if self.runtimeMissing("test_SegmentSampleVolume"):
            return
        self.delayDisplay("Adding the sample volume")
        array, ijkToRas, truth = testdata.sample_volume()
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRas, name="MPCL sample volume")

        self.delayDisplay("Segmenting it in a separate process")
        logic = MPCLSegmentationLogic()
        output = logic.process(volume, str(testdata.default_test_model()), device="cpu", uncertainty=True)
        segmentation = output.segmentation_node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, list(testdata.CLASS_NAMES[1:]))
        for value, name in enumerate(testdata.CLASS_NAMES[1:], start=1):
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            voxels = slicer.util.arrayFromSegmentBinaryLabelmap(output.segmentation_node, segmentId, volume)
            self.assertEqual(int(np.count_nonzero(voxels)), int(np.count_nonzero(truth == value)), name)
            self.assertTrue(np.array_equal(voxels > 0, truth == value), name)
        rightVentricle = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("right ventricle"))
        self.assertIn("~SCT^53085002^Right ventricle~", rightVentricle.GetTerminology())  # not "Tissue"
        self.assertIn("on cpu", output.outcome.message)  # which device ran is always said
        self.assertIsNotNone(output.uncertainty_node)
        self.assertEqual(slicer.util.arrayFromVolume(output.uncertainty_node).shape, array.shape)

        self.delayDisplay("Saving and reloading the .seg.nrrd")
        with tempfile.TemporaryDirectory() as folder:
            path = logic.saveSegmentation(output.segmentation_node, os.path.join(folder, "sample.seg.nrrd"))
            loaded = slicer.util.loadSegmentation(str(path)).GetSegmentation()
            loadedNames = [loaded.GetNthSegment(i).GetName() for i in range(loaded.GetNumberOfSegments())]
            self.assertEqual(loadedNames, names)
        self.delayDisplay("Test passed")

    def test_InvalidModelIsReported(self):
        import tempfile

        from MPCLSegmentationLib import testdata

        if self.runtimeMissing("test_InvalidModelIsReported"):
            return
        array, ijkToRas, _truth = testdata.sample_volume()
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRas, name="MPCL sample volume")
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        with tempfile.TemporaryDirectory() as folder:
            with self.assertRaises(SegmentationError) as raised:
                MPCLSegmentationLogic().process(volume, folder)
        self.assertIn("model.json", str(raised.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before)
        self.delayDisplay("Invalid model package reported")
