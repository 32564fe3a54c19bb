"""PyTorch latency of a folded module: fold_torch vs the published deploy form and the train form.

Two train-form networks built from ``tests/torch_families.py``'s blocks
(``tests/graph_models.py``), random weights and calibrated BatchNorm statistics:

* RepVGG-A0 (``RepVGGNet``: stem 48, stages [2, 4, 14, 1] of widths 48, 96, 192, 1280; a ReLU
  after each block; 1000 classes);
* a MobileOne-S0-sized network (``MobileOneNet``: stem 48, widths 48, 128, 256, 1024, depths
  2, 8, 10, 1, four conv branches per block).

Three forms of the same weights, each a PyTorch module:

* ``train``: the network itself;
* ``folded``: ``reparam.graph.fold_torch(train, example)``;
* ``deploy``: the published recipe: each block fused on its own by ``reparam.families``
  (``from_state_dict(...).reparameterize()``) into one ``nn.Conv2d``, then conv + ReLU per block,
  average pool, flatten, the same linear head.

A preparing child process builds the three forms and saves them (``torch.save`` of the whole
modules), counts the convolutions each runs and compares outputs at batch 1. Each measurement
is then one fresh process that loads one form and times ``--calls`` calls (``no_grad``, NCHW,
``--threads`` intra-op threads) after a warm-up; ``--rounds`` rounds run the forms in turn
(train, folded, deploy, train, ...). Reported: the median over rounds of each process' median,
the spread over rounds, and folded / deploy (target: within 3%) and train / folded as medians of
the per-round ratios. Both folded and deploy being PyTorch, a last process also loads the two and
alternates their calls (folded, deploy, folded, ...): the median of the per-call ratios is
folded / deploy with the machine's load drift cancelled. Writes
benchmarks/results/fold_torch.md.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_fold_torch.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import fmt, measure, parse_args, table, write_result
from _contenders import SETTLE_SECONDS, available

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
FORMS = ("train", "folded", "deploy")

#: RepVGG-A0 (FACTS.md): stem min(64, 64 a), stages 64 a, 128 a, 256 a, 512 b; a, b = 0.75, 2.5.
REPVGG_A0 = {"widths": (48, 48, 96, 192, 1280), "depths": (1, 2, 4, 14, 1)}
REPVGG_TINY = {"widths": (8, 8, 16, 24, 32), "depths": (1, 2, 2, 2, 1)}
#: MobileOne-S0 (apple/ml-mobileone): width multipliers (0.75, 1, 1, 2), 4 conv branches.
MOBILEONE_S0 = {"stem": 48, "widths": (48, 128, 256, 1024), "depths": (2, 8, 10, 1), "branches": 4}
MOBILEONE_TINY = {"stem": 8, "widths": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "branches": 2}
LABELS = {"repvgg": "RepVGG-A0", "mobileone": "MobileOne-S0-sized"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        CHILDREN[sys.argv[1]](sys.argv[2:])
        return
    args = parse_args(__doc__.splitlines()[0], _extra)
    if not available("torch"):
        write_result(
            "fold_torch",
            "fold_torch: PyTorch latency",
            "n/a: torch is needed (pip install -e '.[bench]')",
            args.threads,
            write=not args.no_write,
        )
        return
    size = 32 if args.quick else 224
    batches = (1,) if args.quick else tuple(args.batches)
    rounds = 1 if args.quick else args.rounds
    calls = 2 if args.quick else args.calls
    forms = ("folded", "deploy") if args.quick else FORMS  # --quick: the code paths, quickly
    per_round: dict[tuple[str, int, str], list[float]] = {}
    prepared: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as directory:
        for model in ("repvgg", "mobileone"):
            flags = ["--size", str(size), "--seed", str(args.seed), "--threads", str(args.threads)]
            if args.quick:
                flags.append("--quick")
            prepared[model] = _child("prepare", model, directory, *flags)
            for batch in batches:
                for _ in range(rounds):
                    for form in forms:
                        record = _child(
                            "time",
                            prepared[model][form],
                            str(batch),
                            "--calls",
                            str(calls if batch == 1 else max(2, calls // 3)),
                            *flags,
                        )
                        per_round.setdefault((model, batch, form), []).append(
                            statistics.median(record["times"]) * 1e3
                        )
                paired = _child(
                    "paired",
                    prepared[model]["folded"],
                    prepared[model]["deploy"],
                    str(batch),
                    "--calls",
                    str(3 * (calls if batch == 1 else max(2, calls // 3))),
                    *flags,
                )
                prepared[model][f"paired{batch}"] = paired["ratios"]
    body = _report(args, size, rounds, calls, batches, forms, prepared, per_round)
    write_result(
        "fold_torch", "fold_torch: PyTorch latency", body, args.threads, write=not args.no_write
    )


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 3)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per process, batch 1")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])


def _child(mode: str, *argv: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode, *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=HERE,
    )
    if result.returncode != 0:
        raise SystemExit(f"{mode} {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _report(args, size, rounds, calls, batches, forms, prepared, per_round) -> str:
    header = ["network", "form", "batch", "median ms", "min ms", "max ms", "images/s", "/ deploy"]
    rows = []
    notes = []
    for model in prepared:
        label = f"tiny {model}" if args.quick else LABELS[model]
        for batch in batches:
            deploy = per_round[(model, batch, "deploy")]
            for form in forms:
                values = per_round[(model, batch, form)]
                med = statistics.median(values)
                rows.append(
                    [
                        label,
                        form,
                        str(batch),
                        fmt(med, 2),
                        fmt(min(values), 2),
                        fmt(max(values), 2),
                        fmt(1e3 * batch / med, 1),
                        fmt(statistics.median(_ratios(values, deploy)), 3),
                    ]
                )
            folded = per_round[(model, batch, "folded")]
            train = per_round.get((model, batch, "train"))
            ratios = _ratios(folded, deploy)
            paired = prepared[model][f"paired{batch}"]
            notes.append(
                f"- {label}, batch {batch}: folded / deploy = "
                f"{fmt(statistics.median(ratios), 3)} (rounds: "
                f"{', '.join(fmt(r, 3) for r in ratios)}; target <= 1.03); in one process, "
                f"calls alternated: {fmt(statistics.median(paired), 3)} (median of "
                f"{len(paired)} per-call ratios)"
                + (
                    f"; train / folded = {fmt(statistics.median(_ratios(train, folded)), 2)}"
                    if train
                    else ""
                )
            )
        facts = prepared[model]
        notes.append(
            f"- {label}: convolutions run per forward: train {facts['convs']['train']}, "
            f"folded {facts['convs']['folded']}, deploy {facts['convs']['deploy']}; BatchNorms: "
            f"train {facts['bns']['train']}, folded {facts['bns']['folded']}; "
            f"fold_torch took {facts['fold_seconds']:.2f} s ({facts['summary']}); largest "
            f"|folded - train| = {facts['diff_train']:.1e} and |folded - deploy| = "
            f"{facts['diff_deploy']:.1e} of max |train output| at batch 1"
        )
    text = [table(header, rows), "", *notes]
    text.append(
        f"\n{size}x{size}, float32, NCHW, no_grad, {args.threads} PyTorch threads. Each form runs "
        f"in its own fresh process (loading the module the preparing process saved), {rounds} "
        f"rounds interleaved ({', '.join(forms)}, then again); per process the median of "
        f"{calls} calls (batch 1) or {max(2, calls // 3)} (larger batches) after one warm-up "
        "call. `median ms` is the median over rounds, `min`/`max` the spread over rounds; "
        "`/ deploy` is the median of the per-round ratios. Compare ratios only within one table "
        "(they depend on the CPU and its load)."
    )
    return "\n".join(text)


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


# ----------------------------------------------------------------- children


def _child_parser(mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"bench_fold_torch.py {mode}")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    return parser


def _prepare(argv: list[str]) -> None:
    """Build one network's three forms, save them; print paths and facts as JSON."""
    parser = _child_parser("prepare")
    parser.add_argument("model", choices=tuple(LABELS))
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    import torch
    from graph_models import MobileOneNet, RepVGGNet, deploy_form, randomize_calibrated_

    from reparam.graph import fold_torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model == "repvgg":
        config = REPVGG_TINY if args.quick else REPVGG_A0
        net = RepVGGNet(config["widths"], config["depths"], num_classes=1000)
    else:
        net = MobileOneNet(**(MOBILEONE_TINY if args.quick else MOBILEONE_S0))
    gen = torch.Generator().manual_seed(args.seed)
    calibration = torch.randn((8, 3, args.size, args.size), generator=gen)
    randomize_calibrated_(net, calibration, args.seed)
    example = torch.randn((1, 3, args.size, args.size), generator=gen)
    start = time.perf_counter()
    folded, report = fold_torch(net, example)
    fold_seconds = time.perf_counter() - start
    forms = {"train": net, "folded": folded, "deploy": deploy_form(net)}
    record: dict[str, Any] = {"fold_seconds": fold_seconds, "summary": report.lines()[0]}
    counts = {form: _count(module, example, torch) for form, module in forms.items()}
    record["convs"] = {form: c["conv"] for form, c in counts.items()}
    record["bns"] = {form: c["batch_norm"] for form, c in counts.items()}
    with torch.no_grad():
        outputs = {form: module(example) for form, module in forms.items()}
    scale = float(outputs["train"].abs().max())
    for other in ("train", "deploy"):
        record[f"diff_{other}"] = float((outputs["folded"] - outputs[other]).abs().max()) / scale
    for form, module in forms.items():
        path = Path(args.directory) / f"{args.model}-{form}.pt"
        torch.save(module, path)
        record[form] = str(path)
    print(json.dumps(record))


