"""Each contender in its own fresh process, interleaved: the fast path, PyTorch, onnxruntime.

Mixing libraries in one process distorts timings (an idle OpenBLAS worker or
PyTorch's OpenMP workers spin and steal the cores from whoever runs next), so
every measurement here is one child process running one library alone:

    python benchmarks/_contenders.py CONTENDER BATCH --arch RepVGG-A0 --repeats 10

prints one JSON line ``{"times": [...], "load_seconds": ..., "ru_maxrss": ...}``
(the peak resident memory of the child, ``VmHWM``).
The parent scripts (bench_model.py, bench_memory.py) start the children
round-robin (A, B, C, A, B, C, ...) and report medians and spreads.

Contenders:

* ``fast``: ``model(x)`` of the reparam deploy model (``reparam.engine``);
* ``fast1``: the same with one thread (``threads=1`` stack, BLAS left as is);
* ``torch``: a PyTorch deploy model (conv3x3 + bias, ReLU, ..., pool, linear) built
  from the same NumPy weights, no_grad, NCHW or channels_last (``--layout``);
* ``ort``: onnxruntime on ``reparam export``'s graph (``reparam.export.to_onnx``),
  ``--threads`` intra-op threads, sequential execution, all graph optimizations;
* ``deploy`` / ``train``: the NumPy reference forms (``model(x, fast=False)``; the
  train form).

With ``--checkpoint FILE`` the child loads the deploy model from a reparam
checkpoint (``.npz``) or, for ``ort``, the ``.onnx`` file next to it, as a user
would: that is what the peak-memory comparison measures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CONTENDERS = ("fast", "torch", "ort")
#: Pause before a timed series (other libraries' worker threads of a previous process
#: on the shared machine, the first-touch page faults of this one, settle).
SETTLE_SECONDS = 0.3


#: ``--arch tiny``: a narrow RepVGG for ``--quick`` smoke runs (same code paths, 32x32).
TINY = {"widths": (8, 8, 16, 24, 32), "depths": (1, 2, 2, 2, 1)}


def architecture(arch: str) -> Any:
    """A published architecture's name, or the tiny custom one."""
    if arch == "tiny":
        import reparam

        return reparam.Architecture(**TINY)
    return arch


def _deploy_model(arch: str, seed: int, checkpoint: str | None) -> Any:
    if checkpoint is not None:
        from reparam.checkpoints import load

        return load(checkpoint)
    return _train_model(arch, seed).reparameterize()


def _train_model(arch: str, seed: int) -> Any:
    import reparam

    return reparam.RepVGG.create(architecture(arch), num_classes=1000, seed=seed)


def _torch_forward(model: Any, threads: int, layout: str) -> Any:
    import torch

    torch.set_num_threads(threads)
    nn = torch.nn
    modules: list[Any] = []
    for _, block in model.blocks:
        kernel, bias = block.kernel, block.bias
        conv = nn.Conv2d(
            kernel.shape[1] * block.groups,
            kernel.shape[0],
            3,
            stride=block.stride,
            padding=1,
            groups=block.groups,
            device="meta",
        )
        # writeable copies of the loaded arrays become the parameters; the model is dropped
        # once the module is built, so the weights end up held once
        conv.weight = nn.Parameter(torch.from_numpy(np.array(kernel)), requires_grad=False)
        conv.bias = nn.Parameter(torch.from_numpy(np.array(bias)), requires_grad=False)
        modules += [conv, nn.ReLU(inplace=True)]
    linear = nn.Linear(model.head.weight.shape[1], model.head.weight.shape[0], device="meta")
    linear.weight = nn.Parameter(torch.from_numpy(np.array(model.head.weight)), False)
    linear.bias = nn.Parameter(torch.from_numpy(np.array(model.head.bias)), False)
    module = nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()
    del model
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    module.to(memory_format=memory_format)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            tensor = torch.from_numpy(x).contiguous(memory_format=memory_format)
            return module(tensor).numpy()

    return forward


def _ort_forward(model: Any, threads: int, onnx_path: str | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if onnx_path is None:
        from reparam.export.onnx import to_onnx

        source: Any = to_onnx(model).SerializeToString()
    else:
        source = onnx_path
    del model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    del source

    def forward(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"input": x})[0]

    return forward


