"""Where ONNX Runtime's CPU time goes, against this machine's measured compute floor (issue 5).

For one package's fp32 graph on a batch of slices (default: a randomly initialised SSL4MIS U-Net at
256x256, 10 slices, the issue's reference case) it measures, in one run:

- the machine's fp32 peak: ``fma_peak.c`` (independent FMA chains, AVX2 and, where the CPU has it,
  AVX-512, one thread per core; the faster counts), built
  with the C compiler if there is one, and numpy's sgemm on 2048x2048 (the best a tuned GEMM reaches);
- the network's useful FLOPs (Conv and ConvTranspose, from the graph's shapes), so the "floor" is
  FLOPs / peak for both peaks;
- the session's latency (median and min over repeats; the session settings are the runtime's own,
  ``onnxruntime_backend.session_options``), and ONNX Runtime's own profile (each node's median over the
  runs, summed per operator type), with the convolutions' achieved GFLOP/s;
- where the optional extra is installed, the OpenVINO backend's latency on the same batch (f32, and bf16
  on CPUs with native bf16), the fp32 one against the same floor; and, on AVX-512 CPUs, its fp32
  latency with oneDNN held to AVX2 (``openvino_isa.py``) against the AVX2 FMA floor of the same run:
  the issue states its floor for two AVX2 cores, and those are the kernels such a machine runs.

    python benchmarks/ort_profile.py                       # random 256x256 U-Net, 10 slices
    python benchmarks/ort_profile.py --package runs/x/model --batch 10 --output ...
    python benchmarks/ort_profile.py --package runs/x/student --precision int8 --batch 9 --output ...

Run it on an otherwise idle machine; it prints a table and appends the run to the setting's JSON
(``--output``, default benchmarks/results/ort_profile_cpu.json): to repeat a setting, run it again with
the same ``--output`` (``--tag`` labels a run).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_run, machine_record  # noqa: E402  (benchmarks/ is not a package)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# ONNX Runtime's kernels for the graph's convolutions, by the FLOP family they compute
CONV_FAMILY = {"Conv": "Conv", "FusedConv": "Conv", "QLinearConv": "Conv", "ConvTranspose": "ConvTranspose"}


def fma_peaks(threads: int, scratch: Path) -> tuple[dict[str, float] | None, str]:
    """Summed FMA throughput of ``threads`` threads per instruction set ("AVX2", and "AVX512" where the CPU
    has AVX-512F), or None and why; the floor uses the faster, which the runtimes' kernels use here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler to build benchmarks/fma_peak.c"
    binary, source = scratch / "fma_peak", REPO / "benchmarks" / "fma_peak.c"
    build = subprocess.run(
        [compiler, "-O2", "-pthread", str(source), "-o", str(binary)], capture_output=True, text=True
    )
    if build.returncode != 0:
        return None, f"fma_peak.c did not build: {build.stderr.strip()[:200]}"

    def one_run() -> tuple[float, float]:  # prints "<threads> <AVX2 GFLOP/s> <AVX-512 GFLOP/s or 0>"
        done = subprocess.run([str(binary), str(threads)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError("fma_peak needs AVX2 and FMA")
        fields = done.stdout.split()
        return float(fields[1]), float(fields[2])

    try:
        runs = [one_run() for _ in range(3)]
    except RuntimeError as error:
        return None, str(error)
    avx2, avx512 = max(r[0] for r in runs), max(r[1] for r in runs)
    isa = (
        f"AVX-512 (AVX2 {avx2:.1f})"
        if avx512 > avx2
        else "AVX2" + (f" (AVX-512 {avx512:.1f})" if avx512 else ", no AVX-512F")
    )
    peaks = {"AVX2": avx2, **({"AVX512": avx512} if avx512 else {})}
    return peaks, f"fma_peak.c, {threads} threads, best of 3, {isa}"


def sgemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """numpy's (BLAS) single-precision GEMM rate: what a tuned dense kernel reaches here."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((size, size), dtype=np.float32) for _ in range(2))
    a @ b
    best = min(time_call(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def time_call(call) -> float:
    """Wall-clock seconds of one ``call()``."""
    clock = time.perf_counter()
    call()
    return time.perf_counter() - clock


def conv_flops_by_node(onnx_path: Path, batch: int, height: int, width: int) -> dict[str, tuple[str, float]]:
    """Each Conv / ConvTranspose node's multiply-add FLOPs (2 per MAC) at this size: name -> (op, FLOPs)."""
    import onnx

    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (batch, dims[1].dim_value, height, width), strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    flops: dict[str, tuple[str, float]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        weight = weights[node.input[1]]
        kernel = int(np.prod(weight[2:]))
        if node.op_type == "Conv":  # weight (out, in/groups, kh, kw); one MAC per output x in/groups x k
            count = 2 * np.prod(shapes[node.output[0]]) * weight[1] * kernel
        else:  # weight (in, out/groups, kh, kw); every input pixel scatters into out/groups x k outputs
            count = 2 * np.prod(shapes[node.input[0]]) * weight[1] * kernel
        flops[node.name or f"{node.op_type}_{index}"] = (node.op_type, float(count))
    return flops


def flops_per_op(node_flops: dict[str, tuple[str, float]]) -> dict[str, float]:
    """``conv_flops_by_node``'s counts summed per op type (Conv, ConvTranspose)."""
    totals: dict[str, float] = collections.Counter()
    for op_type, count in node_flops.values():
        totals[op_type] += count
    return dict(totals)


def conv_flops(onnx_path: Path, batch: int, height: int, width: int) -> dict[str, float]:
    """Multiply-add FLOPs of every Conv / ConvTranspose at this input size, summed per op type."""
    return flops_per_op(conv_flops_by_node(onnx_path, batch, height, width))


def conv_layers(
    node_seconds: dict[tuple[str, str, str], float], node_flops: dict[str, tuple[str, float]], peak: float
) -> list:
    """OpenVINO's convolution nodes matched to the ONNX graph's by name (OpenVINO keeps the ONNX name and
    appends "/WithoutBiases"; its transposed convolutions are renamed, so they are left out), each with
    its GFLOP/s and the milliseconds it spends above the FMA floor, the most first: where a network's time
    above the floor goes, layer by layer."""
    layers = []
    for (name, node_type, _kernel), seconds in node_seconds.items():
        if node_type != "Convolution":  # e.g. the layout reorder OpenVINO names after the head's conv
            continue
        onnx_name = next((o for o in node_flops if name == o or name.startswith(o + "/")), None)
        if onnx_name is None:
            continue
        count = node_flops[onnx_name][1]
        layers.append(
            {
                "node": onnx_name,
                "ms": 1e3 * seconds,
                "gflop": count / 1e9,
                "gflops_per_s": count / seconds / 1e9,
                "ms_above_floor": 1e3 * (seconds - count / (peak * 1e9)),
            }
        )
    return sorted(layers, key=lambda layer: -layer["ms_above_floor"])


def profile_session(onnx_path: Path, batch: np.ndarray, threads: int, repeats: int, scratch: Path) -> dict:
    """Latency of the runtime's session, then ONNX Runtime's per-node profile summed per op type."""
    import onnxruntime

    from mpcl.backends.onnxruntime_backend import session_options

    def session(profile: bool):
        options = session_options(threads)
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(scratch / "ort_profile")
        return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    plain = session(False)
    feed = {plain.get_inputs()[0].name: batch}

    def run_once() -> None:
        plain.run(None, feed)

    run_once()
    latencies = [time_call(run_once) for _ in range(repeats)]

    profiled = session(True)
    for _ in range(repeats + 1):
        profiled.run(None, feed)
    events = json.loads(Path(profiled.end_profiling()).read_text())
    durations: dict[tuple[str, str], list[float]] = collections.defaultdict(list)  # (op, node) -> seconds
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            durations[event["args"]["op_name"], event["name"]].append(event["dur"] / 1e6)
    # each node's median over the runs, so the warm-up run does not count
    per_op: dict[str, float] = collections.Counter()
    nodes: dict[str, int] = collections.Counter()
    for (op, _), seconds in durations.items():
        per_op[op] += statistics.median(seconds)
        nodes[op] += 1
    return {
        "median_s": statistics.median(latencies),
        "min_s": min(latencies),
        "profile_s_per_run": dict(per_op.most_common()),
        "nodes_per_run": dict(nodes),
    }


def openvino_latencies(package, batch: np.ndarray, threads: int, repeats: int) -> dict:
    """The OpenVINO backend's median latency on the same batch, f32 and (on native-bf16 CPUs) bf16, or
    why it could not run: the other CPU runtime mpcl ships, measured against the same floor."""
    from mpcl.backends import module_available
    from mpcl.backends.openvino_backend import NOT_INSTALLED, OpenVinoBackend, cpu_has_bf16

    if not module_available("openvino"):
        return {"skipped": NOT_INSTALLED}

    measured = {}
    for precision in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        run = functools.partial(OpenVinoBackend(package, "cpu", threads, precision).run, batch)
        run()
        latencies = [time_call(run) for _ in range(repeats)]
        measured[precision] = {"median_s": statistics.median(latencies), "min_s": min(latencies)}
    measured["fp32"]["profile_s_per_run"], measured["fp32"]["node_s_per_run"] = openvino_profile(
        package, batch, threads, repeats
    )
    return measured


def openvino_isa_limited(
    package, batch: np.ndarray, threads: int, repeats: int, scratch: Path, isa: str
) -> dict:
    """The OpenVINO backend's fp32 latency with oneDNN held to ``isa`` (a process of its own, see
    openvino_isa.py), and whether its convolutions really ran that ISA's kernels."""
    batch_file = scratch / "batch.npy"
    np.save(batch_file, batch)
    command = [
        sys.executable, str(REPO / "benchmarks" / "openvino_isa.py"), "--package", str(package.root),
        "--batch", str(batch_file), "--isa", isa, "--threads", str(threads), "--repeats", str(repeats),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"skipped": f"openvino_isa.py failed: {last_line[:200]}"}
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    wider = [kernel for kernel in measured["conv_kernels"] if "avx512" in kernel or "amx" in kernel]
    measured["limit_honoured"] = not wider
    return measured


def openvino_profile(package, batch: np.ndarray, threads: int, repeats: int) -> tuple[dict, dict]:
    """OpenVINO's own per-node timings of the fp32 graph (the backend's settings plus PERF_COUNT), median
    over the runs: summed per node type, and per (node, type, kernel); profiling adds a little to each."""
    import openvino

    from mpcl.backends.openvino_backend import compile_config

    config = {**compile_config("fp32", threads), "PERF_COUNT": True}
    compiled = openvino.Core().compile_model(str(package.path_of("onnx")), "CPU", config)
    request = compiled.create_infer_request()
    request.infer({0: batch})
    per_run, per_node = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(repeats):
        request.infer({0: batch})
        totals = collections.Counter()
        for node in request.get_profiling_info():
            if node.status == node.Status.EXECUTED:
                totals[node.node_type] += node.real_time.total_seconds()
                key = (node.node_name, node.node_type, node.exec_type)
                per_node[key].append(node.real_time.total_seconds())
        for node_type, seconds in totals.items():
            per_run[node_type].append(seconds)
    medians = {node_type: statistics.median(values) for node_type, values in per_run.items()}
    by_node = {key: statistics.median(values) for key, values in per_node.items()}
    return dict(sorted(medians.items(), key=lambda item: -item[1])), by_node


def _package_onnx(args, scratch: Path):
    """The package, its fp32 graph (FLOPs), the graph to profile (fp32 or int8), the patch size, a label."""
    from mpcl.model_package import load_model_package

    if args.package is None:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from inference import make_default_package

        folder = make_default_package(scratch)
        label = "random SSL4MIS U-Net (16-32-64-128-256), 256x256"
    else:
        folder, label = args.package, f"package {args.package}"
    package = load_model_package(folder)
    profiled = package.path_of("onnx" if args.precision == "fp32" else "onnx_int8")
    return package, package.path_of("onnx"), profiled, tuple(package.patch_size), f"{label}, {args.precision}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--package", type=Path, help="a model package with an fp32 ONNX file")
    parser.add_argument(
        "--precision", choices=("fp32", "int8"), default="fp32", help="int8: the package's QDQ graph"
    )
    parser.add_argument("--batch", type=int, default=10, help="slices per run (an ACDC volume has ~10)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "ort_profile_cpu.json",
        help="the setting's results file; each run is appended to it",
    )
    parser.add_argument(
        "--tag", default="", help="a label for this run, stored with it (e.g. 'after the resize change')"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mpcl-ort-profile-") as scratch:
        scratch = Path(scratch)
        if args.precision == "int8" and args.package is None:
            parser.error("--precision int8 needs --package (a package with an int8 graph)")
        package, onnx_path, profiled_path, patch, label = _package_onnx(args, scratch)
        fma_by_isa, fma_how = fma_peaks(args.threads, scratch)
        fma = max(fma_by_isa.values()) if fma_by_isa else None
        sgemm = sgemm_gflops()
        node_flops = conv_flops_by_node(onnx_path, args.batch, *patch)
        flops = flops_per_op(node_flops)
        batch = np.random.default_rng(0).random((args.batch, 1, *patch), dtype=np.float32)
        measured = profile_session(profiled_path, batch, args.threads, args.repeats, scratch)
        openvino = openvino_latencies(package, batch, args.threads, args.repeats)
        if "fp32" in openvino and fma_by_isa and "AVX512" in fma_by_isa:  # the floor is for AVX2
            openvino["fp32_avx2"] = openvino_isa_limited(
                package, batch, args.threads, args.repeats, scratch, "AVX2"
            )

    total_gflop = sum(flops.values()) / 1e9
    family_seconds = collections.Counter()  # Conv / ConvTranspose time, whatever the precision's op names
    for op, seconds in measured["profile_s_per_run"].items():
        if op in CONV_FAMILY:
            family_seconds[CONV_FAMILY[op]] += seconds
    conv_seconds = sum(family_seconds.values())
    profiled_seconds = sum(measured["profile_s_per_run"].values())
    floors = {name: total_gflop / peak for name, peak in (("fma_peak", fma), ("sgemm", sgemm)) if peak}
    report = {
        "machine": machine_record(args.threads, args.note),
        "settings": {"model": label, "batch": args.batch, "patch": list(patch), "repeats": args.repeats},
        "peak_gflops": {"fma": fma, "fma_how": fma_how, "sgemm_2048": sgemm},
        "network_gflop": {op: value / 1e9 for op, value in flops.items()},
        "latency_s": {"median": measured["median_s"], "min": measured["min_s"]},
        "floor_s": floors,
        "latency_over_floor": {name: measured["median_s"] / floor for name, floor in floors.items()},
        "profile_s_per_run": measured["profile_s_per_run"],
        "nodes_per_run": measured["nodes_per_run"],
        "conv_gflops_achieved": total_gflop / conv_seconds if conv_seconds else None,
        "gflops_by_op": {
            op: value / 1e9 / family_seconds[op] for op, value in flops.items() if family_seconds.get(op)
        },
        "non_conv_share_of_profile": 1 - conv_seconds / profiled_seconds if profiled_seconds else None,
        "openvino": openvino,
    }
    if "fp32" in openvino and "fma_peak" in floors:  # bf16 is not bound by the fp32 floor: no ratio
        openvino["fp32"]["over_fma_floor"] = openvino["fp32"]["median_s"] / floors["fma_peak"]
        openvino["fp32"]["conv_layers"] = conv_layers(openvino["fp32"]["node_s_per_run"], node_flops, fma)
    openvino.get("fp32", {}).pop("node_s_per_run", None)  # the layer table above is what is worth keeping
    if openvino.get("fp32_avx2", {}).get("limit_honoured"):
        avx2_floor = total_gflop / fma_by_isa["AVX2"]
        openvino["fp32_avx2"]["over_avx2_fma_floor"] = openvino["fp32_avx2"]["median_s"] / avx2_floor
    for line in _table(report):
        print(line)
    append_run(report, args.output, "ort_profile", args.tag)


def _table(report: dict) -> list[str]:
    peak, latency = report["peak_gflops"], report["latency_s"]
    lines = [
        f"model: {report['settings']['model']}, batch {report['settings']['batch']}",
        f"peak fp32: FMA {peak['fma'] or float('nan'):.1f} GFLOP/s ({peak['fma_how']}), "
        f"sgemm {peak['sgemm_2048']:.1f} GFLOP/s",
        f"network: {sum(report['network_gflop'].values()):.2f} GFLOP; "
        f"latency median {latency['median']:.3f} s (min {latency['min']:.3f})",
    ]
    for name, floor in report["floor_s"].items():
        lines.append(
            f"floor at {name} peak: {floor:.3f} s -> latency / floor {report['latency_over_floor'][name]:.2f}"
        )
    lines.append(f"{'op type':16} {'ms/run':>8} {'share':>6} {'nodes':>5}")
    total = sum(report["profile_s_per_run"].values())
    for op, seconds in report["profile_s_per_run"].items():
        lines.append(
            f"{op:16} {1e3 * seconds:8.1f} {100 * seconds / total:5.1f}% {report['nodes_per_run'][op]:5d}"
        )
    if report["conv_gflops_achieved"]:
        by_op = ", ".join(f"{op} {rate:.1f}" for op, rate in report["gflops_by_op"].items())
        lines.append(
            f"convolutions achieve {report['conv_gflops_achieved']:.1f} GFLOP/s in the profile ({by_op})"
        )
    for precision, result in report["openvino"].items():
        if precision == "skipped":
            lines.append(f"openvino: skipped ({result})")
            continue
        if "skipped" in result:
            lines.append(f"openvino {precision}: skipped ({result['skipped']})")
            continue
        kernels = ", ".join(result.get("conv_kernels", []))
        if "over_avx2_fma_floor" in result:
            ratio = f", {result['over_avx2_fma_floor']:.2f}x the AVX2 FMA floor ({kernels})"
        elif "limit_honoured" in result:
            ratio = f", AVX2 limit not honoured: convolutions ran {kernels}"
        elif "over_fma_floor" in result:
            ratio = f", {result['over_fma_floor']:.2f}x the fp32 FMA floor"
        else:
            ratio = ""
        lines.append(f"openvino {precision}: median {result['median_s']:.3f} s{ratio}")
        for node_type, seconds in result.get("profile_s_per_run", {}).items():
            lines.append(f"  {node_type:24} {1e3 * seconds:8.1f} ms/run")
        if result.get("conv_layers"):
            lines.append("  convolutions spending the most above the FMA floor:")
        for layer in result.get("conv_layers", [])[:6]:
            lines.append(
                f"    {layer['node'][:44]:44} {layer['ms']:6.2f} ms {layer['gflops_per_s']:6.0f} GFLOP/s "
                f"+{layer['ms_above_floor']:.2f} ms"
            )
    return lines


if __name__ == "__main__":
    main()
