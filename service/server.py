"""Running the app under uvicorn on a socket bound beforehand (``voiceprint serve``)."""

from __future__ import annotations

import signal
import socket

from voiceprint.engine.errors import InvalidInput


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``; with port 0 it holds the free port it got.

    Bound here, before the server starts, so that the caller can tell which port that is.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only
    # on sockets that say they are TCP, and with it on every response waited 40 ms for a
    # delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def serve(app, sock: socket.socket, *, verbose: int = 0) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM; returns after a clean stop."""
    import uvicorn

    # uvicorn's own access log prints raw paths, which hold speaker names: the app logs
    # each request itself, by route template (service.app).
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=False, log_config=None)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for
    # the handler that was there before it; a no-op one lets the caller exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
