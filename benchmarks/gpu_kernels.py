"""GPU benchmark of the fused Triton kernels: per-volume latency of the Segmenter's per-batch work.

For each synthetic volume (ACDC-like: 10 slices of 216x256; CT-like: 100 slices of 512x512) the slices are
segmented in batches by one randomly initialised SSL4MIS U-Net (latency does not depend on the weights),
with these pipelines (all start from the raw float32 slices on the host and end with uint8 labels and the
entropy map on the host):

* ``numpy``      network on the GPU, normalise/resize/softmax/flip mean/resize back/argmax/entropy in
                 numpy on the host: the runtime's path without fused kernels;
* ``eager``      the same work in torch eager ops on the GPU (F.interpolate with align_corners=True);
* ``fused``      the two fused Triton kernels of ``mpcl.kernels`` around the network;
* ``fused_graph`` the fused pipeline of one batch captured in a CUDA graph and replayed;
* ``fused_fp16``, ``fused_fp16_graph``: the same with the network in float16.

Also per volume: ``network`` (the network alone on already-prepared batches, the floor), and the head and
preprocessing stages alone, torch eager vs fused (``eager_head``/``fused_head``,
``eager_preprocess``/``fused_preprocess``). Each pipeline's labels are compared with the numpy path's
(fraction equal) and its entropy (max abs difference). With ``--segmenter`` the Segmenter itself is timed
end to end on the same volume with ``fused_kernels="off"`` and ``"on"`` (torch backend on CUDA).

    python benchmarks/gpu_kernels.py                       # writes benchmarks/results/gpu_kernels_<gpu>.json
    python benchmarks/gpu_kernels.py --tta --repeats 20

Without a CUDA GPU it exits with a sentence saying so. ``--smoke`` runs tiny sizes on the CPU under
Triton's interpreter (TRITON_INTERPRET=1) to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TTA_FLIPS = ((), (-1,), (-2,), (-2, -1))


def _synthetic_volumes(smoke: bool) -> dict[str, np.ndarray]:
    """Raw (slices, H, W) float32 volumes: an MR-like short-axis stack and a CT-like one."""
    rng = np.random.default_rng(0)
    shapes = {"acdc_like": (2, 20, 24), "ct_like": (3, 30, 30)} if smoke else {
        "acdc_like": (10, 216, 256),
        "ct_like": (100, 512, 512),
    }
    volumes = {}
    for name, (count, height, width) in shapes.items():
        _, y, x = np.ogrid[:1, :height, :width]
        body = ((y - height / 2) ** 2 + (x - width / 2) ** 2) < (0.35 * min(height, width)) ** 2
        base = np.where(body, 400.0, 50.0) if name == "acdc_like" else np.where(body, 40.0, -1000.0)
        volumes[name] = (base + rng.normal(0, 20, (count, height, width))).astype(np.float32)
    return volumes


class Pipelines:
    """Every way of segmenting a (n, H, W) float32 host volume in batches; each returns (labels, entropy)."""

    def __init__(self, model, patch, flips, batch_size, device) -> None:
        import torch

        from mpcl.kernels.triton_head import flip_codes_tensor

        self.torch, self.model, self.patch = torch, model, tuple(patch)
        self.flips, self.batch_size, self.device = tuple(flips), batch_size, device
        self.model_fp16 = copy.deepcopy(model).half() if device.startswith("cuda") else None
        self.codes = flip_codes_tensor(self.flips, device)
        self.graphs: dict[tuple, Callable] = {}

    # -- helpers ------------------------------------------------------------------------------------
    def _batches(self, volume: np.ndarray):
        for start in range(0, len(volume), self.batch_size):
            yield volume[start : start + self.batch_size]

    def _with_flips(self, batch):
        if len(self.flips) == 1:
            return batch
        return self.torch.cat([batch.flip(f) if f else batch for f in self.flips])

    def _upload(self, chunk: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device, non_blocking=False)

    # -- pipelines ----------------------------------------------------------------------------------
    def numpy(self, volume, affine):
        from mpcl.kernels.reference import head_reference, preprocess_reference

        labels, entropy = [], []
        for chunk in self._batches(volume):
            batch = preprocess_reference(chunk, affine, self.patch)
            if len(self.flips) > 1:
                flipped = [np.flip(batch, f) if f else batch for f in self.flips]
                batch = np.ascontiguousarray(np.concatenate(flipped))
            logits = self.model(self._upload(batch)).float().cpu().numpy()
            head = head_reference(logits, self.flips, chunk.shape[1:], uncertainty=True)
            labels.append(head.labels)
            entropy.append(head.uncertainty)
        return np.concatenate(labels), np.concatenate(entropy)

    def eager_preprocess(self, raw, affine):
        functional = self.torch.nn.functional
        lower, upper, offset, divisor = (float(v) for v in affine)
        normalized = (raw.clamp(lower, upper) - offset) / divisor
        return functional.interpolate(normalized[:, None], self.patch, mode="bilinear", align_corners=True)

    def eager_head(self, logits, out_hw):
        torch = self.torch
        probabilities = logits.float().softmax(1)
        if len(self.flips) > 1:
            parts = probabilities.chunk(len(self.flips))
            probabilities = sum(p.flip(f) if f else p for p, f in zip(parts, self.flips, strict=True))
            probabilities = probabilities / len(self.flips)
        probabilities = torch.nn.functional.interpolate(
            probabilities, out_hw, mode="bilinear", align_corners=True
        )
        labels = probabilities.argmax(1).to(torch.uint8)
        classes = probabilities.shape[1]
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1) / math.log(max(classes, 2))
        return labels, entropy.clamp(0, 1) if classes > 1 else torch.zeros_like(entropy)

    def eager(self, volume, affine):
        labels, entropy = [], []
        for chunk in self._batches(volume):
            batch = self._with_flips(self.eager_preprocess(self._upload(chunk), affine))
            chunk_labels, chunk_entropy = self.eager_head(self.model(batch), chunk.shape[1:])
            labels.append(chunk_labels.cpu().numpy())
            entropy.append(chunk_entropy.cpu().numpy())
        return np.concatenate(labels), np.concatenate(entropy)

    def _fused_step(self, raw, affine_tensor, half: bool):
        from mpcl.kernels.triton_head import fused_head
        from mpcl.kernels.triton_preprocess import fused_preprocess

        dtype = self.torch.float16 if half else self.torch.float32
        batch = self._with_flips(fused_preprocess(raw, affine_tensor, self.patch, out_dtype=dtype))
        logits = (self.model_fp16 if half else self.model)(batch).contiguous()
        labels, _, entropy = fused_head(logits, self.codes, tuple(raw.shape[1:]), uncertainty=True)
        return labels, entropy

    def fused(self, volume, affine, half: bool = False):
        from mpcl.kernels.triton_preprocess import affine_tensor

        affine_on_device = affine_tensor(affine, self.device)
        labels, entropy = [], []
        for chunk in self._batches(volume):
            chunk_labels, chunk_entropy = self._fused_step(self._upload(chunk), affine_on_device, half)
            labels.append(chunk_labels.cpu().numpy())
            entropy.append(chunk_entropy.cpu().numpy())
        return np.concatenate(labels), np.concatenate(entropy)

    def fused_fp16(self, volume, affine):
        return self.fused(volume, affine, half=True)

    def _graph(self, in_hw, half: bool):
        """One batch of the fused pipeline captured in a CUDA graph (static input, affine and outputs)."""
        key = (in_hw, half)
        if key not in self.graphs:
            torch = self.torch
            static_in = torch.zeros((self.batch_size, *in_hw), dtype=torch.float32, device=self.device)
            static_affine = torch.zeros(4, dtype=torch.float32, device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # compiles the kernels and settles the allocator before capture
                    self._fused_step(static_in, static_affine, half)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._fused_step(static_in, static_affine, half)
            self.graphs[key] = (graph, static_in, static_affine, static_out)
        return self.graphs[key]

    def fused_graph(self, volume, affine, half: bool = False):
        torch = self.torch
        graph, static_in, static_affine, (static_labels, static_entropy) = self._graph(volume.shape[1:], half)
        static_affine.copy_(torch.tensor([float(v) for v in affine], dtype=torch.float32))
        labels, entropy = [], []
        for chunk in self._batches(volume):
            count = len(chunk)
            static_in[:count].copy_(torch.from_numpy(np.ascontiguousarray(chunk)))
            if count < self.batch_size:
                static_in[count:].zero_()
            graph.replay()
            labels.append(static_labels[:count].cpu().numpy())
            entropy.append(static_entropy[:count].cpu().numpy())
        return np.concatenate(labels), np.concatenate(entropy)

    def fused_fp16_graph(self, volume, affine):
        return self.fused_graph(volume, affine, half=True)

    # -- stages alone -------------------------------------------------------------------------------
    def stage_inputs(self, volume, affine):
        """Per batch: raw slices on the device, the network input, and its logits (prepared once)."""
        from mpcl.kernels.triton_preprocess import affine_tensor, fused_preprocess

        affine_on_device = affine_tensor(affine, self.device)
        prepared = []
        for chunk in self._batches(volume):
            raw = self._upload(chunk)
            batch = self._with_flips(fused_preprocess(raw, affine_on_device, self.patch))
            prepared.append((raw, batch, self.model(batch).contiguous()))
        return affine_on_device, prepared


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _time(run: Callable[[], object], torch, device: str, warmup: int, repeats: int) -> tuple[float, object]:
    """Median seconds of ``run`` (device synchronised around each call) and its last result."""
    result = None
    for _ in range(warmup):
        result = run()
    _sync(torch, device)
    seconds = []
    for _ in range(repeats):
        clock = time.perf_counter()
        result = run()
        _sync(torch, device)
        seconds.append(time.perf_counter() - clock)
    return statistics.median(seconds), result


def _segmenter_rows(volume, classes, patch, batch_size, tta, torch, device, warmup, repeats) -> dict:
    """The Segmenter end to end (array in, labels + uncertainty out) with fused_kernels off and on."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from inference import make_default_package

    from mpcl import Segmenter

    if classes != 4 or tuple(patch) != (256, 256):
        return {"skipped": "the default package is 4 classes at 256x256; run without --classes/--patch"}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mpcl-gpu-kernels-") as folder:
        package = make_default_package(Path(folder))
        image = (volume, (1.0, 1.0, 10.0))  # thick z slices: the slicing axis is the first array axis
        for mode in ("off", "on"):
            segmenter = Segmenter.from_pretrained(
                package, backend="torch", device=device, batch_size=batch_size, fused_kernels=mode
            )
            seconds, result = _time(
                lambda s=segmenter: s(image, tta=tta, uncertainty=True), torch, device, warmup, repeats
            )
            rows[f"segmenter_fused_{mode}"] = {"median_ms": 1000 * seconds, "labels": result.label_map}
    fused, numpy_path = rows["segmenter_fused_on"], rows["segmenter_fused_off"]
    fused["labels_equal_to_off"] = float((fused.pop("labels") == numpy_path.pop("labels")).mean())
    return rows


