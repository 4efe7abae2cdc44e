"""What every command group of the CLI shares: the parser class and the common options."""

from __future__ import annotations

import argparse

from ..errors import UsageError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError`: one line, exit 2 (``main``)."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def storage_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option (e.g. endpoint_url=..., anon=true); repeatable. "
                        "Credentials are better left to the environment or a profile.")
