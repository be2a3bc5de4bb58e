"""The export stage, from a trained checkpoint to a checked model package, one step after another.

1. Deployment student: strip training-only parts, fold batch-norm (checked: folded == unfolded), or
   with ``distill`` train a compact student from the network's soft predictions (Dice-gated).
2. ONNX fp32 (opset 17, dynamic batch and spatial axes, onnx.checker, ONNX Runtime basic optimisation
   saved), checked for logit parity with torch on real validation slices; a mismatch writes nothing.
3. int8 (QDQ, calibrated on training slices) and fp16 copies, each kept only if it passes parity (fp16)
   and loses at most ``max_dice_drop`` Dice points on the validation volumes against the source model;
   ``bf16`` checks the fp32 graph run in bf16 by OpenVINO the same way and records the verdict in
   ``files.onnx.openvino_bf16`` (no new file: OpenVINO converts at load time).
4. A TensorRT engine (optional extra), checked the same way on the GPU it was built on.

Every artefact is checked through the runtime backend that will run it, loaded from the staged package,
and the package is published atomically. Each step is also a function of its own module (``student``,
``onnx_export``, ``quantize``, ``distill``, ``tensorrt_build``, ``parity``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mpcl
from mpcl.errors import InputError
from mpcl.export.onnx_export import (
    DYNAMIC_AXES,
    INPUT_NAME,
    OUTPUT_NAME,
    check_onnx_file,
    export_onnx,
    opset_of,
    optimize_onnx,
)
from mpcl.export.package import PackageStage, load_source, package_postprocessing, refuse_existing
from mpcl.export.parity import (
    THRESHOLDS,
    CheckFailed,
    DiceCheck,
    ParityResult,
    backend_logits,
    compare_logits,
    mean_dice,
    random_slices,
    torch_logits,
    validation_slices,
)
from mpcl.model_package import ModelPackage, build_model_json, sha256_of
from mpcl.nn.checkpoint import save_checkpoint
from mpcl.nn.folding import fold_batch_norm
from mpcl.nn.spec import deployment_spec
from mpcl.nn.student import stripped_student
from mpcl.training.data.base import SegmentationData

Echo = Callable[[str], None]


@dataclass
class ExportOptions:
    """What to produce. int8, fp16, bf16 and trt start from the fp32 ONNX graph, so they imply ``onnx``."""

    onnx: bool = True
    int8: bool = False
    fp16: bool = False
    bf16: bool = False  # OpenVINO's bf16 run of the fp32 graph, on CPUs with native bf16
    trt: bool = False
    # a distillation YAML (configs/distill/small.yaml); the Trainer runs in <out_dir>.distill/ (best.pt,
    # latest.pt, train_log.csv, val_log.csv, curves.png) and resumes from its latest.pt if one is there
    distill: str | Path | None = None
    student_checkpoint: str | Path | None = None  # where the distilled student is kept; default beside
    max_dice_drop: float = 1.0  # Dice points (1 point = 0.01) an artefact may lose vs the source model
    calibration_slices: int = 128
    calibration_method: str = "minmax"
    parity_slices: int = 32
    trt_precision: str = "fp16"
    trt_max_batch: int = 16
    name: str = ""
    postprocessing: Mapping[str, Any] | None = None  # model.json's; None: the source package's, if any
    colors: Mapping[str, tuple[int, int, int]] | None = None
    threads: int | None = None
    progress: bool = True

    @property
    def needs_onnx(self) -> bool:
        return self.onnx or self.int8 or self.fp16 or self.bf16 or self.trt

    @property
    def needs_dice(self) -> bool:
        return self.int8 or self.fp16 or self.bf16 or self.trt or self.distill is not None


@dataclass
class ExportReport:
    """The published package, the check lines printed on the way, and the artefacts refused."""

    package: ModelPackage
    lines: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def load_export_data(state: Mapping[str, Any], data_root: str | None) -> SegmentationData:
    """The data the checkpoint was trained on (its stored config), optionally at another root."""
    from mpcl.training.data.loading import load_data
    from mpcl.training.trainer import stored_config

    return load_data(stored_config(state, "the checkpoint", data_root).data)


class _Run:
    """One export's options and the report being written (every check line is echoed and kept)."""

    def __init__(self, options: ExportOptions, echo: Echo, report_lines: list[str], refused: list[str]):
        self.options, self._echo, self.lines, self.refused = options, echo, report_lines, refused

    def echo(self, line: str) -> None:
        self.lines.append(line)
        self._echo(line)