def _stage_rows(pipelines, model, volume, affine, torch, device, warmup, repeats) -> dict:
    """The network alone, and preprocessing and head alone (torch eager vs fused), per volume."""
    from mpcl.kernels.triton_head import fused_head
    from mpcl.kernels.triton_preprocess import fused_preprocess

    affine_on_device, prepared = pipelines.stage_inputs(volume, affine)
    out_hw, patch, codes = tuple(volume.shape[1:]), pipelines.patch, pipelines.codes
    raws = [raw for raw, _, _ in prepared]
    batches = [batch for _, batch, _ in prepared]
    logits = [chunk_logits for _, _, chunk_logits in prepared]
    stages = {
        "network": lambda: [model(batch) for batch in batches],
        "eager_preprocess": lambda: [pipelines.eager_preprocess(raw, affine) for raw in raws],
        "fused_preprocess": lambda: [fused_preprocess(raw, affine_on_device, patch) for raw in raws],
        "eager_head": lambda: [pipelines.eager_head(chunk, out_hw) for chunk in logits],
        "fused_head": lambda: [fused_head(chunk, codes, out_hw, uncertainty=True) for chunk in logits],
    }
    timing = (torch, device, warmup, repeats)
    return {name: {"median_ms": 1000 * _time(run, *timing)[0]} for name, run in stages.items()}


