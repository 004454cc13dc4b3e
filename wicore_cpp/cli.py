"""The `wicore` command: `wicore serve`, `wicore quantize`.

Each subcommand's module is imported only when that subcommand runs, so `wicore serve`
never pays for the quantizer and the front end never imports llama_cpp.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from wicore_cpp import __version__
from wicore_cpp.config import Config, ConfigError, load_config

log = logging.getLogger("wicore")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (`max_batch_size` -> `--max-batch-size`), all optional."""
    parser.add_argument("--config", metavar="FILE", help="JSON configuration file")
    for name, field in Config.model_fields.items():
        flag = "--" + name.replace("_", "-")
        metavar = "JSON" if str(field.annotation).startswith(("dict", "list")) else None
        parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=field.description)


def _serve(args: argparse.Namespace) -> int:
    if args.json and not args.dry_run:
        print("wicore serve: --json goes with --dry-run", file=sys.stderr)  # noqa: T201
        return 2
    flags: dict[str, Any] = {name: getattr(args, name) for name in Config.model_fields}
    try:
        config = load_config(args.config, flags=flags)
    except ConfigError as exc:
        print(f"wicore serve: {exc}", file=sys.stderr)  # noqa: T201 - CLI output, not library
        return 2
    if args.dry_run:
        from wicore_cpp.server import dry_run

        return dry_run(config, args.json)
    from wicore_cpp.server import run_server

    return run_server(config)


def _quantize(args: argparse.Namespace) -> int:
    from wicore_cpp.quantize.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wicore", description="WiCore: serve GGUF models.")
    parser.add_argument("--version", action="version", version=f"wicore-cpp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    _add_config_flags(serve)
    serve.add_argument("--dry-run", action="store_true",
                       help="print the memory plan (devices, weights, KV cache, compute; the "
                       "settings fitted) and exit: 0 if it fits, 2 if not")
    serve.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    serve.set_defaults(func=_serve)

    quantize = sub.add_parser("quantize", help="quantize a GGUF model")
    from wicore_cpp.quantize.command import add_arguments

    add_arguments(quantize)
    quantize.set_defaults(func=_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
