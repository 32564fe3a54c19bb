"""Peak memory of one forward pass per form, each in a fresh subprocess.

Forms: NumPy train, NumPy deploy (reference conv2d), NumPy fast path, PyTorch
deploy, onnxruntime on ``reparam export``'s graph. Each (form, batch) runs in
its own Python process, which builds the model, runs one warm-up forward on one
small image, then measures one forward on the batch: the ``tracemalloc`` peak
(every NumPy allocation; the fast path keeps its buffers in one anonymous
memory mapping, which tracemalloc does not see, so their size is added;
PyTorch's allocator is invisible to it) and the growth of ``ru_maxrss`` over
the measured call (the process' resident high-water mark; covers PyTorch). The
input batch exists before the measured call and is not counted; "extra" is the
peak minus the output array. For the fast path it stops growing once a batch
fills a chunk.

A second table: the peak RSS of a fresh process that loads RepVGG-B1's deploy
checkpoint and runs it, per library (see ``_loaded_peaks``).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_memory.py
"""

from __future__ import annotations

import inspect
import json
import resource
import statistics
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
from _common import fmt, parse_args, table, torch_or_none, write_result
from _contenders import available, run_child

FORMS = ("train", "deploy", "fast", "torch", "ort")
LABELS = {
    "train": "NumPy train",
    "deploy": "NumPy deploy (conv2d)",
    "fast": "NumPy fast path",
    "torch": "PyTorch deploy",
    "ort": "onnxruntime (reparam export)",
}
UNTRACED = ("torch", "ort")  # their allocators are invisible to tracemalloc


