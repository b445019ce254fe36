"""`sparsed-engine serve`: its own flags and the server's life (bind, load, serve, shut down on a
signal). The engine flags are the ones generated from EngineConfig (entrypoints/arg_utils.py)."""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

from sparsed_engine import envs
from sparsed_engine.envs import API_KEY_ENV

DEFAULT_MODEL_NAME = "sparsed-engine/default_model"
logger = logging.getLogger("sparsed_engine.serve")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the name(s) clients pass as `model` (default: the --model value)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer <key>' on /v1 (default: ${API_KEY_ENV})")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="requests allowed to wait for admission; past it a 503 (default: no limit)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails at once."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port={port}: must be in [0, 65535]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host={host} --port={port}: cannot bind ({e.strerror})") from e
    sock.set_inheritable(True)
    return sock


def run_server(args: argparse.Namespace, engine_kwargs: dict) -> None:
    import uvicorn

    from sparsed_engine.engine.async_llm import AsyncLLM
    from sparsed_engine.entrypoints.openai.api_server import build_app

    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting={args.max_waiting}: must be >= 0")
    api_key = args.api_key or envs.read().api_key
    names = args.served_model_name or [engine_kwargs.get("model") or DEFAULT_MODEL_NAME]
    sock = _bind(args.host, args.port)
    # uvicorn re-raises the signal that stopped it once it has drained; a default SIGTERM would then
    # kill the process before the executor is shut down, so turn it into an exit that runs `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    llm = AsyncLLM.from_engine_args(max_waiting=args.max_waiting, **engine_kwargs)
    try:
        server = uvicorn.Server(uvicorn.Config(build_app(llm, names, api_key), log_level=args.uvicorn_log_level,
                                               timeout_graceful_shutdown=5))
        print(f"sparsed-engine serving {', '.join(names)} on http://{args.host}:{sock.getsockname()[1]}/v1",
              flush=True)
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        llm.shutdown()
        sock.close()
        print("sparsed-engine: engine shut down", flush=True)