def _pipeline_rows(pipelines, names, volume, affine, torch, device, warmup, repeats) -> dict:
    """Each whole pipeline per volume, with its agreement with the first (the numpy path)."""
    rows, reference_labels, reference_entropy = {}, None, None
    for name in names:
        run = getattr(pipelines, name)
        seconds, (labels, entropy) = _time(lambda r=run: r(volume, affine), torch, device, warmup, repeats)
        if reference_labels is None:
            reference_labels, reference_entropy = labels, entropy
        rows[name] = {
            "median_ms": 1000 * seconds,
            "slices_per_s": len(volume) / seconds,
            "labels_equal_to_numpy": float((labels == reference_labels).mean()),
            "entropy_max_abs_diff_to_numpy": float(np.abs(entropy - reference_entropy).max()),
        }
    return rows


def benchmark(args) -> dict:
    import torch
    import triton

    from mpcl.kernels.reference import normalization_affine
    from mpcl.nn.unet import UNet

    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    model = UNet(1, args.classes).to(device).eval()
    patch = (16, 16) if args.smoke else tuple(args.patch)
    flips = TTA_FLIPS if args.tta else ((),)
    pipelines = Pipelines(model, patch, flips, args.batch_size, device)
    names = ["numpy", "eager", "fused"]
    if not args.smoke:
        names += ["fused_graph", "fused_fp16", "fused_fp16_graph"]
    warmup, repeats = (1, 1) if args.smoke else (args.warmup, args.repeats)
    cases = {}
    with torch.inference_mode():
        for case, volume in _synthetic_volumes(args.smoke).items():
            affine = normalization_affine(volume, "minmax")
            timing = (torch, device, warmup, repeats)
            rows = _pipeline_rows(pipelines, names, volume, affine, *timing)
            rows.update(_stage_rows(pipelines, model, volume, affine, *timing))
            if args.segmenter and not args.smoke:
                try:
                    settings = (args.classes, patch, args.batch_size, args.tta)
                    rows.update(_segmenter_rows(volume, *settings, *timing))
                except Exception as error:  # the kernel numbers stay useful if packaging fails
                    rows["segmenter"] = {"error": f"{type(error).__name__}: {error}"}
            cases[case] = {"shape": list(volume.shape), "rows": rows}
    return {
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "settings": {
            "classes": args.classes,
            "patch": list(patch),
            "batch_size": args.batch_size,
            "tta_flips": len(flips),
            "warmup": warmup,
            "repeats": repeats,
            "network": "SSL4MIS U-Net, channels 16-256, random weights, eval mode",
            "note": args.note,
        },
        "results": cases,
    }


