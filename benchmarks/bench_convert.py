"""Conversion time, train form -> deploy form, for every published RepVGG configuration.

For each architecture in ``reparam.ARCHITECTURES``: build the train form
(float32, seeded), then time ``model.reparameterize()`` (median, min, max of
``--repeats`` runs) and the construction of the fast path's ``DeployStack``
(which precomputes the GEMM-layout and Winograd-transformed kernels). Target:
RepVGG-B3 converts in under 1 s.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_convert.py
"""

from __future__ import annotations

import time

from _common import fmt, limit_blas, measure, parse_args, repvgg_module, stats, table, write_result

from reparam.engine import DeployStack


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    repvgg = repvgg_module()
    if repvgg is None:
        write_result(
            "convert",
            "Conversion time (train -> deploy)",
            "n/a: reparam.RepVGG is not available",
            args.threads,
            write=not args.no_write,
        )
        return
    names = list(repvgg.ARCHITECTURES)
    if args.quick:
        names = names[:1]
    if args.only:
        names = [n for n in names if any(o.lower() in n.lower() for o in args.only)]
    rows = []
    with limit_blas(args.threads):
        for name in names:
            start = time.perf_counter()
            model = repvgg.RepVGG.create(name, num_classes=1000, seed=args.seed)
            built = time.perf_counter() - start
            times = measure(model.reparameterize, args.repeats)
            deploy = model.reparameterize()
            blocks = [block for _, block in deploy.blocks]
            stack_times = measure(
                lambda blocks=blocks: DeployStack(blocks), max(1, args.repeats // 2)
            )
            med, lo, hi = stats(times)
            rows.append(
                [
                    name,
                    fmt(model.num_parameters / 1e6, 2),
                    fmt(deploy.num_parameters / 1e6, 2),
                    fmt(med, 0),
                    fmt(lo, 0),
                    fmt(hi, 0),
                    "yes" if med < 1000 else "no",
                    fmt(stats(stack_times)[0], 0),
                    fmt(built, 1),
                ]
            )
            del model, deploy, blocks
    header = [
        "architecture",
        "train params (M)",
        "deploy params (M)",
        "convert median ms",
        "min ms",
        "max ms",
        "< 1 s",
        "DeployStack build ms",
        "create s (untimed part)",
    ]
    note = (
        f"float32; `reparameterize()` timed {args.repeats} times per model, DeployStack "
        f"construction {max(1, args.repeats // 2)} times (it precomputes the im2col and "
        "Winograd weights of every layer)."
    )
    write_result(
        "convert",
        "Conversion time (train -> deploy)",
        "\n".join([table(header, rows), "", note]),
        args.threads,
        write=not args.no_write,
    )


def _extra(parser) -> None:
    parser.add_argument("--only", nargs="*", help="architecture name fragments, e.g. B3 A0")


if __name__ == "__main__":
    main()
