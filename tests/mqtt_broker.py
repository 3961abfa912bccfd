"""An MQTT broker for the tests, in its own process: amqtt's Broker (a real MQTT 3.1.1 broker, sessions in
memory, anonymous clients) on 127.0.0.1:PORT.

    python tests/mqtt_broker.py PORT [--wait]

Prints `ready` once amqtt is imported; with --wait it then waits for a line on stdin before it listens,
so a test can pay the start-up beforehand and bring a broker back at a moment it chooses. Prints
`listening` once it accepts connections; runs until killed.
"""
from __future__ import annotations

import asyncio
import logging
import sys


def main() -> None:
    port = int(sys.argv[1])
    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    print("ready", flush=True)
    if "--wait" in sys.argv[2:]:
        sys.stdin.readline()

    async def serve() -> None:
        broker = Broker(config)
        await broker.start()
        print("listening", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