def export_package(
    source: str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    overwrite: bool = False,
    data: SegmentationData | None = None,
    data_root: str | None = None,
    real_data: bool = True,
    echo: Echo | None = None,
) -> ExportReport:
    """Run the export steps ``options`` asks for and publish ``out_dir`` (see the module docstring).

    ``source`` is a training checkpoint or a model package folder. ``data`` defaults to the data named
    in the checkpoint's config (at ``data_root`` if given); with ``real_data=False`` and no lossy step,
    parity runs on random inputs and no data is read (packaging at the end of training).
    Raises CheckFailed (nothing written) when the deployment student or the fp32 ONNX graph fails its
    check; a refused int8/fp16/bf16/TensorRT artefact is left out (bf16: recorded as not kept) and named in
    ``ExportReport.refused``.
    """
    options = options or ExportOptions()
    source, out_dir = Path(source), Path(out_dir)
    run = _Run(options, echo or (lambda line: None), [], [])
    if options.max_dice_drop < 0:
        raise InputError(f"max_dice_drop must be >= 0 Dice points, got {options.max_dice_drop}")
    refuse_existing(out_dir, overwrite)
    if options.trt:
        from mpcl.export.tensorrt_build import TRT_PRECISIONS, tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason is not None:
            raise InputError(reason)
        if options.trt_precision not in TRT_PRECISIONS:
            raise InputError(f"trt precision {options.trt_precision!r}; expected one of {TRT_PRECISIONS}")
    if options.bf16:
        from mpcl.backends.openvino_backend import bf16_unavailable

        reason = bf16_unavailable()
        if reason is not None:
            raise InputError(f"--bf16: {reason}")
    if options.distill is not None:  # a bad distillation config stops before any work
        from mpcl.export.distill import load_distill_config

        load_distill_config(options.distill)
    state = load_source(source)
    metadata = state["metadata"]
    postprocessing = package_postprocessing(source, options.postprocessing, metadata["class_names"])
    patch = (int(metadata["patch_size"][0]), int(metadata["patch_size"][1]))
    in_channels = int(metadata.get("in_channels", 1))
    reference, spec = stripped_student(state)
    if data is None and (real_data or options.needs_dice):
        data = load_export_data(state, data_root)
    if data is not None:
        batch = validation_slices(data.val_volumes, patch, options.parity_slices)
    else:
        batch = random_slices(in_channels, patch)

    source_dice = None
    if options.needs_dice:
        source_dice = mean_dice(
            fold_batch_norm(reference),
            data.val_volumes,
            data.class_names,
            patch,
            metadata.get("resize", "linear"),
        )
        run.echo(f"source model: validation Dice {source_dice:.4f} on {len(data.val_volumes)} volumes")

    network, network_spec, distillation = reference, spec, None
    if options.distill is not None:
        network, network_spec, distillation = _distill(
            run, state, source, out_dir, data, reference, spec, source_dice, batch
        )
    folded = fold_batch_norm(network)
    fold = compare_logits(torch_logits(network, batch), torch_logits(folded, batch), THRESHOLDS["fold"])
    run.echo(f"batch-norm folding: {fold.describe()}")
    if not fold.passed:
        raise CheckFailed(f"the BN-folded network differs from the trained one ({fold.describe()})")

    deploy_metadata = {**metadata, "network": deployment_spec(network_spec)}
    deploy_state = {
        "iteration": int(state["iteration"]),
        "student": folded.state_dict(),
        "metadata": deploy_metadata,
        "config": _config_for(state["config"], network_spec, distilled=distillation is not None),
    }
    model_json = build_model_json(
        deploy_metadata,
        {},
        name=options.name or out_dir.name,
        colors=options.colors,
        postprocessing=postprocessing,
    )
    model_json["training"] = {"checkpoint": source.name, "iteration": int(state["iteration"])}
    model_json["export"] = {
        "mpcl_version": mpcl.__version__,
        "source": source.name,
        "source_sha256": sha256_of(source) if source.is_file() else None,
        "reference": "the source's student network (training-only parts stripped)",
        "source_validation_dice": source_dice,
        "validation_volumes": len(data.val_volumes) if data is not None else 0,
        "parity_inputs": "validation slices" if data is not None else "random",
        "max_dice_drop_points": options.max_dice_drop,
        **({"distillation": distillation} if distillation else {}),
    }
    with PackageStage(out_dir, model_json) as stage:
        stage.save_weights("model.pt", deploy_state)
        stage.add_file("torch", "model.pt", source=source.name, batch_norm="folded", fold_check=fold.record())
        if options.needs_onnx:
            expected = torch_logits(network, batch)
            _onnx_fp32(run, stage, folded, in_channels, patch, batch, expected)
            gate = _Gate(
                run, stage, batch, expected, data, source_dice, patch, metadata.get("resize", "linear")
            )
            if options.int8:
                _int8(run, stage, gate, data, patch)
            if options.fp16:
                _fp16(run, stage, gate)
            if options.bf16:
                _openvino_bf16(run, stage, gate)
            if options.trt:
                _tensorrt(run, stage, gate, in_channels, patch)
        package = stage.publish(overwrite)
    run.echo(f"model package written to {out_dir} ({', '.join(sorted(package.files))})")
    return ExportReport(package, run.lines, run.refused)


