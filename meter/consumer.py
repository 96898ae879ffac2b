"""The meter's loop: read a batch of lines, parse it, record it in one transaction.

While PostgreSQL records one batch, the next one is read and parsed: on two cores the database's work
and the parsing overlap instead of taking turns, which is most of the meter's speed. Batches are still
committed one at a time and in order, each with its own read position.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import psycopg
from opentelemetry.metrics import NoOpMeterProvider

from meter.metrics import MeterMetrics
from meter.parse import Reject, UsageRecord, parse_line
from meter.settings import MeterSettings
from meter.spend_settle import SpendSettlement
from meter.store import RejectedLine, UsageStore
from meter.tail import LogTailer, Position

log = logging.getLogger(__name__)

_RECONNECT_SECONDS = 2.0


class _ParsedBatch(NamedTuple):
    end: Position
    lines: int
    records: list[UsageRecord]
    rejects: list[RejectedLine]


class Meter:
    """One log followed into one database connection. After an error, discard it and open a new one:
    the lines of a failed write are read again from the stored position."""

    def __init__(
        self,
        settings: MeterSettings,
        store: UsageStore,
        tailer: LogTailer,
        metrics: MeterMetrics,
        settlement: SpendSettlement | None,
        writer: ThreadPoolExecutor,
    ) -> None:
        self._settings = settings
        self._log_path = settings.position_key
        self._store = store
        self._tailer = tailer
        self._metrics = metrics
        self._settlement = settlement
        # One thread: the connection is only ever used by one batch at a time, in order.
        self._writer = writer

    @classmethod
    @contextmanager
    def open(cls, settings: MeterSettings, metrics: MeterMetrics | None = None) -> Iterator[Meter]:
        """Resume from the position stored for the log, or start it from the beginning."""
        with ExitStack() as stack:
            store = UsageStore.connect(settings.database_url)
            stack.callback(store.close)
            tailer = LogTailer(settings.access_log, store.load_position(settings.position_key))
            stack.callback(tailer.close)
            settlement = SpendSettlement(settings.redis_url) if settings.redis_url else None
            if settlement is not None:
                stack.callback(settlement.close)
            # Entered last, so it is shut down (its batch finished) before the connection closes.
            writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="meter-writer"))
            yield cls(settings, store, tailer, metrics or MeterMetrics(NoOpMeterProvider()), settlement, writer)

    def step(self) -> int:
        """Record the next batch of complete lines; return how many lines it held (0: none yet)."""
        batch = self._read()
        return 0 if batch is None else self._write(batch)

    def consume_available(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Record batches until no complete line is left or `stop()` says so; return the lines recorded.
        The next batch is parsed while the previous one is being written."""
        total = 0
        writing: Future[int] | None = None
        try:
            while not stop():
                batch = self._read()
                if writing is not None:
                    total += writing.result()
                    writing = None
                if batch is None:
                    break
                writing = self._writer.submit(self._write, batch)
        finally:
            # Never leave a write running into the connection's close; its error, if any, is raised.
            if writing is not None:
                total += writing.result()
        return total

    def _read(self) -> _ParsedBatch | None:
        batch = self._tailer.next_batch(self._settings.batch_lines)
        self._metrics.lag_bytes = self._tailer.lag_bytes
        if batch is None:
            return None
        records: list[UsageRecord] = []
        rejects: list[RejectedLine] = []
        for offset, line in batch.numbered():
            parsed = parse_line(line)
            if isinstance(parsed, Reject):
                rejects.append(RejectedLine(offset, line, parsed.reason))
            else:
                records.append(parsed)
        return _ParsedBatch(batch.end, len(batch.lines), records, rejects)

    def settle_pending(self) -> None:
        """Retry spend releases Redis could not take yet (call only while no batch is being written)."""
        if self._settlement is not None:
            self._settlement.retry(self._store.conn)

    def _write(self, batch: _ParsedBatch) -> int:
        recorded = self._store.write(self._log_path, batch.end, batch.records, batch.rejects)
        self._metrics.record(batch.lines, len(batch.rejects), recorded)
        if self._settlement is not None:
            self._settlement.settle(self._store.conn, batch.records)
        return batch.lines


def run_once(settings: MeterSettings) -> int:
    """Record every complete line the log holds now; return how many lines that was."""
    with Meter.open(settings) as meter:
        return meter.consume_available()


def follow(settings: MeterSettings, stop: threading.Event, metrics: MeterMetrics) -> None:
    """Record lines as they are written until `stop` is set; the batch under way when it is set is
    committed first. A lost database connection is retried, resuming from the stored position, since a
    commit whose acknowledgement was lost may or may not have happened."""
    while not stop.is_set():
        try:
            with Meter.open(settings, metrics) as meter:
                while not stop.is_set():
                    if not meter.consume_available(stop.is_set):
                        meter.settle_pending()
                        stop.wait(settings.poll_seconds)
        except psycopg.OperationalError as err:
            log.warning("database unavailable, retrying in %.0f s: %s", _RECONNECT_SECONDS, err)
            stop.wait(_RECONNECT_SECONDS)