def child(form: str, batch: int, size: int, quick: bool, seed: int, threads: int) -> None:
    """Run in the subprocess: build, warm up, measure one forward, print JSON."""
    from _common import (
        a0_deploy_layers,
        a0_layer_specs,
        limit_blas,
        random_deploy_layers,
        repvgg_module,
        torch_deploy_model,
    )

    from reparam.engine import DeployStack

    torch = torch_or_none(threads) if form == "torch" else None
    if (form == "torch" and torch is None) or (form == "ort" and not available("ort")):
        print(json.dumps({"na": True}))
        return
    repvgg = repvgg_module()
    widths = (8, 8, 16, 24, 32) if quick else (48, 48, 96, 192, 1280)
    if form == "ort":
        from _contenders import TINY, _ort_forward

        arch = "RepVGG-A0" if not quick else repvgg.Architecture(**TINY)
        forward = _ort_forward(
            repvgg.RepVGG.create(arch, num_classes=1000, seed=seed).reparameterize(), threads, None
        )
    elif form in ("train", "deploy"):
        if repvgg is None:
            print(json.dumps({"na": True}))
            return
        arch = (
            "RepVGG-A0" if not quick else repvgg.Architecture(widths=widths, depths=(1, 2, 2, 2, 1))
        )
        model = repvgg.RepVGG.create(arch, num_classes=1000, seed=seed)
        if form == "deploy":
            model = model.reparameterize()
        forward = model
        if "fast" in inspect.signature(model.__call__).parameters:  # the reference path

            def forward(x, model=model):
                return model(x, fast=False)
    else:
        layers = (
            a0_deploy_layers(seed=seed)
            if not quick
            else random_deploy_layers(a0_layer_specs(widths), seed=seed)
        )
        head_w = np.zeros((1000, layers[-1][0].shape[0]), np.float32)
        if form == "fast":
            stack = DeployStack(layers, input_size=size)
            kernels = sum(k.nbytes + b.nbytes for k, b, _, _ in layers)
            extra_info = {"weights": stack.weight_bytes, "kernels": kernels}

            def forward(x):
                return stack(x, pool=True) @ head_w.T
        else:
            module = torch_deploy_model(torch, layers, (head_w, np.zeros(1000, np.float32)))
            module.to(memory_format=torch.channels_last)

            def forward(x):
                with torch.no_grad():
                    t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
                    return module(t).numpy()

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    info = extra_info if form == "fast" else {}
    with limit_blas(threads):
        # warm up on a small image: libraries load, but the fast path's buffers for the
        # measured shape are allocated (and counted) inside the measured call
        forward(np.ascontiguousarray(x[:1, :, :16, :16]))
        before = stack.weight_bytes if form == "fast" else 0
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        out = forward(x)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepared = 0
    if form == "fast":
        # the stack's buffers live in one anonymous memory mapping (from 2 MiB up), which
        # tracemalloc does not see: add their size
        scratch = stack.scratch_bytes(size, size, batch=batch)
        peak += scratch if scratch >= 2 * 2**20 else 0
        # weights a chunk of this size needs beyond those prepared when the stack was built
        # (F(4x4, 3x3) kernels of the 14x14 layers from 8 images on), computed in the call
        # and kept: reported apart from the call's buffers
        prepared = stack.weight_bytes - before
        info = {**info, "weights_after": stack.weight_bytes}
    print(
        json.dumps(
            {
                "peak": peak,
                "extra": peak - np.asarray(out).nbytes - prepared,
                "rss_delta": (rss - base_rss) * 1024,
                "rss": rss * 1024,
                "input": x.nbytes,
                **info,
            }
        )
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.child:
        form, batch = args.child[0], int(args.child[1])
        child(form, batch, 32 if args.quick else 224, args.quick, args.seed, args.threads)
        return
    batches = (1, 2) if args.quick else tuple(args.batches)
    results = {}
    for form in FORMS:
        for batch in batches:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                form,
                str(batch),
                "--seed",
                str(args.seed),
                "--threads",
                str(args.threads),
            ]
            if args.quick:
                command.append("--quick")
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                results[(form, batch)] = {"na": True}
                continue
            results[(form, batch)] = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2.0**20
    rows = []
    for form in FORMS:
        for batch in batches:
            r = results[(form, batch)]
            if r.get("na"):
                rows.append([LABELS[form], str(batch), "n/a", "n/a", "n/a", "n/a"])
                continue
            traced = "n/a (not traced)" if form in UNTRACED else fmt(r["peak"] / mb)
            extra = "n/a" if form in UNTRACED else fmt(r["extra"] / mb)
            rows.append(
                [
                    LABELS[form],
                    str(batch),
                    traced,
                    extra,
                    fmt(r["rss_delta"] / mb),
                    fmt(r["rss"] / mb),
                ]
            )
    lines = [
        table(
            [
                "form",
                "batch",
                "tracemalloc peak MiB",
                "extra MiB (peak - output)",
                "ru_maxrss growth MiB",
                "ru_maxrss MiB",
            ],
            rows,
        ),
        "",
    ]
    big = 8 if 8 in batches else batches[-1]
    train, deploy, fast = (results[(f, big)] for f in ("train", "deploy", "fast"))
    if not train.get("na") and not deploy.get("na"):
        lines.append(
            f"- batch {big}: NumPy deploy / NumPy train peak = "
            f"{deploy['peak'] / train['peak']:.2f}; fast path / NumPy train peak = "
            f"{fast['peak'] / train['peak']:.2f}; fast path / NumPy deploy peak = "
            f"{fast['peak'] / deploy['peak']:.2f}"
        )
    fast_extra = [
        (b, results[("fast", b)]["extra"] / mb)
        for b in batches
        if not results[("fast", b)].get("na")
    ]
    lines.append(
        "- fast path extra memory by batch: "
        + ", ".join(f"batch {b}: {e:.1f} MiB" for b, e in fast_extra)
        + " (the buffers of one chunk of images, bounded by max_chunk_bytes: once the batch"
        " fills a chunk, only the input and the output grow)"
    )
    first_fast = next(
        (results[("fast", b)] for b in batches if "weights" in results[("fast", b)]), None
    )
    if first_fast is not None:
        after = ", ".join(
            f"batch {b}: {results[('fast', b)]['weights_after'] / mb:.1f} MiB"
            for b in batches
            if "weights_after" in results[("fast", b)]
        )
        lines.append(
            f"- fast path prepared weights (kept by the stack, not counted above): "
            f"{first_fast['weights'] / mb:.1f} MiB when built, for "
            f"{first_fast['kernels'] / mb:.1f} MiB of deploy kernels and biases (Winograd "
            "kernels are 16/9 or 36/9 of a 3x3 kernel); after the measured call: "
            f"{after} (a chunk of 8 or more images runs the 14x14 layers with F(4x4, 3x3), "
            "whose kernels are prepared on first use and kept beside the F(2x2, 3x3) ones)"
        )
    lines.append(
        "\nOne forward pass per fresh process, after a one-image warm-up; float32, "
        f"{'32x32 tiny model' if args.quick else '224x224 RepVGG-A0'}."
    )
    lines += ["", *_loaded_peaks(args, batches)]
    write_result(
        "memory", "Peak memory per form", "\n".join(lines), args.threads, write=not args.no_write
    )


