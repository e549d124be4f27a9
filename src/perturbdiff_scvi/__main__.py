"""Command line: ``python -m perturbdiff_scvi quickstart [--out DIR] [--max-steps N] [--seed S] [--guidance-scale W]
[--transport {none,quantile}]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perturbdiff_scvi", description="PerturbDiff for scverse.")
    sub = parser.add_subparsers(dest="command", required=True)
    qs = sub.add_parser(
        "quickstart",
        help="Train on bundled Kang 2018 PBMC with stimulated CD4T held out, predict "
        "them, and write a UMAP, the predicted AnnData and metrics.",
    )
    qs.add_argument("--out", default="perturbdiff_quickstart", help="output folder (default: %(default)s)")
    qs.add_argument("--max-steps", type=int, default=None, help="training steps (default: the model default, 1500)")
    qs.add_argument("--seed", type=int, default=0)
    qs.add_argument("--accelerator", default="auto", help="'auto', 'cpu' or 'gpu'")
    qs.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    qs.add_argument(
        "--guidance-scale", type=float, default=None, help="predict_population(guidance_scale=) (default: 0.5)"
    )
    qs.add_argument(
        "--transport",
        choices=["none", "quantile"],
        default=None,
        help="OutputOptions(transport=) of predict_population: 'quantile' returns control cells moved gene by gene "
        "onto the "
        "generated distributions (default: none)",
    )
    args = parser.parse_args(argv)

    from ._quickstart import run_quickstart, summarise

    options = {"guidance_scale": args.guidance_scale}
    if args.transport is not None:
        from .model import OutputOptions

        options["output_options"] = OutputOptions(transport=args.transport)
    metrics = run_quickstart(
        args.out,
        max_steps=args.max_steps,
        seed=args.seed,
        accelerator=args.accelerator,
        progress=not args.no_progress,
        predict_kwargs={k: v for k, v in options.items() if v is not None},
    )
    print(summarise(metrics))
    print(f"Wrote {args.out}/umap_real_vs_predicted.png, predicted_cd4t_stimulated.h5ad, metrics.json")
    return 0


def quickstart_entry() -> int:
    """Console script ``perturbdiff-quickstart``: same as ``python -m perturbdiff_scvi quickstart``."""
    return main(["quickstart", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
