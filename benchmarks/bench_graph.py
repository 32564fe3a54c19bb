"""Graph folding: onnxruntime on train, folded and deploy ONNX graphs; fold time and memory.

(a) Latency. For RepVGG-A0 (``reparam.RepVGG.create("RepVGG-A0", seed=...)``) and a
MobileOne-S0-sized network (``tests/graph_models.MobileOneNet``, random weights, calibrated
BatchNorm statistics), three ONNX graphs of the same weights:

* ``train``: the train form exported by PyTorch (TorchScript exporter, opset 17, the
  train-form modules of ``tests/torch_families.py``; ``--dynamo`` for torch.export, opset 18);
* ``folded``: ``reparam.graph.fold_onnx`` of the train graph;
* ``deploy``: the published deploy form: ``reparam.export.to_onnx`` for RepVGG-A0; for
  MobileOne, a network of one conv + ReLU per block, each conv fused by
  ``reparam.families`` from the block's state dict, exported like the train form.

onnxruntime (CPU, ``--threads`` intra-op threads, sequential, all graph optimizations) runs
each at 224x224, batch 1 and 8. Every measurement is one fresh process timing ``--calls``
calls after a warm-up; ``--rounds`` rounds run the graphs in turn (A, B, C, A, B, C, ...).
Reported: the median over rounds of each process' median and the spread; folded / deploy
(target: within 3%) and train / folded as medians of the per-round ratios. Before timing,
the graphs' outputs are compared at batch 1 (folded vs train and vs deploy).

(b) Fold time and peak memory. RepVGG-B3 (~123 M parameters) exported as a train-form ONNX
file; fresh processes each run ``fold_onnx(path)`` (read, fold, build the new model) and
then ``save_onnx``; reported: the median time of each step and the process' resident
high-water mark (``VmHWM``) after importing, after folding and after saving, against the file
size. Targets: fold under 5 s, peak under 3x the file size.

The graphs are prepared by a child process too (it imports PyTorch; a parent that did would
leave OpenMP threads around). Writes benchmarks/results/graph.md.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_graph.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import fmt, parse_args, table, write_result
from _contenders import SETTLE_SECONDS, available, peak_rss

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
FORMS = ("train", "folded", "deploy")
MiB = 2**20

# MobileOne-S0 (apple/ml-mobileone): width multipliers (0.75, 1, 1, 2), 4 conv branches.
MOBILEONE_S0 = {"stem": 48, "widths": (48, 128, 256, 1024), "depths": (2, 8, 10, 1), "branches": 4}
MOBILEONE_TINY = {"stem": 8, "widths": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "branches": 2}
#: ``--quick``: the same code paths on a tiny RepVGG (benchmarks/_contenders.py's TINY).
TINY_REPVGG = {"widths": (8, 8, 16, 24, 32), "depths": (1, 2, 2, 2, 1)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        CHILDREN[sys.argv[1]](sys.argv[2:])
        return
    args = parse_args(__doc__.splitlines()[0], _extra)
    if not (available("ort") and available("torch")):
        write_result(
            "graph",
            "Graph folding",
            "n/a: onnx, onnxruntime and torch are needed (pip install -e '.[bench]')",
            args.threads,
            write=not args.no_write,
        )
        return
    size = 32 if args.quick else 224
    batches = (1,) if args.quick else tuple(args.batches)
    rounds = 1 if args.quick else args.rounds
    calls = 2 if args.quick else args.calls
    fold_rounds = 1 if args.quick else args.fold_rounds
    models = ("repvgg", "mobileone") if "latency" in args.parts or args.quick else ()
    with tempfile.TemporaryDirectory(prefix="bench_graph_") as tmp:
        prepared = {
            model: _child("prepare", model, tmp, *_common_flags(args, size)) for model in models
        }
        per_round: dict[tuple[str, str, int], list[float]] = {}
        for batch in batches:
            records: dict[tuple[str, str], list[float]] = {}
            for _ in range(rounds):
                for model in models:
                    if prepared[model].get("na"):
                        continue
                    for form in FORMS:
                        record = _child(
                            "time",
                            prepared[model][form],
                            str(batch),
                            "--size",
                            str(size),
                            "--threads",
                            str(args.threads),
                            "--calls",
                            str(calls if batch == 1 else max(2, calls // 3)),
                            "--seed",
                            str(args.seed),
                        )
                        if not record.get("na"):
                            records.setdefault((model, form), []).append(
                                1e3 * statistics.median(record["times"])
                            )
            for (model, form), values in records.items():
                per_round[(model, form, batch)] = values
        big: dict[str, Any] = {"na": True}
        if "fold" not in args.parts:
            pass
        elif args.quick:  # the tiny RepVGG's train graph stands in for B3
            big = dict(prepared["repvgg"])
        else:
            big = _child("prepare", "big", tmp, *_common_flags(args, size))
        folds = []
        if not big.get("na"):
            for _ in range(fold_rounds):
                folds.append(_child("fold", big["train"], str(Path(tmp) / "big-folded.onnx")))
    body = _report(args, size, rounds, calls, prepared, per_round, batches, big, folds)
    write_result("graph", "Graph folding", body, args.threads, write=not args.no_write)


def _common_flags(args: argparse.Namespace, size: int) -> list[str]:
    flags = ["--size", str(size), "--seed", str(args.seed), "--threads", str(args.threads)]
    return flags + (["--quick"] if args.quick else []) + (["--dynamo"] if args.dynamo else [])


def _child(mode: str, *argv: str) -> dict[str, Any]:
    """Run ``mode`` of this script in a fresh process; its JSON record (``{"na": True}`` if not)."""
    env = dict(os.environ)
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # they slow current NumPy builds
        env.pop(name, None)
    command = [sys.executable, str(Path(__file__).resolve()), mode, *argv]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"{mode} {' '.join(argv)}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return {"na": True}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------- report


def _report(args, size, rounds, calls, prepared, per_round, batches, big, folds) -> str:
    names = {
        "repvgg": "tiny RepVGG" if args.quick else "RepVGG-A0",
        "mobileone": "tiny MobileOne" if args.quick else "MobileOne-S0-sized",
    }
    rows = []
    for model, info in prepared.items():
        if info.get("na"):
            rows.append([names[model], "n/a", *["n/a"] * 8])
            continue
        for batch in batches:
            values = {form: per_round.get((model, form, batch), []) for form in FORMS}
            for form in FORMS:
                run = values[form]
                if not run:
                    rows.append([names[model], str(batch), form, *["n/a"] * 7])
                    continue
                med = statistics.median(run)
                rows.append(
                    [
                        names[model],
                        str(batch),
                        form,
                        str(info["nodes"][form]),
                        str(info["convs"][form]),
                        fmt(med, 2),
                        fmt(min(run), 2),
                        fmt(max(run), 2),
                        _ratio(run, values["deploy"]),
                        _ratio(values["train"], run) if form == "folded" else "",
                    ]
                )
    header = [
        "model",
        "batch",
        "graph",
        "nodes",
        "Conv nodes",
        "median ms",
        "min ms",
        "max ms",
        "/ deploy",
        "train / folded",
    ]
    lines = [table(header, rows), ""]
    for model, info in prepared.items():
        if info.get("na"):
            continue
        lines.append(
            f"- {names[model]}: fold {fmt(info['fold_seconds'], 2)} s ({info['summary']}); "
            f"outputs at batch 1, max |difference| / max |output|: folded vs train "
            f"{info['diff_folded_train']:.1e}, folded vs deploy {info['diff_folded_deploy']:.1e}"
        )
        for batch in batches:
            ratios = _ratios(
                per_round.get((model, "folded", batch), []),
                per_round.get((model, "deploy", batch), []),
            )
            if ratios:
                within = abs(statistics.median(ratios) - 1) <= 0.03
                lines.append(
                    f"  - batch {batch}: folded / deploy per round "
                    f"{', '.join(fmt(r, 3) for r in ratios)}; within 3%: "
                    f"{'yes' if within else 'no'}"
                )
    exporter = "torch.export (opset 18)" if args.dynamo else "TorchScript exporter (opset 17)"
    lines.append(
        f"\n{size}x{size}, float32, onnxruntime with {args.threads} intra-op threads, sequential "
        f"execution, all graph optimizations (its own Conv+BN fusion included). Train graphs "
        f"from PyTorch's {exporter}. Each graph runs in its own fresh process, {rounds} rounds "
        f"interleaved (train, folded, deploy of each model, then again); per process the median "
        f"of {calls} calls (batch 1) or {max(2, calls // 3)} (larger batches) after one warm-up "
        "call. `median ms` is the median over rounds, `min`/`max` the spread over rounds; "
        "ratios are medians of the per-round ratios."
    )
    lines += ["", _fold_table(args, big, folds)]
    return "\n".join(lines)


def _fold_table(args, big, folds) -> str:
    name = "tiny RepVGG" if args.quick else "RepVGG-B3"
    good = [f for f in folds if not f.get("na")]
    if big.get("na") or not good:
        return f"Fold of {name}: n/a"
    size = big["bytes"]

    def median(key: str) -> float:
        return statistics.median(f[key] for f in good)

    peak = max(f["hwm_save"] for f in good)
    rows = [
        [
            name,
            fmt(big["parameters"] / 1e6, 2),
            fmt(size / MiB, 1),
            f"{good[0]['nodes'][0]} -> {good[0]['nodes'][1]}",
            fmt(median("fold_seconds"), 2),
            fmt(median("save_seconds"), 2),
            fmt(median("hwm_import") / MiB, 0),
            fmt(median("hwm_fold") / MiB, 0),
            fmt(peak / MiB, 0),
            fmt(peak / size, 2),
            fmt((peak - median("hwm_import")) / size, 2),
            "yes" if median("fold_seconds") < 5 else "no",
            "yes" if peak < 3 * size else "no",
        ]
    ]
    header = [
        "model",
        "train params (M)",
        "file MiB",
        "ops (IR)",
        "fold_onnx s",
        "save_onnx s",
        "VmHWM after import MiB",
        "after fold MiB",
        "after save MiB",
        "peak / file",
        "(peak - import) / file",
        "fold < 5 s",
        "peak < 3x file",
    ]
    note = (
        f"Fold of a train-form ONNX file, each of {len(good)} fresh processes: import onnx and "
        "reparam.graph, `fold_onnx(path)` (read the file, fold, build the new ModelProto), "
        "`save_onnx` of the result. Times are medians over the processes; VmHWM is the "
        "process' resident high-water mark (the import's share is in the first column)."
    )
    return "\n".join([table(header, rows), "", note])


def _ratios(a: list[float], b: list[float]) -> list[float]:
    if not a or not b:
        return []
    if len(a) == len(b):
        return [x / y for x, y in zip(a, b, strict=True)]
    return [statistics.median(a) / statistics.median(b)]


def _ratio(a: list[float], b: list[float]) -> str:
    ratios = _ratios(a, b)
    return fmt(statistics.median(ratios), 3) if ratios else "n/a"


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 5)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per process (batch 1)")
    parser.add_argument("--fold-rounds", type=int, default=3, help="fresh fold processes")
    parser.add_argument("--dynamo", action="store_true", help="export with torch.export")
    parser.add_argument(
        "--parts", nargs="+", choices=("latency", "fold"), default=["latency", "fold"]
    )


# ----------------------------------------------------------------- children


def _child_parser(mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"bench_graph.py {mode}")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def _prepare(argv: list[str]) -> None:
    """Write one model's ONNX graphs into a directory; print their paths and facts as JSON.

    ``repvgg`` / ``mobileone``: train, folded and deploy graphs; ``big``: the train graph of
    RepVGG-B3 only (a tiny RepVGG with ``--quick``).
    """
    parser = _child_parser("prepare")
    parser.add_argument("model", choices=("repvgg", "mobileone", "big"))
    parser.add_argument("directory")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dynamo", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    import torch

    torch.set_num_threads(args.threads)
    directory = Path(args.directory)
    record: dict[str, Any] = {}
    paths = {form: directory / f"{args.model}-{form}.onnx" for form in FORMS}
    example = torch.randn((1, 3, args.size, args.size), generator=torch.Generator().manual_seed(1))
    if args.model in ("repvgg", "big"):
        from graph_models import export

        import reparam
        from reparam.export import export_onnx

        if args.quick:
            arch: Any = reparam.Architecture(**TINY_REPVGG)
        else:
            arch = "RepVGG-A0" if args.model == "repvgg" else "RepVGG-B3"
        model = reparam.RepVGG.create(arch, num_classes=1000, seed=args.seed)
        record["parameters"] = model.num_parameters
        net = _torch_repvgg(model)
        export(net, example, paths["train"], dynamo=args.dynamo)
        del net
        record["bytes"] = _bytes(paths["train"])
        if args.model == "big":
            record["train"] = str(paths["train"])
            print(json.dumps(record))
            return
        export_onnx(model, paths["deploy"])
    else:
        from graph_models import MobileOneNet, deploy_form, export, randomize_calibrated_

        config = MOBILEONE_TINY if args.quick else MOBILEONE_S0
        torch.manual_seed(args.seed)
        net = MobileOneNet(**config)
        calibration = torch.randn(
            (8, 3, args.size, args.size), generator=torch.Generator().manual_seed(args.seed)
        )
        randomize_calibrated_(net, calibration, args.seed)
        export(net, example, paths["train"], dynamo=args.dynamo)
        export(deploy_form(net), example, paths["deploy"], dynamo=args.dynamo)
    import onnx

    from reparam.graph import fold_onnx
    from reparam.graph.onnx import save_onnx

    start = time.perf_counter()
    folded, report = fold_onnx(paths["train"])
    record["fold_seconds"] = time.perf_counter() - start
    record["summary"] = report.lines()[0]
    save_onnx(folded, paths["folded"])
    record.update({form: str(path) for form, path in paths.items()})
    graphs = {form: onnx.load(str(path)) for form, path in paths.items()}
    record["nodes"] = {form: len(g.graph.node) for form, g in graphs.items()}
    record["convs"] = {
        form: sum(n.op_type == "Conv" for n in g.graph.node) for form, g in graphs.items()
    }
    x = np.random.default_rng(args.seed).standard_normal((1, 3, args.size, args.size))
    outputs = {
        form: _session(str(path), 1).run(None, {"input": x.astype(np.float32)})[0]
        for form, path in paths.items()
    }
    scale = float(np.abs(outputs["train"]).max())
    for other in ("train", "deploy"):
        diff = float(np.abs(outputs["folded"] - outputs[other]).max())
        record[f"diff_folded_{other}"] = diff / scale
    print(json.dumps(record))


def _bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _torch_repvgg(model: Any) -> Any:
    """The train form of a reparam RepVGG as ``graph_models.RepVGGNet``, weights loaded."""
    import torch
    from graph_models import RepVGGNet

    from reparam.checkpoints.repvgg import to_state_dict

    names = [name for name, _ in model.blocks]
    specs = [block.spec for _, block in model.blocks]
    stages = [0 if name == "stage0" else int(name[5:].split(".")[0]) for name in names]
    depths = [stages.count(s) for s in sorted(set(stages))]
    widths = [specs[stages.index(s) + depths[s] - 1].out_channels for s in sorted(set(stages))]
    net = RepVGGNet(
        widths,
        depths,
        num_classes=model.num_classes,
        in_channels=model.in_channels,
        groups=lambda layer: specs[layer].groups,
    )
    state = to_state_dict(model, layout="official")
    missing, unexpected = net.load_state_dict(
        {key: torch.from_numpy(np.array(value)) for key, value in state.items()}, strict=False
    )
    if unexpected or any(not key.endswith("num_batches_tracked") for key in missing):
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] == 3]
    if [c.stride[0] for c in convs] != [s.stride for s in specs]:
        raise SystemExit("strides of the torch transcription differ from the model's")
    return net.eval()


def _session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _time(argv: list[str]) -> None:
    """Time ``--calls`` onnxruntime calls of one graph after a warm-up; print JSON."""
    parser = _child_parser("time")
    parser.add_argument("path")
    parser.add_argument("batch", type=int)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    session = _session(args.path, args.threads)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    out = session.run(None, feed)[0]
    time.sleep(SETTLE_SECONDS)
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times, "checksum": float(np.asarray(out, np.float64).sum())}))


def _fold(argv: list[str]) -> None:
    """Fold one ONNX file in this fresh process, save the result; times and VmHWM as JSON."""
    parser = argparse.ArgumentParser(prog="bench_graph.py fold")
    parser.add_argument("path")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    import onnx  # noqa: F401  (imported before the first VmHWM reading, as fold_onnx would)

    from reparam.graph import fold_onnx
    from reparam.graph.onnx import save_onnx

    record: dict[str, Any] = {"hwm_import": peak_rss()}
    start = time.perf_counter()
    folded, report = fold_onnx(args.path)
    record["fold_seconds"] = time.perf_counter() - start
    record["hwm_fold"] = peak_rss()
    start = time.perf_counter()
    save_onnx(folded, args.output)
    record["save_seconds"] = time.perf_counter() - start
    record["hwm_save"] = peak_rss()
    record["nodes"] = [report.ops_before, report.ops_after]
    print(json.dumps(record))


CHILDREN = {"prepare": _prepare, "time": _time, "fold": _fold}


if __name__ == "__main__":
    main()