def _loaded_peaks(args, batches) -> list[str]:
    """Peak RSS of a fresh process that loads a deploy checkpoint and runs it, per library.

    The parent writes RepVGG-B1's deploy form (the tiny model with --quick) as a
    reparam ``.npz`` checkpoint and the ``reparam export`` ``.onnx`` graph; each
    child loads its file as a user would (the fast path and PyTorch through
    ``reparam.checkpoints.load``, PyTorch building its module from the loaded
    arrays and dropping them; onnxruntime the ``.onnx`` file), runs 2 forward passes and
    reports its resident high-water mark (``VmHWM``, which unlike ``ru_maxrss``
    does not carry over the parent's): everything the process ever held at
    once, loading included.
    """
    import tempfile

    from _contenders import TINY

    import reparam
    from reparam.checkpoints import save

    arch, size = ("tiny", 32) if args.quick else ("RepVGG-B1", 224)
    batches = (1, 2) if args.quick else (1, 8)
    mb = 2.0**20
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(Path(folder) / "deploy.npz")
        name = reparam.Architecture(**TINY) if args.quick else arch
        model = reparam.RepVGG.create(name, num_classes=1000, seed=args.seed).reparameterize()
        save(model, checkpoint)
        kernels = sum(block.kernel.nbytes for _, block in model.blocks) / mb
        if available("ort"):
            from reparam.export.onnx import export_onnx

            export_onnx(model, Path(checkpoint).with_suffix(".onnx"))
        del model
        contenders = [c for c in ("fast", "torch", "ort") if available(c)]
        peaks: dict[tuple[str, int], list[float]] = {}
        for batch in batches:
            for _ in range(1 if args.quick else args.rss_rounds):
                for contender in contenders:
                    record = run_child(
                        contender,
                        batch,
                        arch=arch,
                        size=size,
                        repeats=2,
                        threads=args.threads,
                        seed=args.seed,
                        checkpoint=checkpoint,
                        layout="NCHW",  # PyTorch holds least in NCHW (channels_last copies)
                    )
                    if not record.get("na"):
                        peaks.setdefault((contender, batch), []).append(record["ru_maxrss"] / mb)
    rows = []
    for batch in batches:
        torch_peak = peaks.get(("torch", batch))
        for contender in ("fast", "torch", "ort"):
            values = peaks.get((contender, batch))
            if not values:
                rows.append([LABELS[contender], str(batch), "n/a", "n/a"])
                continue
            med = statistics.median(values)
            ratio = fmt(med / statistics.median(torch_peak), 2) if torch_peak else "n/a"
            rows.append([LABELS[contender], str(batch), fmt(med, 0), ratio])
    title = "RepVGG-B1" if not args.quick else "tiny RepVGG"
    return [
        f"## Peak RSS of a process that loads {title}'s deploy checkpoint and runs it",
        "",
        table(["form", "batch", "peak RSS MiB (VmHWM)", "/ PyTorch"], rows),
        "",
        f"- {title}: {kernels:.0f} MiB of deploy kernels; {size}x{size} float32. Median over "
        f"{1 if args.quick else args.rss_rounds} fresh processes per entry. The fast path "
        "shares the loaded model's read-only kernels, prepares its Winograd layouts straight "
        "into their one allocation, and reads the kernel in place where a layer has more "
        "output channels than output pixels.",
    ]


def _extra(parser) -> None:
    parser.add_argument(
        "--child", nargs=2, metavar=("FORM", "BATCH"), help=__import__("argparse").SUPPRESS
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--rss-rounds", type=int, default=3, help="processes per B1 entry")


if __name__ == "__main__":
    main()
