"""`python -m engine.latency`: profile an engine over (N_inf, N_kv) and fit its latency model (see
engine.latency). The command line lives apart from the model, so that backends import the model
without the engine command line (which imports the backends)."""

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

from ..cli import build_engine
from ..cli import parse_args as engine_args
from ..default_models import default_model_path
from . import FILE_NAME, LatencyModel, fit, key, profile


def plot(samples, model: LatencyModel, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kv in sorted({k for _, k, _ in samples}):
        points = sorted((i, ms) for i, k, ms in samples if k == kv)
        xs = [i for i, _ in points]
        line, = ax.plot(xs, [ms for _, ms in points], "o", label=f"N_kv={kv}")
        grid = np.linspace(min(xs), max(xs), 100)
        ax.plot(grid, [model.ms(x, kv) for x in grid], "-", color=line.get_color(), linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N_inf (tokens in the forward pass)")
    ax.set_ylabel("ms per forward pass")
    ax.set_title(f"{title}: R^2 = {model.r2:.3f} (dots measured, lines fitted)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    from tqdm import tqdm


    p = argparse.ArgumentParser(prog="python -m engine.latency", description="Profile an engine and fit its latency model (the R-Stitch paper's eq. 5).",
                                epilog="Other options go to the engine, as for `python -m slm_service`: --model, "
                                       "--backend, --device, --dtype, --threads.")
    p.add_argument("--role", choices=["slm", "llm"], required=True)
    p.add_argument("--repeats", type=int, default=5, help="timings per grid point (the median is fitted)")
    p.add_argument("--write", action="store_true", help=f"store the fit in the model's {FILE_NAME}")
    p.add_argument("--plot", type=Path, help="PNG of the measured points and the fitted surface")
    p.add_argument("--samples", type=Path, help="JSON of the measured grid")
    args, engine_argv = p.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engine_arguments = engine_args(args.role, engine_argv)
    engine = build_engine(args.role, engine_arguments)
    model_path = engine_arguments.model or default_model_path(args.role)
    measured_on = (f"{engine.backend} {engine.device}/{engine.dtype}, {platform.processor() or platform.machine()}, "
                   f"{time.strftime('%Y-%m-%d')}")
    with tqdm(total=args.repeats + 1, desc=f"profiling {args.role}", unit="round") as bar:
        def progress(done, total):
            bar.update(done - bar.n)
        samples = profile(engine, repeats=args.repeats, progress=progress)
    model = fit(samples, measured_on)
    print(f"{args.role} {model_path} ({len(samples)} grid points, median of {args.repeats}):")
    print(f"  T(N_inf, N_kv) = {model.a:.3e}*N_inf*N_kv + {model.b:.3e}*N_inf^2 + {model.c:.3e}*N_inf + "
          f"{model.d:.3e} ms")
    print(f"  R^2 = {model.r2:.4f}; decode at N_kv=64: {model.ms(1, 64):.3f} ms, prefill of 32 tokens: "
          f"{model.ms(32, 0):.3f} ms")
    if args.write:
        print(f"  stored in {model.save(model_path, key(engine.backend, engine.device, engine.dtype))}")
    if args.samples:
        args.samples.write_text(json.dumps([{"n_inf": i, "n_kv": k, "ms": ms} for i, k, ms in samples], indent=1))
    if args.plot:
        plot(samples, model, f"{args.role} ({engine.backend} {engine.device}/{engine.dtype})", args.plot)
        print(f"  plot: {args.plot}")


if __name__ == "__main__":
    main()
