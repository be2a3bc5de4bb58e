"""What CPU a benchmark ran on: the VMs these benchmarks run on change between sessions (AVX2-only and
AVX-512 machines so far), and a latency means little without it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_description() -> dict[str, object]:
    """The CPU model name and whether it has AVX-512F (which ONNX Runtime's kernels use when present)."""
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
    return {"processor": model, "avx512f": "avx512f" in flags}