def _count(module: Any, x: Any, torch: Any) -> dict[str, int]:
    """Convolutions and batch norms one forward dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"conv": 0, "batch_norm": 0}

    class Count(TorchDispatchMode):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            if "convolution" in name:
                counts["conv"] += 1
            elif "batch_norm" in name:
                counts["batch_norm"] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        module(x)
    return counts


def _time(argv: list[str]) -> None:
    """Load one saved form, time ``--calls`` forwards after a warm-up; print JSON."""
    parser = _child_parser("time")
    parser.add_argument("path")
    parser.add_argument("batch", type=int)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))  # the train form's classes unpickle from there
    import torch

    torch.set_num_threads(args.threads)
    module = torch.load(args.path, weights_only=False)
    x = torch.randn(
        (args.batch, 3, args.size, args.size), generator=torch.Generator().manual_seed(args.seed)
    )
    with torch.no_grad():
        times = measure(lambda: module(x), args.calls)
    print(json.dumps({"times": times}))


def _paired(argv: list[str]) -> None:
    """Load two saved forms, alternate their calls; print the per-call time ratios as JSON."""
    parser = _child_parser("paired")
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("batch", type=int)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    import torch

    torch.set_num_threads(args.threads)
    first = torch.load(args.first, weights_only=False)
    second = torch.load(args.second, weights_only=False)
    x = torch.randn(
        (args.batch, 3, args.size, args.size), generator=torch.Generator().manual_seed(args.seed)
    )
    ratios = []
    with torch.no_grad():
        first(x), second(x)  # warm-up
        time.sleep(SETTLE_SECONDS)
        for _ in range(args.calls):
            start = time.perf_counter()
            first(x)
            middle = time.perf_counter()
            second(x)
            ratios.append((middle - start) / (time.perf_counter() - middle))
    print(json.dumps({"ratios": ratios}))


CHILDREN = {"prepare": _prepare, "time": _time, "paired": _paired}


if __name__ == "__main__":
    main()
