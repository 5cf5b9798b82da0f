"""MQTT adapter: MQTT 3.1.1 and 5.0 over TCP and WebSocket, the server side written sans-I/O.

Layers: ``codec`` (wire format), ``publish`` (Conduit message <-> PUBLISH), ``session`` (session
state and delivery rules), ``connection`` (the asyncio Protocol), ``ws`` (WebSocket framing),
``adapter`` (listeners, session registry, timers).
"""

from adapters.mqtt.adapter import MQTTAdapter

__all__ = ["MQTTAdapter"]
