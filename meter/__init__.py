"""The access-log consumer: follows Envoy's JSON access log and records each request's token usage in
PostgreSQL exactly once (`usage_events`), together with the read position of the log, in one
transaction per batch. Run it with `python -m meter`; see meter.settings for its environment."""

from meter.consumer import Meter, follow, run_once
from meter.settings import MeterSettings

__all__ = ["Meter", "MeterSettings", "follow", "run_once"]
