"""Conduit's Python client SDK: exchange an app's login token for broker credentials, keep one
MQTT connection up while they are renewed in place, publish and subscribe.

See docs/sdk-python.md. The SDK does not need the gateway's own packages.
"""

from conduit_sdk.client import Client, Credentials, Message, Subscription, matches
from conduit_sdk.errors import AuthError, ConduitError, RefusedError, TokenError
from conduit_sdk.presets import PRESETS, Preset

__all__ = [
    "PRESETS",
    "AuthError",
    "Client",
    "ConduitError",
    "Credentials",
    "Message",
    "Preset",
    "RefusedError",
    "Subscription",
    "TokenError",
    "matches",
]
