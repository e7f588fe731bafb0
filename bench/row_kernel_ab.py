"""Two versions of draftsmith's row kernel (models/row_linear.cpp) timed against each other in one process.

    python -m draftsmith.bench.row_kernel_ab --base 31bd912 --dtypes bf16,fp32 --widths 1,2,4,5,8,16 --reps 11

Builds the kernel of this tree and the one at git revision `--base` (or a .cpp file) side by side, each under an op
name of its own and with models/row_kernel.py's flags, then times both on one forward's linear layers of the target
(`--target`'s shapes, every layer its own random weights, so they stream from memory as in decoding), width by width,
alternating which version runs first: this host's pace moves by ~20% within minutes, so only a comparison within one
run means anything. Prints the median ms of a forward's linear layers per version and width, and checks that each
version sums every row as it sums it alone (row-invariance) and how far the two versions' outputs are apart. Run it
on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from draftsmith.models import cpu_linear, row_kernel
from draftsmith.models.target import DTYPES, load_target


def source_at(base: str) -> str:
    """The kernel's source at a git revision, or of a file."""
    if Path(base).is_file():
        return Path(base).read_text()
    repo = row_kernel.SOURCE.parent.parent
    try:
        return subprocess.run(["git", "show", f"{base}:models/row_linear.cpp"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"--base: no models/row_linear.cpp at {base!r} ({getattr(e, 'stderr', '') or e}); give a "
                         "git revision of this repository or a .cpp file") from None


def build(source: str, folder: Path):
    """The op of `source`, built under a name of its own (its hash): torch.ops.<name>.linear."""
    name = "draftsmith_ab_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    path = folder / f"{name}.cpp"
    path.write_text(source.replace("TORCH_LIBRARY(draftsmith_rows", f"TORCH_LIBRARY({name}"))
    load(name, sources=[str(path)], extra_cflags=list(row_kernel.FLAGS), is_python_module=False, verbose=False)
    return getattr(torch.ops, name).linear


def layer_shapes(target: str) -> list[tuple[int, int]]:
    """[out, in] of every linear layer of the target (models/cpu_linear.py `linear_weights`): one forward's."""
    model = load_target(target, "fp32", "cpu").model
    return [shape for shape, weights in cpu_linear.linear_weights(model).items() for _ in weights]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="a git revision (or a .cpp file) of models/row_linear.cpp")
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--widths", default="1,2,4,5,8,16")
    p.add_argument("--reps", type=int, default=11)
    args = p.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    except (ValueError, KeyError):
        widths, dtypes = [], []
    if not widths or min(widths) < 1 or not set(dtypes) <= {torch.float32, torch.bfloat16}:
        raise SystemExit(f"--widths takes positive integers (got {args.widths!r}), --dtypes fp32 and/or bf16 (the "
                         f"kernel's; got {args.dtypes!r}), each separated by commas")
    with tempfile.TemporaryDirectory() as folder:
        ops = {"base": build(source_at(args.base), Path(folder)), "this tree": build(row_kernel.SOURCE.read_text(),
                                                                                     Path(folder))}
    shapes = layer_shapes(args.target)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(shapes)} linear layers of "
          f"{args.target}; base {args.base}; median ms of a forward's linear layers, {args.reps} alternating rounds")
    torch.manual_seed(0)
    for dtype in dtypes:
        weights = [torch.randn(*s).to(dtype) for s in shapes]
        times = {name: {w: [] for w in widths} for name in ops}
        for r in range(args.reps):
            for w in widths:
                rows = {k: torch.randn(w, k).to(dtype) for k in {s[1] for s in shapes}}
                for name in (list(ops) if r % 2 == 0 else list(ops)[::-1]):
                    started = time.perf_counter()
                    for weight in weights:
                        ops[name](rows[weight.shape[1]], weight, None)
                    times[name][w].append((time.perf_counter() - started) * 1e3)
        print(f"\n| {str(dtype).removeprefix('torch.')} | " + " | ".join(f"n={w}" for w in widths) + " |")
        print("|---|" + "---|" * len(widths))
        for name in ops:
            print(f"| {name} | " + " | ".join(f"{statistics.median(times[name][w]):.1f}" for w in widths) + " |")
        ratio = [statistics.median(times["this tree"][w]) / statistics.median(times["base"][w]) for w in widths]
        print("| this tree / base | " + " | ".join(f"{x:.3f}" for x in ratio) + " |")
        weight, apart = weights[4], 0.0
        for w in widths:
            x = torch.randn(w, weight.shape[1]).to(dtype)
            outs = {name: op(x, weight, None) for name, op in ops.items()}
            for name, out in outs.items():
                if not all(torch.equal(out[i:i + 1], ops[name](x[i:i + 1], weight, None)) for i in range(w)):
                    print(f"{name}: a row of width {w} differs from the same row alone: not row-invariant")
            apart = max(apart, float((outs["base"].float() - outs["this tree"].float()).abs().max()))
        print(f"row-invariant: checked at every width; largest difference between the versions' outputs: {apart:.3g}")


if __name__ == "__main__":
    main()
