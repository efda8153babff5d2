"""``python -m trio_agents devserver`` / ``python -m trio_agents.devserver``.

Runs until SIGINT or SIGTERM, then closes every connection and exits 0. A port that cannot
be listened on is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from .._errors import ConfigError
from ._rtc import JOIN_TIMEOUT
from ._server import AVAILABILITY_TIMEOUT, open_dev_server


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trio-agents devserver",
                                     description="A local LiveKit-compatible server for agents.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7880, help="0 picks a free port")
    parser.add_argument("--api-key", default="devkey")
    parser.add_argument("--api-secret", default="secret")
    parser.add_argument("--availability-timeout", type=float, default=AVAILABILITY_TIMEOUT,
                        help="seconds a job offer may take, retries included (default 3, as "
                             "livekit-server)")
    parser.add_argument("--rtc-address", default=None,
                        help="the host address WebRTC is offered on (never loopback; default: "
                             "the first non-loopback IPv4 address)")
    parser.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT,
                        help="seconds a participant has to complete WebRTC before it is "
                             "removed (default 60, as livekit-server)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_dev_server(host=args.host, port=args.port, api_key=args.api_key,
                                   api_secret=args.api_secret,
                                   availability_timeout=args.availability_timeout,
                                   rtc_address=args.rtc_address,
                                   join_timeout=args.join_timeout) as dev:
            print(f"LiveKit dev server on {dev.url}  (LIVEKIT_URL={dev.url} "
                  f"LIVEKIT_API_KEY={dev.api_key} LIVEKIT_API_SECRET={dev.api_secret})",
                  flush=True)
            async for signum in signals:
                logging.getLogger("trio_agents.devserver").info(
                    "%s: stopping", signal.Signals(signum).name)
                break


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        trio.run(serve, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
