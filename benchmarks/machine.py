"""What machine a benchmark ran on, and how its runs are appended to its one results file: the VMs these
benchmarks run on change between sessions (AVX2-only and AVX-512 machines so far), and a latency means
little without them."""

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


def append_run(report: dict, output: Path, benchmark: str, tag: str = "") -> dict:
    """Append ``report`` as one run to ``output``, the one results file of its benchmark and setting.

    The file holds ``{"benchmark", "setting", "runs": [...]}``; each run is a report with its ``repeat``
    number (1, 2, ... in the order the runs were appended) and, if given, a ``tag``. A file from before this
    layout (one bare report) becomes run 1. The whole file is written to a temporary and renamed, so an
    interrupted write leaves the previous runs intact. Repeats go into the same file: name the file after the
    setting, not the repeat. Returns what was written.
    """
    from mpcl.io import write_atomically

    output = Path(output)
    record = {"benchmark": benchmark, "setting": output.stem, "runs": []}
    if output.exists():
        existing = json.loads(output.read_text())
        if isinstance(existing, dict) and isinstance(existing.get("runs"), list):
            record.update(existing)  # keeps the file's own benchmark and setting names
        else:  # one report written before runs were appended: it is the first run
            record["runs"] = [{"repeat": 1, **existing}]
    repeat = 1 + max((run.get("repeat", 0) for run in record["runs"]), default=0)
    record["runs"].append({"repeat": repeat, **({"tag": tag} if tag else {}), **report})
    text = json.dumps(record, indent=2) + "\n"
    write_atomically(output, lambda temporary: temporary.write_text(text))
    print(f"appended run {repeat} to {output}")
    return record
