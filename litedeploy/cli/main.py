"""`litedeploy` entry point: subcommands register themselves from their own modules."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from litedeploy import __version__
from litedeploy.cli.args import HelpFormatter
from litedeploy.errors import LiteDeployError

# subcommand modules; each defines add_parser(subparsers) and run(args) -> int
_COMMANDS = ("chat", "serve", "bench", "info", "lite", "check")


def _normalize_flags(argv: list[str]) -> list[str]:
    """Accept lmdeploy's --foo_bar spelling as --foo-bar."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag or value is one clear line and exit code 2, not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="litedeploy", formatter_class=HelpFormatter,
        description="Deploy and serve chat LLMs on one modest GPU or a plain CPU.")
    parser.add_argument("--version", action="version", version=f"litedeploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=OneLineErrorParser)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"litedeploy.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"litedeploy.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _normalize_flags(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _resolve_model_id(args)
        code = _run_worker_ranks(args)  # multi-node --tp / torchrun: ranks > 0 end here
        return code if code is not None else int(args.run(args) or 0)
    except (LiteDeployError, ValueError, FileNotFoundError) as exc:
        # bad input the user can fix (LiteDeployError subclasses ValueError/FileNotFoundError)
        print(f"litedeploy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run_worker_ranks(args: argparse.Namespace) -> int | None:
    """On a node other than node 0 (or a torchrun rank > 0), serve the tensor-parallel ranks
    instead of the command: only global rank 0 serves HTTP, chats or benchmarks."""
    if not hasattr(args, "nnodes"):  # a command without engine flags
        return None
    from litedeploy.cli.args import engine_config_from
    from litedeploy.distributed.launch import run_worker_ranks

    return run_worker_ranks(args.model_path, engine_config_from(args))


def _resolve_model_id(args: argparse.Namespace) -> None:
    """Every subcommand takes a hub model id where it takes a path (a URL is left alone)."""
    model = getattr(args, "model_path", None)
    if model and "://" not in model:
        from litedeploy.hub import resolve_model

        args.model_path = resolve_model(model, getattr(args, "revision", None),
                                        getattr(args, "gguf_file", None))


if __name__ == "__main__":
    raise SystemExit(main())
