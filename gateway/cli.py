"""`radixgate serve`: read the config, load the models (with a progress bar), serve over HTTP."""
from __future__ import annotations

import argparse
import logging
import sys

from gateway.config import ConfigError
from gateway.litellm_config import load_any_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixgate", description="OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the models of a config file")
    serve.add_argument("--config", default=None, help="config.yaml, or LiteLLM's proxy config (model_list ...); "
                       "default: ./config.yaml if present")
    serve.add_argument("--host", default=None, help="overrides server.host")
    serve.add_argument("--port", type=int, default=None, help="overrides server.port")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = args.config or ("config.yaml" if Path("config.yaml").is_file() else None)
    try:
        config, notes = load_any_config(path)
    except ConfigError as error:
        print(f"radixgate: {error}", file=sys.stderr)
        return 2
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for note in notes:                    # LiteLLM config keys we do not act on, named once
        logging.getLogger("radixgate.config").warning("%s: %s", path, note)

    import uvicorn

    from backends.source import SourceError
    from gateway.engine.engine import EngineStartError
    from gateway.router import Router
    from gateway.server import create_app
    from gateway.shutdown import GracefulServer

    try:
        router = Router.from_config(config)
    except (SourceError, EngineStartError, ConfigError) as error:
        print(f"radixgate: {error}", file=sys.stderr)
        return 2
    app = create_app(config, router)
    logging.getLogger("radixgate").info("serving on http://%s:%d/v1", config.server.host, config.server.port)
    # SIGTERM drains first (gateway/shutdown.py); uvicorn's own timeout only bounds closing what is left.
    server = GracefulServer(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=5), app.state.drain)
    try:
        server.run()             # the app's lifespan stops the engines after serving
    except BaseException:
        router.stop()            # serving failed (e.g. the port is taken): the engines stop here
        raise
    return app.state.drain.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
