"""MQTT adapter: MQTT 3.1.1 and 5.0 over TCP and WebSocket, the server side written sans-I/O.

Layers, each importing only those before it: ``codec`` (the wire format: packets, reason codes),
``publish`` (Conduit message <-> PUBLISH), ``session`` (the state of one session and its
delivery rules), ``options`` (what the adapter allows), ``sessions`` (the session registry:
which sessions exist, wills, expiry), ``channel`` (the MQTT rules of one connection, without
the socket), ``connection`` (the asyncio side: bytes in, the channel's answers out, timers; over
TCP), ``ws`` (the same over WebSocket), ``adapter`` (listeners, start and stop).
"""

from adapters.mqtt.adapter import MQTTAdapter

__all__ = ["MQTTAdapter"]
