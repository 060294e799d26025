"""`silotune kit`: per-site deployment kits from one federation description (deploy.kit)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _kit(args: argparse.Namespace) -> int:
    from deploy.kit import DEFAULT_BUNDLES, DEFAULT_MONITORING, generate, load_federation

    fed_path = Path(args.federation)
    if args.check:
        fed = load_federation(fed_path)
        names = ", ".join(s.name for s in fed.silos)
        print(f"{fed_path}: federation {fed.federation.name!r} is valid; silos: {names}")
        return 0
    out = Path(args.out)
    report = generate(
        fed_path,
        out,
        force=args.force,
        bundles=Path(args.bundles) if args.bundles else DEFAULT_BUNDLES,
        monitoring=Path(args.monitoring) if args.monitoring else DEFAULT_MONITORING,
    )
    print(f"kits in {out}/: {report.summary()}")
    print(f"next: give {out}/central/ to the central operator and {out}/<silo>/ to each silo;")
    print("each kit's README.md lists that site's steps. Kits hold no private keys.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "kit",
        help="generate per-site deployment kits (compose, .env, CA cert, README) from a federation file",
        description=(
            "Read a federation description (see deploy/federation.example.toml) and write one kit "
            "per site: OUT/central/ and OUT/<silo>/. Regenerating keeps files you edited (the new "
            "version goes to FILE.new) unless --force."
        ),
    )
    p.add_argument("--federation", required=True, metavar="TOML", help="federation description")
    p.add_argument("--out", default="kits", metavar="DIR", help="output folder (default kits/)")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite files you edited (your version is kept as FILE.bak)",
    )
    p.add_argument("--check", action="store_true", help="only validate the federation file")
    p.add_argument("--bundles", metavar="DIR", help="compose bundles (default: deploy/compose)")
    p.add_argument(
        "--monitoring", metavar="DIR", help="monitoring files for the central kit (default: monitoring/)"
    )
    p.set_defaults(func=_kit)
