"""`symi`: thin click commands over keyword-only library functions.

Commands parse and validate options, call one library function, and write files (atomically, see
symi_sim.outputs). Every ValueError from the libraries becomes one clear error line and exit status 1.
torch is imported lazily, inside `train` only.
"""

from __future__ import annotations

import logging
import sys

import click


class _SymiGroup(click.Group):
    """Turns library ValueErrors into `Error: ...` and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_SymiGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def symi(verbose: int) -> None:
    """Adaptive expert replication for MoE training: simulate, plan, train, plot, trace."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---------------------------------------------------------------- trace (section owned by the trace work)


# ---------------------------------------------------------------- plan


# ---------------------------------------------------------------- simulate


# ---------------------------------------------------------------- train


def main() -> None:
    symi(prog_name="symi")


if __name__ == "__main__":
    main()
