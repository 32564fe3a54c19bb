"""Whole-model forward: NumPy train form vs NumPy deploy (reference conv2d) vs fast path vs PyTorch.

RepVGG-A0 (``reparam.RepVGG.create("RepVGG-A0", seed=...)``, float32, 224x224),
batch 1 and 8. The PyTorch model is a deploy RepVGG-A0 built in this script
from the same deploy weights (conv3x3 + bias, ReLU, ..., global pool, linear),
timed in NCHW and channels_last (the faster is reported), under no_grad.
Ratios are of medians in this one run. Writes benchmarks/results/model.md and
a chart benchmarks/results/model.png (when matplotlib is installed).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_model.py
"""

from __future__ import annotations

import inspect
import statistics

import numpy as np
from _common import (
    RESULTS,
    a0_layer_specs,
    fmt,
    limit_blas,
    measure,
    parse_args,
    random_deploy_layers,
    repvgg_module,
    stats,
    table,
    torch_best_time,
    torch_deploy_model,
    torch_or_none,
    write_result,
)

from reparam.engine import DeployStack

FORMS = (
    "NumPy train",
    "NumPy deploy (conv2d)",
    "NumPy fast path",
    "PyTorch deploy",
    "NumPy fast path, tuned",
)


def build(args):
    """(train forward or None, deploy forward, deploy layers, head, multiply-adds per image)."""
    repvgg = repvgg_module()
    size = 32 if args.quick else 224
    if repvgg is not None and not args.quick:
        train = repvgg.RepVGG.create("RepVGG-A0", num_classes=1000, seed=args.seed)
        deploy = train.reparameterize()
        layers = [(b.kernel, b.bias, b.stride, b.groups) for _, b in deploy.blocks]
        head = (deploy.head.weight, deploy.head.bias)
        return train, deploy, layers, head, size
    if repvgg is not None:  # quick: a narrow custom architecture, same code paths
        arch = repvgg.Architecture(widths=(8, 8, 16, 24, 32), depths=(1, 2, 2, 2, 1))
        train = repvgg.RepVGG.create(arch, num_classes=10, seed=args.seed)
        deploy = train.reparameterize()
        layers = [(b.kernel, b.bias, b.stride, b.groups) for _, b in deploy.blocks]
        return train, deploy, layers, (deploy.head.weight, deploy.head.bias), size
    # reparam.RepVGG not available: deploy layers from the published config, no train form
    widths = (8, 8, 16, 24, 32) if args.quick else (48, 48, 96, 192, 1280)
    layers = random_deploy_layers(a0_layer_specs(widths), seed=args.seed)
    rng = np.random.default_rng(args.seed)
    head = (
        (0.01 * rng.standard_normal((1000, widths[-1]))).astype(np.float32),
        np.zeros(1000, np.float32),
    )
    return None, None, layers, head, size


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    torch = torch_or_none(args.threads)
    train, deploy, layers, head, size = build(args)
    macs = 0
    h = size
    for kernel, _, stride, _groups in layers:
        h = (h - 1) // stride + 1
        macs += h * h * kernel.size
    macs += head[0].size
    stack = DeployStack(layers, input_size=size)
    weight, bias = head

    def fast(x: np.ndarray) -> np.ndarray:
        return stack(x, pool=True) @ weight.T + bias

    batches = (1, 2) if args.quick else tuple(args.batches)
    rng = np.random.default_rng(args.seed)
    results: dict[tuple[str, int], list[float] | None] = {}
    layouts: dict[int, str] = {}
    errors: dict[int, float] = {}
    tuned: dict[int, list[str]] = {}
    with limit_blas(args.threads):
        for batch in batches:
            x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            reference_repeats = max(1, args.repeats if not args.slow_repeats else args.slow_repeats)
            # the fast forms and PyTorch first: the NumPy reference forms allocate and free
            # hundreds of MiB, after which fresh buffers land on recycled pages
            results[(FORMS[2], batch)] = measure(lambda x=x: fast(x), args.repeats)
            tuned_stack = DeployStack(layers, input_size=size)
            tuned[batch] = tuned_stack.tune(x)
            results[(FORMS[4], batch)] = measure(
                lambda x=x, s=tuned_stack: s(x, pool=True) @ weight.T + bias, args.repeats
            )
            del tuned_stack
            if torch is not None:
                model = torch_deploy_model(torch, layers, head)
                times, layouts[batch] = torch_best_time(torch, model, x, args.repeats, module=model)
                results[(FORMS[3], batch)] = times
                with torch.no_grad():
                    expected = model(torch.from_numpy(x)).numpy()
                errors[batch] = float(np.abs(fast(x) - expected).max() / np.abs(expected).max())
            else:
                results[(FORMS[3], batch)] = None
            results[(FORMS[0], batch)] = (
                measure(lambda x=x: train(x), reference_repeats) if train is not None else None
            )
            results[(FORMS[1], batch)] = (
                measure(lambda x=x: reference(deploy, x), reference_repeats)
                if deploy is not None
                else None
            )
    rows = []
    for batch in batches:
        torch_med = _median(results[(FORMS[3], batch)])
        deploy_med = _median(results[(FORMS[1], batch)])
        for form in FORMS:
            times = results[(form, batch)]
            if times is None:
                rows.append([form, str(batch)] + ["n/a"] * 7)
                continue
            med, lo, hi = stats(times)
            rows.append(
                [
                    form + (f" ({layouts[batch]})" if form == FORMS[3] else ""),
                    str(batch),
                    fmt(med),
                    fmt(lo),
                    fmt(hi),
                    fmt(1e3 * batch / med, 1),
                    fmt(2 * macs * batch / med / 1e6, 0),
                    fmt(med / torch_med if torch_med else None, 2),
                    fmt(med / deploy_med if deploy_med else None, 2),
                ]
            )
    header = [
        "form",
        "batch",
        "median ms",
        "min ms",
        "max ms",
        "images/s",
        "GFLOP/s",
        "/ PyTorch",
        "/ NumPy deploy",
    ]
    lines = [table(header, rows), ""]
    for batch in batches:
        t = _median(results[(FORMS[0], batch)])
        d = _median(results[(FORMS[1], batch)])
        f = _median(results[(FORMS[2], batch)])
        p = _median(results[(FORMS[3], batch)])
        lines.append(
            f"- batch {batch}: fast path / PyTorch = {fmt(f / p if p else None, 2)}; "
            f"NumPy deploy / NumPy train = {fmt(d / t if d and t else None, 2)}; "
            f"fast path / NumPy deploy = {fmt(f / d if d else None, 3)}; "
            f"fast-path logits vs PyTorch: max rel. diff "
            f"{errors[batch]:.1e}"
            if batch in errors
            else f"- batch {batch}: PyTorch n/a"
        )
    for batch in batches:
        lines.append(f"- tuned algorithms, batch {batch}: {', '.join(tuned[batch])}")
    profile = stack.profile(rng.standard_normal((batches[-1], 3, size, size)).astype(np.float32))
    by_algo: dict[str, float] = {}
    for name, seconds in profile:
        by_algo[name] = by_algo.get(name, 0.0) + seconds
    lines.append(
        f"- fast-path profile (batch {batches[-1]}, one run): "
        + ", ".join(f"{name} layers {1e3 * s:.1f} ms" for name, s in by_algo.items())
        + f"; algorithms per layer: {', '.join(a for a, _ in profile)}"
    )
    lines.append(
        f"\n{'RepVGG-A0' if not args.quick else 'tiny RepVGG'}, {size}x{size}, float32, "
        f"{2 * macs / 1e9:.2f} GFLOP per image (deploy); medians / min / max of "
        f"{args.repeats} runs ({reference_repeats} for the NumPy train and deploy forms)."
    )
    write_result(
        "model", "Whole-model forward", "\n".join(lines), args.threads, write=not args.no_write
    )
    if not args.no_write:
        _chart(results, batches)


def reference(model, x: np.ndarray) -> np.ndarray:
    """The model's reference forward (reparam.conv2d), also where model(x) is the fast path."""
    if "fast" in inspect.signature(model.__call__).parameters:
        return model(x, fast=False)
    return model(x)


def _median(times: list[float] | None) -> float | None:
    return 1e3 * statistics.median(times) if times else None


def _chart(results, batches) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(FORMS)
    for i, form in enumerate(FORMS):
        values = [_median(results[(form, b)]) or 0.0 for b in batches]
        positions = [j + (i - (len(FORMS) - 1) / 2) * width for j in range(len(batches))]
        ax.bar(positions, [v / b for v, b in zip(values, batches, strict=True)], width, label=form)
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
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=0,
        help="runs for the slow NumPy train/deploy forms (default: --repeats)",
    )


if __name__ == "__main__":
    main()