def _config_for(config: Mapping[str, Any], network_spec: Mapping[str, Any], distilled: bool) -> dict:
    """The stored training config, with the deployed network's widths (so it describes model.pt)."""
    config = copy.deepcopy(dict(config))
    model = config.setdefault("model", {})
    for key in ("channels", "dropout"):
        if key in network_spec:
            model[key] = list(network_spec[key])
    model["deep_supervision"] = False
    if distilled:  # a plain network now: no method modules or state to rebuild
        config["method"] = {"name": "supervised", "params": {}}
    return config


def _distill(run, state, source, out_dir, data, reference, spec, source_dice, batch):
    """Step 1b: train the compact student, keep its checkpoint, and gate it on validation Dice."""
    from mpcl.export.distill import distill, forward_seconds
    from mpcl.training.trainer import stored_config

    options = run.options
    stored = stored_config(state, "the checkpoint")
    result = distill(
        source,
        data,
        options.distill,
        stored.to_dict(),
        out_dir.parent / f"{out_dir.name}.distill",
        source_dice,
        options.progress,
        echo=run.echo,
    )
    hyper = result.student.hyperparameters()
    channels = hyper["channels"]
    student_spec = {**spec, **{key: hyper[key] for key in ("channels", "dropout", "decoder_dropout")}}
    sample = torch.from_numpy(batch[:8])
    teacher_seconds = forward_seconds(fold_batch_norm(reference), sample)
    speedup = teacher_seconds / forward_seconds(fold_batch_norm(result.student), sample)
    check = DiceCheck(source_dice, result.student_dice, options.max_dice_drop, len(data.val_volumes))
    path = Path(options.student_checkpoint or out_dir.parent / f"{out_dir.name}.student.pt")
    metadata = {**state["metadata"], "network": {**student_spec, "deep_supervision": False}}
    save_checkpoint(
        path,
        {
            "iteration": result.best_iteration,
            "student": result.student.state_dict(),
            "metadata": metadata,
            "config": _config_for(state["config"], student_spec, distilled=True),
        },
    )
    run.echo(
        f"distilled student {channels}: {check.describe()}; Dice retention "
        f"{100 * result.retention:.1f}%, torch eager speed-up {speedup:.2f}x; checkpoint {path} "
        f"(training run {result.run_dir})"
    )
    if not check.passed:
        raise CheckFailed(
            f"the distilled student loses {check.drop_points:.2f} Dice points (more than --max-dice-drop "
            f"{options.max_dice_drop:g}); nothing was written to {out_dir}, the student is kept at {path}"
        )
    record = {
        "channels": list(channels),
        "teacher_channels": list(spec.get("channels", [])),
        "iterations": result.iterations,
        "best_iteration": result.best_iteration,
        "dice_retention": result.retention,
        "torch_eager_speedup": speedup,
        "student_checkpoint": path.name,
        "training_run": result.run_dir.name,
        **check.record(),
    }
    return result.student, student_spec, record


