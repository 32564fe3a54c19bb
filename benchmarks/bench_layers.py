"""Per-layer timing: RepVGG-A0's deploy conv layers, NumPy fast path vs PyTorch vs matmul.

For every distinct deploy layer shape of RepVGG-A0 at 224x224 (batch 1 and 8)
this times each fast-path algorithm on the layers of that shape inside a whole
A0 stack (bias and ReLU included, ``DeployStack.profile``, as ``model(x)`` runs
them), PyTorch's ``conv2d`` + ReLU (best of NCHW
and channels_last, no_grad) and onnxruntime's Conv + Relu (a one-layer graph,
2 intra-op threads, all optimizations), each library in its own process (mixing
libraries in one process distorts timings), and NumPy's own ``matmul`` on the layer's im2col
GEMM shape (M = N*H_out*W_out, K = 9*C_in/groups, N = C_out). GFLOP/s count a
direct convolution's 2 * multiply-adds, whatever the algorithm does. The
float32 error of each algorithm is the largest |fast - reference| over the
largest |reference| (reference: reparam.conv2d in float64), at batch 1.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_layers.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    a0_deploy_layers,
    fmt,
    limit_blas,
    measure,
    parse_args,
    stats,
    table,
    torch_best_time,
    torch_or_none,
    write_result,
)
from _contenders import available

from reparam import conv2d
from reparam.engine import ALGORITHMS, DeployStack
from reparam.engine.workers import one_blas_thread

LABELS = {"im2col": "im2col", "winograd2": "F(2,3)", "winograd4": "F(4,3)"}


def library_child(library: str, specs: list, repeats: int, threads: int, seed: int) -> dict:
    """In a child process: median ms of conv + ReLU per (layer, batch) in ``library``."""
    rng = np.random.default_rng(seed)
    results = {}
    if library == "torch":
        torch = torch_or_none(threads)
    else:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    for c_in, c_out, stride, groups, h, batch in specs:
        kernel = (rng.standard_normal((c_out, c_in // groups, 3, 3)) * 0.1).astype(np.float32)
        bias = (0.1 * rng.standard_normal(c_out)).astype(np.float32)
        x = rng.standard_normal((batch, c_in, h, h)).astype(np.float32)
        key = f"{c_in},{c_out},{stride},{groups},{h},{batch}"
        if library == "torch":
            tk, tb = torch.from_numpy(kernel), torch.from_numpy(bias)

            def fn(t, tk=tk, tb=tb, stride=stride, groups=groups):
                conv = torch.nn.functional.conv2d(
                    t, tk, tb, stride=stride, padding=1, groups=groups
                )
                return torch.relu_(conv)

            times, layout = torch_best_time(torch, fn, x, repeats)
            results[key] = [stats(times)[0], layout]
            continue
        graph = helper.make_graph(
            [
                helper.make_node(
                    "Conv",
                    ["x", "w", "b"],
                    ["c"],
                    pads=[1, 1, 1, 1],
                    strides=[stride] * 2,
                    group=groups,
                    kernel_shape=[3, 3],
                ),
                helper.make_node("Relu", ["c"], ["y"]),
            ],
            "layer",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            initializer=[numpy_helper.from_array(kernel, "w"), numpy_helper.from_array(bias, "b")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            onnx.shape_inference.infer_shapes(model).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        times = measure(lambda s=session, x=x: s.run(None, {"x": x}), repeats)
        results[key] = [stats(times)[0], "NCHW"]
    return results


def stack_times(
    layers: list, size: int, batch: int, rng: np.random.Generator, repeats: int
) -> dict[str, Any]:
    """Per-layer ms of the fast path inside whole stacks, one stack per algorithm.

    Timing a layer alone in a one-layer stack keeps its weights in cache between runs and
    pays the edges of every call (the first layer's thread hand-offs after the layout
    conversion); inside the stack, as in ``model(x)``, each layer follows another. For each
    algorithm, a stack of all the layers with that algorithm wherever it applies (im2col
    elsewhere); ``"chosen"`` maps each layer to the algorithm of the default stack.
    Returns ``{algorithm: {layer index: median ms}}`` (only the layers that used it) plus
    ``"default"`` (the default stack's times) and ``"chosen"``.
    """
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    result: dict[str, Any] = {}
    for name in (None, *ALGORITHMS):
        requested = None if name is None else [name] * len(layers)
        stack = DeployStack(layers, algorithms=requested, input_size=size)
        stack.profile(x)  # warm up
        runs = [stack.profile(x) for _ in range(repeats)]
        used = [algorithm for algorithm, _ in runs[0]]
        medians = [1e3 * statistics.median(run[i][1] for run in runs) for i in range(len(used))]
        if name is None:
            result["chosen"] = used
            result["default"] = dict(enumerate(medians))
        else:
            result[name] = {i: ms for i, ms in enumerate(medians) if used[i] == name}
    return result


def library_times(library: str, specs: list, args) -> dict:
    """Run :func:`library_child` in a fresh process (n/a when the library is missing)."""
    if not available(library):
        return {}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        library,
        "--specs",
        json.dumps(specs),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.child:
        specs = [tuple(spec) for spec in json.loads(args.specs)]
        print(json.dumps(library_child(args.child, specs, args.repeats, args.threads, args.seed)))
        return
    size = 32 if args.quick else 224
    widths = (8, 8, 16, 24, 32) if args.quick else None
    layers = a0_deploy_layers(seed=args.seed, **({"widths": widths} if widths else {}))
    batches = (1, 2) if args.quick else (1, 8)
    rng = np.random.default_rng(args.seed)

    # distinct layer shapes, with their input size and how often A0 uses them
    shapes: dict[tuple[int, int, int, int, int], int] = {}
    first: dict[tuple[int, int, int, int, int], tuple] = {}
    where: dict[tuple[int, int, int, int, int], list[int]] = {}  # the layers of each shape
    height = size
    for index, (kernel, bias, stride, groups) in enumerate(layers):
        key = (kernel.shape[1] * groups, kernel.shape[0], stride, groups, height)
        shapes[key] = shapes.get(key, 0) + 1
        first.setdefault(key, (kernel, bias, stride, groups))
        where.setdefault(key, []).append(index)
        height = (height - 1) // stride + 1
    in_stack = {batch: stack_times(layers, size, batch, rng, args.repeats) for batch in batches}

    specs = []
    for c_in, c_out, stride, groups, h in shapes:
        specs += [(c_in, c_out, stride, groups, h, batch) for batch in batches]
    others = {library: library_times(library, specs, args) for library in ("torch", "ort")}
    rows: list[list[str]] = []
    gemms: list[tuple[int, tuple[int, int, int, int], float]] = []
    with limit_blas(args.threads):
        for key, count in shapes.items():
            c_in, c_out, stride, groups, h = key
            kernel, bias, _, _ = first[key]
            oh = (h - 1) // stride + 1
            possible = [a for a in ALGORITHMS if a == "im2col" or (stride == 1 and groups == 1)]
            # float32 error of each algorithm (batch 1), against the float64 reference (on one
            # BLAS thread: BLAS's threads would go on spinning against the stacks timed next)
            x1 = np.abs(rng.standard_normal((1, c_in, h, h))).astype(np.float32)
            with one_blas_thread():
                ref = np.maximum(
                    conv2d(
                        x1.astype(np.float64),
                        kernel.astype(np.float64),
                        bias.astype(np.float64),
                        stride=stride,
                        padding=1,
                        groups=groups,
                    ),
                    0,
                )
            errors = {}
            for name in possible:
                out = DeployStack([first[key]], algorithms=[name], input_size=h)(x1)
                errors[name] = float(np.abs(out - ref).max() / np.abs(ref).max())
            for batch in batches:
                flops = 2.0 * batch * oh * oh * c_out * 9 * c_in / groups
                # each algorithm's time for this shape: the median over the layers of this
                # shape, timed inside whole A0 stacks (see stack_times)
                times = {
                    name: [in_stack[batch][name][i] for i in where[key]]
                    for name in possible
                    if all(i in in_stack[batch][name] for i in where[key])
                }
                chosen = in_stack[batch]["chosen"][where[key][0]]
                # NumPy matmul on the im2col GEMM shape: timed after every stack (below), since
                # a product on BLAS's threads leaves them spinning against the stack's own
                gemms.append(
                    (
                        len(rows),
                        (groups, batch * oh * oh, 9 * c_in // groups, c_out // groups),
                        flops,
                    )
                )
                mm_gflops = None
                spec = f"{c_in},{c_out},{stride},{groups},{h},{batch}"
                torch_ms, layout = others["torch"].get(spec, (None, "n/a"))
                ort_ms = others["ort"].get(spec, (None, ""))[0]
                medians = {name: statistics.median(t) for name, t in times.items()}
                best_name = min(medians, key=medians.get)
                chosen_ms = statistics.median(in_stack[batch]["default"][i] for i in where[key])
                cells = [fmt(medians.get(a), 2) if a in medians else "-" for a in ALGORITHMS]
                rows.append(
                    [
                        f"{c_in}->{c_out} s{stride} g{groups} @{h}x{h}",
                        str(count),
                        str(batch),
                        *cells,
                        f"{LABELS[chosen]}"
                        + ("" if best_name == chosen else f" (best {LABELS[best_name]})"),
                        fmt(flops / chosen_ms / 1e6, 0),
                        fmt(mm_gflops, 0),
                        fmt(torch_ms, 2),
                        fmt(flops / torch_ms / 1e6 if torch_ms else None, 0),
                        layout,
                        fmt(chosen_ms / torch_ms if torch_ms else None, 2),
                        fmt(ort_ms, 2),
                        fmt(chosen_ms / ort_ms if ort_ms else None, 2),
                        " / ".join(f"{errors[a]:.1e}" for a in possible),
                    ]
                )
        for row, (groups, m, k, n), flops in gemms:
            a = rng.standard_normal((groups, m, k)).astype(np.float32)
            b = rng.standard_normal((groups, k, n)).astype(np.float32)
            out = np.empty((groups, m, n), np.float32)
            mm = measure(lambda a=a, b=b, out=out: np.matmul(a, b, out=out), args.repeats)
            rows[row][8] = fmt(flops / statistics.median(mm) / 1e9, 0)
    header = [
        "layer (C_in->C_out, stride, groups, input)",
        "in A0",
        "batch",
        "im2col ms",
        "F(2,3) ms",
        "F(4,3) ms",
        "default",
        "fast GFLOP/s",
        "matmul GFLOP/s",
        "torch ms",
        "torch GFLOP/s",
        "torch layout",
        "fast / torch",
        "onnxruntime ms",
        "fast / onnxruntime",
        "float32 rel. error (im2col / F2 / F4)",
    ]
    # whole-stack sums (each layer shape times its count)
    body = table(header, rows)
    totals = []
    for batch in batches:
        fast = sum(in_stack[batch]["default"].values())
        tt = [float(r[1]) * float(r[9]) for r in rows if r[2] == str(batch) and r[9] != "n/a"]
        oo = [float(r[1]) * float(r[13]) for r in rows if r[2] == str(batch) and r[13] != "n/a"]
        totals.append(
            f"- batch {batch}: sum over A0's 22 layers, fast path {fast:.1f} ms"
            + (f", PyTorch {sum(tt):.1f} ms, ratio {fast / sum(tt):.2f}" if tt else ", PyTorch n/a")
            + (
                f", onnxruntime {sum(oo):.1f} ms, ratio {fast / sum(oo):.2f}"
                if oo
                else ", onnxruntime n/a"
            )
        )
    note = (
        f"Medians of {args.repeats} runs (ms). GFLOP/s = 2 x direct multiply-adds / median "
        "time. The fast path's layers are timed inside whole RepVGG-A0 stacks "
        "(`DeployStack.profile`), one stack per algorithm (that algorithm wherever it "
        "applies), with the default threads, as `model(x)` runs them; a shape used by several "
        "layers gets the median over them. `default` is the algorithm DeployStack picks for "
        "this layer and size (`reparam.engine.choose_algorithm`; `DeployStack.tune` measures "
        "instead). PyTorch and onnxruntime run each layer alone (conv + ReLU), each library "
        "in its own process; NumPy's matmul runs the layer's im2col GEMM shape after all the "
        "stacks (a product on BLAS's threads leaves them spinning against the stack's own)."
    )
    write_result(
        "layers",
        f"Per-layer conv, RepVGG-A0 deploy shapes at {size}x{size}",
        "\n".join([body, "", *totals, "", note]),
        args.threads,
        write=not args.no_write,
    )


def _extra(parser) -> None:
    parser.add_argument("--child", choices=("torch", "ort"), help=argparse.SUPPRESS)
    parser.add_argument("--specs", help=argparse.SUPPRESS)


if __name__ == "__main__":
    main()