def print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"{machine['gpu']} | torch {machine['torch']} | triton {machine['triton']}")
    for case, data in report["results"].items():
        rows = data["rows"]
        eager = rows.get("eager", {}).get("median_ms")
        print(f"\n{case} {data['shape']} (ms per volume)")
        print(f"{'pipeline':<22}{'median ms':>12}{'vs eager':>10}{'labels = numpy':>16}{'entropy diff':>14}")
        for name, row in rows.items():
            if "median_ms" not in row:
                print(f"{name:<22}  {row}")
                continue
            ratio = f"{eager / row['median_ms']:.2f}x" if eager and name in {
                "numpy", "eager", "fused", "fused_graph", "fused_fp16", "fused_fp16_graph"
            } else ""
            equal = row.get("labels_equal_to_numpy", row.get("labels_equal_to_off"))
            diff = row.get("entropy_max_abs_diff_to_numpy")
            print(
                f"{name:<22}{row['median_ms']:>12.2f}{ratio:>10}"
                f"{'' if equal is None else f'{equal:.5f}':>16}{'' if diff is None else f'{diff:.1e}':>14}"
            )


def _write_atomically(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(handle, "w") as stream:
        json.dump(report, stream, indent=2)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--patch", type=int, nargs=2, default=[256, 256])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tta", action="store_true", help="average 4 flips (4x the network work)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-segmenter", dest="segmenter", action="store_false", help="skip Segmenter rows")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. other GPU load)")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/gpu_kernels_<gpu>.json")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1; no JSON")
    args = parser.parse_args(argv)
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as error:
        print(f"this benchmark needs torch with CUDA and triton (pip install 'mpcl[gpu]'): {error}")
        return 2
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs the kernels on the CPU and needs TRITON_INTERPRET=1 in the environment")
            return 2
    elif not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device, so there is nothing to benchmark here (the kernels are "
              "tested on the CPU by tests/test_kernels.py under Triton's interpreter)")
        return 2
    report = benchmark(args)
    print_table(report)
    if not args.smoke:
        gpu = re.sub(r"[^a-z0-9]+", "_", report["machine"]["gpu"].lower()).strip("_")
        output = args.output or RESULTS / f"gpu_kernels_{gpu}.json"
        _write_atomically(report, output)
        print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
