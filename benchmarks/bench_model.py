"""Whole-model forward: the NumPy fast path vs PyTorch vs onnxruntime, each in its own process.

RepVGG-A0 (``reparam.RepVGG.create("RepVGG-A0", seed=...)``, float32, 224x224),
batch 1 and 8, ``--threads`` threads for every library. Contenders (see
``_contenders.py``): the fast path (``model(x)``), PyTorch (a deploy model
built from the same weights, no_grad, NCHW and channels_last: the faster
layout's times are reported), onnxruntime on ``reparam export``'s graph (intra-
op threads, sequential, all graph optimizations). Each measurement is one fresh
process timing ``--calls`` calls after a warm-up; ``--rounds`` rounds run the
contenders in turn (A, B, C, A, B, C, ...), so load on a shared machine hits
all of them alike. The fast path runs twice: as ``model(x)`` (the default:
the stack's own threads, as many as BLAS's, with BLAS pinned to one thread
for the call and the head) and as a ``DeployStack(threads=1)`` (BLAS's own
threads share the matrix products, everything else on one core). Reported: the median over
rounds of each process' median, the spread (min and max over rounds), and the
ratios as the median of the per-round ratios. The NumPy train form and the
reference deploy form (``model(x, fast=False)``) run in one process each, once.

Writes benchmarks/results/model.md and a chart benchmarks/results/model.png
(when matplotlib is installed).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_model.py
"""

from __future__ import annotations

import statistics

from _common import RESULTS, fmt, parse_args, table, write_result
from _contenders import available, medians, run_child

CONTENDERS = ("fast", "fast1", "torch:NCHW", "torch:channels_last", "ort")
LABELS = {
    "train": "NumPy train",
    "deploy": "NumPy deploy, reference conv2d",
    "fast": "NumPy fast path",
    "fast1": "NumPy fast path, threads=1 (BLAS's own threads)",
    "torch": "PyTorch deploy",
    "ort": "onnxruntime (reparam export)",
}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    arch, size = ("tiny", 32) if args.quick else ("RepVGG-A0", 224)
    batches = (1, 2) if args.quick else tuple(args.batches)
    rounds = 1 if args.quick else args.rounds
    calls = 2 if args.quick else args.calls
    contenders = [c for c in CONTENDERS if available(c.partition(":")[0])]
    common = {"arch": arch, "size": size, "threads": args.threads, "seed": args.seed}
    per_round: dict[tuple[str, int], list[float]] = {}
    profiles: dict[int, list[list]] = {}
    for batch in batches:
        records: dict[str, list[dict]] = {c: [] for c in contenders}
        for _ in range(rounds):
            for contender in contenders:
                name, _, layout = contender.partition(":")
                record = run_child(
                    name,
                    batch,
                    repeats=calls if batch == 1 else max(2, calls // 3),
                    layout=layout or "NCHW",
                    profile=name == "fast" and batch not in profiles,
                    **common,
                )
                if record.get("profile"):
                    profiles[batch] = record["profile"]
                records[contender].append(record)
        for contender in contenders:
            per_round[(contender, batch)] = medians(records[contender])
        for slow in ("train", "deploy"):
            if args.skip_reference:
                continue
            per_round[(slow, batch)] = medians(
                [run_child(slow, batch, repeats=1 if args.quick else 3, **common)]
            )
    rows, notes = _rows(per_round, batches, contenders)
    lines = [table(_HEADER, rows), "", *notes]
    for batch, profile in profiles.items():
        by_algorithm: dict[str, float] = {}
        for name, ms in profile:
            by_algorithm[name] = by_algorithm.get(name, 0.0) + ms
        lines.append(
            f"- fast-path profile, batch {batch} (median of 3 runs per layer): "
            + ", ".join(f"{name} layers {ms:.1f} ms" for name, ms in by_algorithm.items())
            + "; per layer: "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in profile)
        )
    lines.append(
        f"\n{'RepVGG-A0' if not args.quick else 'tiny RepVGG'}, {size}x{size}, float32, "
        f"{args.threads} threads per library. Each contender runs in its own fresh process, "
        f"{rounds} rounds interleaved (fast, fast threads=1, PyTorch NCHW, PyTorch "
        f"channels_last, onnxruntime, then again); per process the median of {calls} calls "
        "(batch 1) or "
        f"{max(2, calls // 3)} (larger batches) after one warm-up call. `median ms` is the "
        "median over rounds, `min`/`max` the spread over rounds; ratios are medians of the "
        "per-round ratios. PyTorch's row is the faster layout (by median). The NumPy train and "
        "reference deploy forms: one process each, median of 3 calls. Ratios depend on the CPU "
        "(and on its load): compare them only within one table."
    )
    write_result(
        "model", "Whole-model forward", "\n".join(lines), args.threads, write=not args.no_write
    )
    if not args.no_write:
        _chart(per_round, batches)


