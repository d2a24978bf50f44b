"""The `unfold` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .settings import Settings

    overrides = {
        key: value
        for key, value in {"host": args.host, "port": args.port, "data_dir": args.data_dir}.items()
        if value is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(
        f"Unfold serving on http://{settings.host}:{settings.port} "
        f"(data: {settings.data_dir.resolve()}, docs: /docs)",
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unfold",
        description="Unfold: compressed-sensing unfolding of superposed activations.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="run the REST service",
        description="Run the REST service. Each option is also an UNFOLD_* environment variable.",
    )
    serve_parser.add_argument("--host", help="interface (UNFOLD_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (UNFOLD_PORT, default 8000)")
    serve_parser.add_argument("--data-dir", help="data directory (UNFOLD_DATA_DIR, default ./data)")
    serve_parser.set_defaults(handler=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
