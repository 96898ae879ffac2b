"""`python -m meter`: follow the access log until SIGTERM or SIGINT, then commit the batch under way
and exit. Migrations are not applied here (the launcher does that); missing tables end it with exit
status 2, as do invalid settings."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from opentelemetry.metrics import NoOpMeterProvider

from control.env import SettingsError
from control.net import EXIT_CANNOT_LISTEN
from control.telemetry import serve_prometheus
from meter.consumer import follow
from meter.metrics import MeterMetrics
from meter.settings import MeterSettings
from meter.store import SchemaMissing


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s meter %(levelname)s %(message)s")
    try:
        settings = MeterSettings.from_env()
    except SettingsError as err:
        print(f"meter: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Only sets a flag: the batch being written is finished and committed before the loop ends.
        signal.signal(signum, lambda *_: stop.set())
    try:
        provider = serve_prometheus(settings.metrics_listen, "gateway-meter") if settings.metrics_listen else None
    except OSError as err:
        print(f"meter: cannot listen on {settings.metrics_listen}: {err.strerror or err}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    print(f"meter following {settings.access_log}", flush=True)
    try:
        follow(settings, stop, MeterMetrics(provider or NoOpMeterProvider()))
    except SchemaMissing as err:
        print(f"meter: {err}", file=sys.stderr)
        return 2
    finally:
        if provider is not None:
            provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