def peak_rss() -> int:
    """Bytes: the process' resident high-water mark since it started (``VmHWM``).

    Read from /proc/self/status where there is one: ``ru_maxrss`` is carried
    over from the parent across fork and exec on Linux, so a child of a large
    parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> None:
    """Build one contender, warm it up, time ``repeats`` calls; print one JSON line."""
    started = time.perf_counter()
    size = args.size
    model = None
    if args.contender != "ort" or args.checkpoint is None:
        if args.contender == "train":
            model = _train_model(args.arch, args.seed)
        else:
            model = _deploy_model(args.arch, args.seed, args.checkpoint)
    if args.contender in ("fast", "fast1", "fast2"):
        if args.contender != "fast":
            from reparam.engine import DeployStack

            threads = int(args.contender[-1])
            stack = DeployStack([block for _, block in model.blocks], threads=threads)
            head = model.head

            def forward(x: np.ndarray) -> np.ndarray:
                with stack.blas_scope():  # the head too, as RepVGG.__call__ does
                    return head(stack(x, pool=True))
        else:
            forward = model
    elif args.contender == "torch":
        forward = _torch_forward(model, args.threads, args.layout)
        model = None
    elif args.contender == "ort":
        onnx_path = (
            None if args.checkpoint is None else str(Path(args.checkpoint).with_suffix(".onnx"))
        )
        forward = _ort_forward(model, args.threads, onnx_path)
        model = None
    elif args.contender == "deploy":

        def forward(x: np.ndarray) -> np.ndarray:
            return model(x, fast=False)
    elif args.contender == "train":
        forward = model
    else:
        raise SystemExit(f"unknown contender {args.contender!r}")
    loaded = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, 3, size, size)).astype(np.float32)
    out = forward(x)
    time.sleep(SETTLE_SECONDS)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - start)
    profile = None
    stack = getattr(model, "_fast_stack", None) if args.contender == "fast" else None
    if args.profile and stack is not None:
        runs = [stack.profile(x) for _ in range(3)]
        profile = [
            [name, 1e3 * statistics.median(run[i][1] for run in runs)]
            for i, (name, _) in enumerate(runs[0])
        ]
    record = {
        "profile": profile,
        "times": times,
        "load_seconds": loaded,
        "ru_maxrss": peak_rss(),
        "checksum": float(np.asarray(out, dtype=np.float64).sum()),
        "logits": np.asarray(out, dtype=np.float64)[0, :8].tolist(),
    }
    print(json.dumps(record))


def available(contender: str) -> bool:
    """Whether the library a contender needs is installed (checked without importing it)."""
    import importlib.util

    module = {"torch": "torch", "ort": "onnxruntime"}.get(contender)
    if module is None:
        return True
    if importlib.util.find_spec(module) is None:
        return False
    return contender != "ort" or importlib.util.find_spec("onnx") is not None


def cpu_name() -> str:
    """The CPU's model name, family and model numbers, from /proc/cpuinfo where there is one."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = fields.get("flags", "").split()
    extensions = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
    if extensions:
        name += ", " + " ".join(extensions)
    return name


def run_child(
    contender: str,
    batch: int,
    *,
    arch: str = "RepVGG-A0",
    size: int = 224,
    repeats: int = 10,
    threads: int = 2,
    seed: int = 0,
    layout: str = "NCHW",
    checkpoint: str | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Run one contender in a fresh process; its JSON record (``{"na": True}`` on failure)."""
    command = [
        sys.executable,
        str(HERE / "_contenders.py"),
        contender,
        str(batch),
        "--arch",
        arch,
        "--size",
        str(size),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
        "--seed",
        str(seed),
        "--layout",
        layout,
    ]
    if checkpoint is not None:
        command += ["--checkpoint", checkpoint]
    if profile:
        command.append("--profile")
    env = dict(os.environ)
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # they slow current NumPy builds
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"{contender} batch {batch}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"na": True}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def interleaved(
    contenders: list[str], batch: int, rounds: int, **kwargs: Any
) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` rounds of one fresh process per contender, in turn: A, B, C, A, B, C, ..."""
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name in contenders:
            records[name].append(run_child(name, batch, **kwargs))
    return records


def medians(records: list[dict[str, Any]]) -> list[float]:
    """Per process, the median of its timed calls (ms); failed processes are skipped."""
    return [1e3 * statistics.median(r["times"]) for r in records if not r.get("na")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contender")
    parser.add_argument("batch", type=int)
    parser.add_argument("--arch", default="RepVGG-A0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="NCHW", choices=("NCHW", "channels_last"))
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--profile", action="store_true", help="fast: also time each layer")
    child(parser.parse_args())


if __name__ == "__main__":
    main()
