"""Connection presets: how a client connects, keeps alive, reconnects and waits while offline.

========  ====  ==========  ==============  =============  ===============
preset    MQTT  keep-alive  back-off        offline queue  session kept
========  ====  ==========  ==============  =============  ===============
mobile    5     60 s        1 s to 60 s     100            1 hour
desktop   5     30 s        0.5 s to 30 s   1,000          1 hour
agent     5     120 s       1 s to 300 s    10,000         1 day
server    5     30 s        0.1 s to 10 s   10,000         none
========  ====  ==========  ==============  =============  ===============

- ``mobile``: networks that come and go and a battery: a long keep-alive, patient back-off, a
  small queue (a phone's publishes are few and stale soon), and a session the broker keeps an
  hour so that QoS 1 messages sent while the app was offline arrive on return.
- ``desktop``: a browser-like app on a steady network: reconnect fast.
- ``agent``: an unattended process on a device (a gateway box, a kiosk): it must not hammer a
  gateway that is down (back-off to 5 minutes), and it keeps a day of session and a deep queue.
- ``server``: a backend service: fast reconnects, a deep queue, and no session kept (it
  subscribes again on connect; use shared subscriptions to spread load).

Every field can be given instead of a preset's (``Client(preset="mobile", keepalive=30)``).
MQTT 3.1.1 (``mqtt_version=4``) is available for brokers in between; it renews tokens by
reconnecting, since only MQTT 5 has AUTH.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Preset:
    mqtt_version: int  # 5, or 4 for MQTT 3.1.1
    keepalive: int  # seconds
    backoff_initial: float  # seconds before the first reconnect; doubles up to backoff_max
    backoff_max: float
    offline_queue: int  # publishes that wait for a connection; more raise offline-queue-full
    session_expiry: int  # seconds the broker keeps the session after a disconnect (MQTT 5)


PRESETS = {
    "mobile": Preset(5, 60, 1.0, 60.0, 100, 3600),
    "desktop": Preset(5, 30, 0.5, 30.0, 1000, 3600),
    "agent": Preset(5, 120, 1.0, 300.0, 10_000, 86400),
    "server": Preset(5, 30, 0.1, 10.0, 10_000, 0),
}
