"""Shared helpers of the benchmark scripts: the machine, timing, Markdown tables, models.

Not a test module (pytest does not collect benchmarks/). Every script is seeded,
prints a Markdown table, writes it to benchmarks/results/NAME.md and accepts
``--quick`` for a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (CI smoke)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per entry (>= 7)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / PyTorch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    return args


def torch_or_none(threads: int) -> Any:
    """PyTorch with ``threads`` intra-op threads, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return list(threadpool_info())


def limit_blas(threads: int) -> Any:
    """Context manager pinning NumPy's BLAS to ``threads`` (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _version(package: str) -> str:
    """An installed package's version, read without importing it (n/a if not installed)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "n/a (not installed)"


def machine_lines(threads: int) -> list[str]:
    """Markdown bullet lines describing the machine and libraries (none of them imported)."""
    from _contenders import cpu_name

    lines = [
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; {threads} threads used",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"PyTorch {_version('torch')}, onnxruntime {_version('onnxruntime')}, "
        f"threadpoolctl {_version('threadpoolctl')}",
    ]
    for info in blas_info():
        if info.get("user_api") == "blas":
            lines.append(
                f"- BLAS: {info.get('internal_api')} {info.get('version')}, kernel "
                f"{info.get('architecture')}, {info.get('num_threads')} threads "
                f"({Path(str(info.get('filepath'))).name})"
            )
    if not blas_info():
        lines.append("- BLAS: unknown (pip install threadpoolctl to record it)")
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS"):
        lines.append(f"- {name}={os.environ[name]}" if name in os.environ else f"- {name} unset")
    try:
        load = os.getloadavg()
        lines.append(f"- load average at start: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    except OSError:
        pass
    lines.append(f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
    lines.append(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return lines


#: Pause before each timed series: OpenBLAS's and PyTorch's OpenMP worker threads keep
#: spinning for a while after a call, and would steal the cores from the next series.
SETTLE_SECONDS = 0.3


def measure(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after a pause and ``warmup`` untimed calls."""
    if repeats > 1:
        time.sleep(SETTLE_SECONDS)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def stats(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) in milliseconds."""
    return (1e3 * statistics.median(times), 1e3 * min(times), 1e3 * max(times))


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, body: str, threads: int, *, write: bool = True) -> str:
    text = "\n".join([f"# {title}", "", *machine_lines(threads), "", body, ""])
    print(text)
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.md").write_text(text)
        print(f"(written to {RESULTS / (name + '.md')})")
    return text


# ----------------------------------------------------------------- models

A0_WIDTHS = (
    48,
    48,
    96,
    192,
    1280,
)  # FACTS.md: min(64, 64a), 64a, 128a, 256a, 512b with (0.75, 2.5)
A0_DEPTHS = (1, 2, 4, 14, 1)  # stem, then stages [2, 4, 14, 1]


def a0_layer_specs(widths: Sequence[int] = A0_WIDTHS) -> list[tuple[int, int, int, int]]:
    """(C_in, C_out, stride, groups) of RepVGG-A0's 22 deploy layers, from the published config."""
    specs = []
    channels = 3
    for width, depth in zip(widths, A0_DEPTHS, strict=True):
        for i in range(depth):
            specs.append((channels, width, 2 if i == 0 else 1, 1))
            channels = width
    return specs


def random_deploy_layers(
    specs: Sequence[tuple[int, int, int, int]], *, seed: int, dtype: Any = np.float32
) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """He-normal kernels and small biases for the given layer specs."""
    rng = np.random.default_rng(seed)
    layers = []
    for c_in, c_out, stride, groups in specs:
        fan_in = 9 * c_in // groups
        kernel = rng.standard_normal((c_out, c_in // groups, 3, 3)) * np.sqrt(2.0 / fan_in)
        bias = 0.1 * rng.standard_normal(c_out)
        layers.append((kernel.astype(dtype), bias.astype(dtype), stride, groups))
    return layers


def repvgg_module() -> Any:
    """The reparam package (it has RepVGG and ARCHITECTURES)."""
    import reparam

    return reparam


def a0_deploy_layers(*, seed: int, widths: Sequence[int] = A0_WIDTHS) -> list[Any]:
    """RepVGG-A0's deploy layers: from reparam.RepVGG if available, else built here."""
    repvgg = repvgg_module()
    if repvgg is not None and tuple(widths) == A0_WIDTHS:
        model = repvgg.RepVGG.create("RepVGG-A0", num_classes=1000, seed=seed)
        return [(b.kernel, b.bias, b.stride, b.groups) for _, b in model.reparameterize().blocks]
    return random_deploy_layers(a0_layer_specs(widths), seed=seed)


def torch_deploy_model(torch: Any, layers: Sequence[Any], head: tuple[Any, Any] | None) -> Any:
    """A PyTorch deploy RepVGG (conv3x3 + bias, ReLU, ..., pool, linear) from NumPy weights."""
    nn = torch.nn
    modules: list[Any] = []
    for kernel, bias, stride, groups in layers:
        conv = nn.Conv2d(
            kernel.shape[1] * groups, kernel.shape[0], 3, stride=stride, padding=1, groups=groups
        )
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(np.asarray(kernel)))
            conv.bias.copy_(torch.tensor(np.asarray(bias)))
        modules += [conv, nn.ReLU(inplace=True)]
    modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if head is not None:
        weight, bias = head
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(np.asarray(weight)))
            linear.bias.copy_(torch.tensor(np.asarray(bias)))
        modules.append(linear)
    return nn.Sequential(*modules).eval()


def torch_best_time(
    torch: Any, fn: Callable[[Any], Any], x: np.ndarray, repeats: int, module: Any = None
) -> tuple[list[float], str]:
    """Times of ``fn`` in NCHW and in channels_last; the faster layout's times and its name."""
    best: tuple[list[float], str] | None = None
    for layout in ("NCHW", "channels_last"):
        tensor = torch.from_numpy(np.ascontiguousarray(x))
        if layout == "channels_last":
            tensor = tensor.contiguous(memory_format=torch.channels_last)
            if module is not None:
                module.to(memory_format=torch.channels_last)
        elif module is not None:
            module.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            times = measure(lambda t=tensor: fn(t), repeats)
        if best is None or statistics.median(times) < statistics.median(best[0]):
            best = (times, layout)
    if best is None:
        raise RuntimeError("no layout was timed")
    return best
