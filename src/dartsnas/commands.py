"""Small commands that need no training loop: ``genotypes``."""

from __future__ import annotations

import argparse

from .genotype import NAMED, load_genotype


def _genotypes(args: argparse.Namespace) -> int:
    if args.action == "show":
        if not args.spec:
            from .errors import UserError

            raise UserError("dartsnas genotypes show needs a NAME, genotype file, run directory or genotype string")
        genotype = load_genotype(args.spec)
        print(genotype.to_json() if args.json else str(genotype))
        return 0
    aliases: dict[int, list[str]] = {}
    for name, g in NAMED.items():
        aliases.setdefault(id(g), []).append(name)
    for names in aliases.values():
        g = NAMED[names[0]]
        label = " = ".join(names)
        print(f"{label:28s} {g.kind}  {g.steps} nodes")
    return 0


def add_cli(groups: dict[str, argparse._SubParsersAction], commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("genotypes", help="list named architectures or print one",
                            description="List named architectures, or print one given as a name, file, run "
                                        "directory or genotype string.")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("spec", nargs="?", help="NAME | genotype.json | RUN_DIR | 'Genotype(...)'")
    p.add_argument("--json", action="store_true", help="print JSON instead of the printed Genotype(...) form")
    p.set_defaults(handler=_genotypes)
