"""`python -m meter.rotate`: keeps a node's access log bounded where nothing else rotates it (the
Kubernetes pod's log volume), by the rename rotation meter/tail.py follows (README, "Access-log growth").

Every METER_ROTATE_CHECK_S: once the meter has caught up (`gateway_meter_lag_bytes` 0), the file rotated
last time (`<log>.1`) has been read to its end and is deleted; then, if the log is past
METER_ROTATE_BYTES and no `<log>.1` is left, the log is renamed to `<log>.1` and Envoy is told to reopen
it (`POST /reopen_logs` on its admin). A meter that is behind or unreachable holds everything as it is:
nothing is deleted that it may still have to read. Settings: meter.settings.RotateSettings.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import urllib.request
from pathlib import Path

from control.env import SettingsError
from meter.settings import RotateSettings

log = logging.getLogger("meter.rotate")
_LAG = re.compile(r"^gateway_meter_lag_bytes(?:\{[^}]*\})? ([0-9.e+]+)$", re.MULTILINE)


def meter_lag(metrics_url: str) -> float | None:
    """The meter's lag in bytes, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            found = _LAG.search(reply.read().decode())
    except OSError:
        return None
    return float(found[1]) if found else None


def rotate_once(settings: RotateSettings) -> list[str]:
    """One look; what it did ("deleted", "rotated")."""
    done: list[str] = []
    current, rotated = settings.access_log, Path(str(settings.access_log) + ".1")
    if rotated.exists():
        if meter_lag(settings.meter_metrics_url) != 0:
            return done
        rotated.unlink()
        done.append("deleted")
    if current.exists() and current.stat().st_size > settings.rotate_bytes:
        current.rename(rotated)
        request = urllib.request.Request(settings.envoy_admin_url.rstrip("/") + "/reopen_logs", method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass
        done.append("rotated")
    return done


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s meter.rotate %(levelname)s %(message)s")
    try:
        settings = RotateSettings.from_env()
    except SettingsError as err:
        log.error("%s", err)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(settings.check_s):
        try:
            for action in rotate_once(settings):
                log.info("%s %s", action, settings.access_log)
        except OSError as err:
            log.warning("could not rotate %s: %s", settings.access_log, err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
