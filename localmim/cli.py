"""``localmim`` command line: one subcommand per pipeline stage, plus ``params``, ``dag``, ``report``, ``compare``,
``pull``."""

from __future__ import annotations

import argparse
import sys


def _cmd_params(args: argparse.Namespace) -> int:
    from localmim.config import ParamsError, apply_overrides, read_params_file, validate_all

    try:
        tree = apply_overrides(read_params_file(args.params), args.overrides)
        sections = validate_all(tree, source=args.params)
    except ParamsError as e:
        print(f"localmim params: error: {e}", file=sys.stderr)
        return 2
    if args.show:
        import yaml

        print(yaml.safe_dump({k: v.to_dict() for k, v in sections.items()}, sort_keys=False), end="")
    else:
        print(f"{args.params}: {len(sections)} sections valid ({', '.join(sections)})")
    return 0


def _cmd_dag(args: argparse.Namespace) -> int:
    from localmim.pipeline import render

    return render.main(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from localmim.pipeline import results

    return results.report(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from localmim.pipeline import plan

    return plan.main(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from localmim.tracking import compare

    return compare.main(args)


def _cmd_pull(args: argparse.Namespace) -> int:
    from localmim.pipeline import pull

    return pull.main(args)


def build_parser() -> argparse.ArgumentParser:
    from localmim import __version__
    from localmim.pipeline import stage as base
    from localmim.stages import load_all

    stages = load_all()
    parser = argparse.ArgumentParser(
        prog="localmim",
        description="LocalMIM pipeline: ImageNet -> shards -> targets -> pretrain -> finetune -> downstream.",
    )
    parser.add_argument("--version", action="version", version=f"localmim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sd in stages.items():
        p = sub.add_parser(name, help=sd.help, description=sd.help)
        base.build_parser(p, sd)
        p.set_defaults(_run=lambda a, sd=sd: base.execute(sd, a))

    p = sub.add_parser("params", help="validate params.yaml (all sections) and optionally print the resolved values")
    base.add_common_args(p)
    p.add_argument("--show", action="store_true", help="print the resolved params")
    p.set_defaults(_run=_cmd_params)

    p = sub.add_parser("dag", help="write or check dvc.yaml and the Snakemake rules generated from the stage registry")
    base.add_common_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="(re)write dvc.yaml and workflow/rules/stages.smk")
    g.add_argument("--check", action="store_true", help="exit 1 if the committed files differ from the registry")
    p.set_defaults(_run=_cmd_dag)

    p = sub.add_parser("plan", help="images processed and projected device-hours per stage, from the params' recipe "
                                    "and stated or measured images/s (each rate's source is printed); per-device "
                                    "batch, accumulation and chained jobs on the cluster you give")
    base.add_common_args(p)
    from localmim.pipeline import plan

    plan.add_args(p)
    p.set_defaults(_run=_cmd_plan)

    p = sub.add_parser("report", help="print the headline results from metrics/*.json next to their baselines")
    p.add_argument("--metrics-dir", default="metrics")
    p.add_argument("--all", action="store_true", help="also print every numeric metric")
    p.add_argument("--out", metavar="DIR", help="also write DIR/metrics.tsv and DIR/metrics.png")
    p.set_defaults(_run=_cmd_report)

    p = sub.add_parser("compare", help="compare pipeline runs (groups) from MLflow: differing params, headline "
                                       "metrics, plots")
    from localmim.tracking import compare

    compare.add_args(p)
    p.set_defaults(_run=_cmd_compare)

    p = sub.add_parser("pull", help="`dvc pull`, then record for Snakemake the stages DVC restored (a fresh clone "
                                    "reruns nothing that is up to date)")
    from localmim.pipeline import pull

    pull.add_args(p)
    p.set_defaults(_run=_cmd_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