_HEADER = [
    "form",
    "batch",
    "median ms",
    "min ms",
    "max ms",
    "images/s",
    "/ PyTorch",
    "/ onnxruntime",
]


def _rows(per_round, batches, contenders):
    rows, notes = [], []
    for batch in batches:
        torch_key = _best_torch(per_round, batch, contenders)
        keys = [
            ("train", "train"),
            ("deploy", "deploy"),
            ("fast", "fast"),
            ("fast1", "fast1"),
            (torch_key, "torch"),
            ("ort", "ort"),
        ]
        for key, form in keys:
            values = per_round.get((key, batch)) if key else None
            label = LABELS[form] + (
                f" ({key.partition(':')[2]})" if form == "torch" and key else ""
            )
            if not values:
                rows.append([label, str(batch)] + ["n/a"] * 6)
                continue
            med = statistics.median(values)
            rows.append(
                [
                    label,
                    str(batch),
                    fmt(med),
                    fmt(min(values)),
                    fmt(max(values)),
                    fmt(1e3 * batch / med, 1),
                    _ratio(per_round, key, torch_key, batch),
                    _ratio(per_round, key, "ort", batch),
                ]
            )
        spread = {
            other: _ratios(per_round, "fast", key, batch)
            for other, key in (
                ("PyTorch", torch_key),
                ("onnxruntime", "ort"),
                ("the fast path with threads=1", "fast1"),
            )
        }
        notes.append(
            f"- batch {batch}: "
            + "; ".join(
                f"fast path / {other} = {fmt(statistics.median(r), 2)} "
                f"(rounds: {', '.join(fmt(v, 2) for v in r)})"
                if r
                else f"fast path / {other}: n/a"
                for other, r in spread.items()
            )
        )
    return rows, notes


def _best_torch(per_round, batch, contenders):
    candidates = [c for c in contenders if c.startswith("torch") and per_round.get((c, batch))]
    if not candidates:
        return None
    return min(candidates, key=lambda c: statistics.median(per_round[(c, batch)]))


def _ratios(per_round, key, other, batch) -> list[float]:
    """Per-round ratios (rounds paired); one value for a form timed once."""
    a, b = (
        per_round.get((key, batch)) if key else None,
        per_round.get((other, batch)) if other else None,
    )
    if not a or not b:
        return []
    if len(a) == len(b):
        return [x / y for x, y in zip(a, b, strict=True)]
    return [statistics.median(a) / statistics.median(b)]


def _ratio(per_round, key, other, batch) -> str:
    ratios = _ratios(per_round, key, other, batch)
    return fmt(statistics.median(ratios), 2) if ratios else "n/a"


def _chart(per_round, batches) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    forms = [
        ("train", "NumPy train"),
        ("deploy", "NumPy deploy (conv2d)"),
        ("fast", "NumPy fast path"),
        ("torch", "PyTorch (best layout)"),
        ("ort", "onnxruntime"),
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(forms)
    for i, (key, label) in enumerate(forms):
        values = []
        for batch in batches:
            if key == "torch":
                runs = [
                    v for k, v in per_round.items() if k[0].startswith("torch") and k[1] == batch
                ]
                med = min((statistics.median(v) for v in runs if v), default=0.0)
            else:
                run = per_round.get((key, batch))
                med = statistics.median(run) if run else 0.0
            values.append(med / batch)
        positions = [j + (i - (len(forms) - 1) / 2) * width for j in range(len(batches))]
        ax.bar(positions, values, width, label=label)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per image (median)")
    ax.set_yscale("log")
    ax.set_title("RepVGG-A0 forward, float32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "model.png", dpi=120)
    print(f"(chart written to {RESULTS / 'model.png'})")


def _extra(parser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 5)")
    parser.add_argument("--calls", type=int, default=12, help="timed calls per process (batch 1)")
    parser.add_argument(
        "--skip-reference", action="store_true", help="skip the slow NumPy train/deploy forms"
    )


if __name__ == "__main__":
    main()