def _onnx_fp32(run, stage, folded, in_channels, patch, batch, expected) -> None:
    """Step 2: export, optimise, check the graph; parity failure raises (nothing is published)."""
    from mpcl.backends.onnxruntime_backend import OnnxRuntimeBackend

    raw = stage.path("torch-export.onnx.tmp")
    export_onnx(folded, raw, in_channels, patch)
    optimize_onnx(raw, stage.path("model.onnx"))
    raw.unlink()
    check_onnx_file(stage.path("model.onnx"))
    package = stage.add_file(
        "onnx",
        "model.onnx",
        precision="fp32",
        opset=opset_of(stage.path("model.onnx")),
        input=INPUT_NAME,
        output=OUTPUT_NAME,
        dynamic_axes=list(DYNAMIC_AXES.values()),
        graph_optimization="onnxruntime basic (saved)",
    )
    backend = OnnxRuntimeBackend(package, "cpu", run.options.threads, precision="fp32")
    _check_dynamic_shapes(backend, in_channels, patch, int(expected.shape[1]))
    parity = compare_logits(expected, backend_logits(backend, batch), THRESHOLDS["onnx_fp32"])
    run.echo(f"onnx fp32: {parity.describe()}")
    if not parity.passed:
        raise CheckFailed(f"the ONNX graph does not match torch ({parity.describe()}); nothing was written")
    stage.update_file(
        "onnx", parity=parity.record(), max_abs_logit_difference_vs_torch=parity.max_abs_logit_difference
    )


def _check_dynamic_shapes(backend, in_channels: int, patch: tuple[int, int], num_classes: int) -> None:
    """The graph really runs at another batch size and spatial size (a traced constant would not)."""
    height, width = patch[0] + 16, patch[1] + 32
    logits = backend.run(np.zeros((3, in_channels, height, width), np.float32))
    if logits.shape != (3, num_classes, height, width):
        raise CheckFailed(
            f"the ONNX graph gives {logits.shape} for a (3, {in_channels}, {height}, {width}) input"
        )


class _Gate:
    """Step 3/4 check of a lossy artefact: parity with torch (reported, gated per precision) and Dice."""

    def __init__(self, run, stage, batch, expected, data, source_dice, patch, resize) -> None:
        self.run, self.stage, self.batch, self.expected = run, stage, batch, expected
        self.data, self.source_dice, self.patch, self.resize = data, source_dice, patch, resize

    def check(self, role: str | None, label: str, thresholds_key: str, make_backend, verdict_in=None) -> bool:
        """Keep the staged file of ``role`` if it passes; otherwise drop it and record why.

        ``verdict_in`` = (file role, key): a run-time variant with no file of its own (``role`` None), whose
        checks and verdict are recorded under that key of that file's entry instead.
        """
        options = self.run.options
        try:
            backend = make_backend(self.stage.write())
            parity: ParityResult = compare_logits(
                self.expected, backend_logits(backend, self.batch), THRESHOLDS[thresholds_key]
            )
            self.run.echo(f"{label}: {parity.describe()}")
            volumes = self.data.val_volumes
            dice_value = mean_dice(backend, volumes, self.data.class_names, self.patch, self.resize)
        except Exception as error:  # onnxruntime and TensorRT raise plain Exceptions
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return self.refuse(role, label, f"it cannot be run ({type(error).__name__}: {first[:200]})")
        dice = DiceCheck(self.source_dice, dice_value, options.max_dice_drop, len(volumes))
        self.run.echo(f"{label}: {dice.describe()}")
        why = None
        if not parity.passed:
            why = f"its logits differ from torch ({parity.describe()})"
        elif not dice.passed:
            why = f"it loses {dice.drop_points:.2f} Dice points (max {options.max_dice_drop:g})"
        if verdict_in is not None:
            verdict = {"kept": why is None, "parity": parity.record(), "dice": dice.record()}
            if why is not None:
                verdict["why"] = why
            self.stage.update_file(verdict_in[0], **{verdict_in[1]: verdict})
        if why is not None:
            return self.refuse(role, label, why)
        if role is not None:
            self.stage.update_file(role, parity=parity.record(), dice=dice.record())
        self.run.echo(f"{label}: kept")
        return True

    def refuse(self, role: str | None, label: str, why: str) -> bool:
        if role is not None:
            self.stage.drop_file(role)
        sentence = f"{label} refused{' and not written' if role is not None else ''}: {why}"
        self.run.refused.append(sentence)
        self.run.echo(sentence)
        return False


