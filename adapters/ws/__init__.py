"""WebSocket adapter: the upgrade path is the topic; frames publish, messages are delivered."""

from adapters.ws.adapter import WSAdapter

__all__ = ["WSAdapter"]
