"""CoAP adapter: publish with POST/PUT, read the latest message with GET, subscribe with Observe."""

from adapters.coap.adapter import CoAPAdapter

__all__ = ["CoAPAdapter"]