def _int8(run, stage, gate: _Gate, data: SegmentationData, patch) -> None:
    from mpcl.backends.onnxruntime_backend import OnnxRuntimeBackend
    from mpcl.export.quantize import calibration_slices, quantize_int8

    options = run.options
    calibration = calibration_slices(data.labeled, data.unlabeled, patch, options.calibration_slices)
    quantize_int8(
        stage.path("model.onnx"), stage.path("model.int8.onnx"), calibration, options.calibration_method
    )
    check_onnx_file(stage.path("model.int8.onnx"))
    stage.add_file(
        "onnx_int8",
        "model.int8.onnx",
        precision="int8",
        quantization={
            "format": "QDQ",
            "weights": "int8 per channel",
            "activations": "uint8 per tensor",
            "calibration": options.calibration_method,
            "calibration_slices": int(len(calibration)),
            "calibration_data": "training slices (labelled and unlabelled)",
        },
    )
    gate.check(
        "onnx_int8",
        "onnx int8",
        "onnx_int8",
        lambda package: OnnxRuntimeBackend(package, "cpu", options.threads, precision="int8"),
    )


def _fp16(run, stage, gate: _Gate) -> None:
    from mpcl.backends.onnxruntime_backend import OnnxRuntimeBackend
    from mpcl.export.quantize import convert_fp16

    convert_fp16(stage.path("model.onnx"), stage.path("model.fp16.onnx"))
    check_onnx_file(stage.path("model.fp16.onnx"))
    stage.add_file("onnx_fp16", "model.fp16.onnx", precision="fp16", interface="float32 (Cast nodes)")
    gate.check(
        "onnx_fp16",
        "onnx fp16",
        "onnx_fp16",
        lambda package: OnnxRuntimeBackend(package, "cpu", run.options.threads, precision="fp16"),
    )


def _openvino_bf16(run, stage, gate: _Gate) -> None:
    """OpenVINO's bf16 run of the fp32 graph: checked like a file variant, its verdict kept in model.json
    with the CPU and OpenVINO version it was measured on."""
    from mpcl.backends.openvino_backend import BF16_RECORD, OpenVinoBackend, measured_on

    gate.check(
        None,
        "openvino bf16",
        "openvino_bf16",
        lambda package: OpenVinoBackend(package, "cpu", run.options.threads, precision="bf16"),
        verdict_in=("onnx", BF16_RECORD),
    )
    verdict = stage.data["files"]["onnx"].get(BF16_RECORD)
    if verdict is not None:
        stage.update_file("onnx", **{BF16_RECORD: {**verdict, **measured_on()}})


def _tensorrt(run, stage, gate: _Gate, in_channels: int, patch) -> None:
    """Step 4 (needs TensorRT and a GPU): engine from the fp32 or fp16 graph, checked on this GPU."""
    from mpcl.backends.tensorrt_backend import TensorRTBackend
    from mpcl.export.quantize import convert_fp16
    from mpcl.export.tensorrt_build import EngineProfile, build_engine

    options = run.options
    precision = options.trt_precision
    graph = stage.path("model.onnx")
    if precision == "fp16":
        graph = stage.path("model.fp16.onnx")
        if "onnx_fp16" not in stage.data["files"]:  # not kept in the package: convert for the build only
            graph = stage.path("tensorrt-input.fp16.onnx.tmp")
            convert_fp16(stage.path("model.onnx"), graph)
    profile = EngineProfile(in_channels, patch, 1, min(8, options.trt_max_batch), options.trt_max_batch)
    try:
        info = build_engine(graph, stage.path("model.engine"), profile, precision)
    except CheckFailed as error:  # the graph does not build on this GPU: leave the engine out
        gate.refuse(None, f"tensorrt {precision}", str(error))
        return
    finally:
        if graph.name.endswith(".tmp"):
            graph.unlink(missing_ok=True)
    stage.add_file("tensorrt", "model.engine", **info)
    gate.check(
        "tensorrt", f"tensorrt {precision}", f"tensorrt_{precision}", lambda p: TensorRTBackend(p, "cuda")
    )


def write_model_package(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    onnx: bool = True,
    overwrite: bool = False,
    name: str = "",
    postprocessing: Mapping[str, Any] | None = None,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
) -> ModelPackage:
    """model.json + model.pt (deployment student) [+ model.onnx] from a checkpoint, without reading data.

    What training writes at the end of a run; parity is checked on random inputs. ``postprocessing``
    is stored in model.json (``{"largest_component": [...] | true, "fill_holes": ...}``) and applied by
    the runtime; ``colors`` maps class names to 0-255 RGB (defaults: Slicer's palette). ``mpcl-export``
    (:func:`export_package`) adds the data-based checks and the int8/fp16/TensorRT artefacts.
    """
    options = ExportOptions(
        onnx=onnx, name=name, postprocessing=postprocessing, colors=colors, progress=False
    )
    return export_package(checkpoint_path, out_dir, options, overwrite=overwrite, real_data=False).package
