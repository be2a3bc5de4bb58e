"""What machine a benchmark ran on, and how its JSON is written: the VMs these benchmarks run on change
between sessions (AVX2-only and AVX-512 machines so far), and a latency means little without them."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_description() -> dict[str, object]:
    """The CPU model name and its vector/bf16 features: AVX-512F (which ONNX Runtime's kernels use when
    present) and native bf16 (AVX512_BF16 or AMX), which decides whether bf16 training is fast."""
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
            if model and flags:
                break
    except OSError:
        pass
    return {
        "processor": model,
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }


def machine_record(threads: int, note: str, with_torch: bool = False) -> dict[str, object]:
    """The "machine" block of every benchmark JSON: platform, CPU, threads, runtime versions, the note."""
    import onnxruntime

    record: dict[str, object] = {
        "platform": platform.platform(),
        **cpu_description(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
    }
    if with_torch:
        try:
            import torch

            record["torch"] = torch.__version__
        except ImportError:
            record["torch"] = None
    record["note"] = note
    return record


def write_report(report: dict, output: Path) -> None:
    """Write a benchmark's JSON (creating its folder) and say where."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {output}")
