"""The meter's tables (control/migrations/0002_usage.sql): each batch of lines becomes one transaction
holding its usage rows, its rejected lines and the new read position of the log, so the position on
record always matches the rows on record, whenever the meter dies.

Rows are COPYed (binary) into a session temp table and moved with one INSERT ... SELECT, which prices
them and drops request ids already recorded: a replayed line changes nothing. On a 2-core machine this
is about twice as fast as executemany of an INSERT per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import psycopg

from control.context import DB
from meter.parse import UsageRecord
from meter.tail import Position

_REQUIRED_TABLES = ("usage_events", "meter_offsets", "meter_rejects", "deployment_prices", "workspace_spend")
_REJECT_TEXT_CHARS = 8192  # enough to see what went wrong; a rejected line can be up to 1 MiB

_COLUMNS = ", ".join(UsageRecord._fields)
_CREATE_BATCH_TABLE = (
    f"CREATE TEMP TABLE meter_batch ON COMMIT DELETE ROWS AS SELECT {_COLUMNS} FROM usage_events WITH NO DATA"
)
_BATCH_TYPES = """
SELECT format_type(a.atttypid, a.atttypmod)
FROM unnest(%s::text[]) WITH ORDINALITY AS c (name, n)
JOIN pg_attribute a ON a.attrelid = 'meter_batch'::regclass AND a.attname = c.name
ORDER BY c.n
"""
_COPY_BATCH = f"COPY meter_batch ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
# Managed destinations are priced per token or per unit, by the deployment's own price (deployment_prices);
# bring-your-own RunPod traffic is paid by the customer to RunPod, so it is recorded at cost 0. The
# month's managed spend of each workspace (workspace_spend, what the spend limit is checked against)
# grows in the same statement by what was newly recorded, so a replayed line adds nothing to it either.
_MONTH_OF = "(extract(year FROM {t} AT TIME ZONE 'UTC') * 100 + extract(month FROM {t} AT TIME ZONE 'UTC'))::integer"
_INSERT_USAGE = f"""
WITH recorded AS (
    INSERT INTO usage_events ({_COLUMNS}, cost_usd)
    SELECT {", ".join("b." + column for column in UsageRecord._fields)},
           CASE WHEN b.destination = 'runpod' THEN 0
                WHEN p.unit = 'token' THEN
                    coalesce(b.prompt_tokens * p.input_usd_per_mtok + b.completion_tokens * p.output_usd_per_mtok,
                             0) / 1000000
                -- images, audio seconds, characters: only in the unit the deployment is priced in
                WHEN p.unit = b.unit THEN b.quantity::numeric * p.usd_per_unit
                ELSE 0
           END
    FROM meter_batch b
    LEFT JOIN deployment_prices p ON p.deployment_id = b.deployment_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING workspace_id, model, status / 100 AS status_class, cost_usd > 0 AS charged,
              prompt_tokens, completion_tokens, destination, start_time, cost_usd
), spent AS (
    INSERT INTO workspace_spend AS s (workspace_id, month, spent_usd)
    SELECT workspace_id, {_MONTH_OF.format(t="coalesce(start_time, now())")}, sum(cost_usd)
    FROM recorded WHERE destination = 'managed' AND workspace_id IS NOT NULL AND cost_usd > 0
    GROUP BY 1, 2 ORDER BY 1, 2  -- one lock order for every meter: two never deadlock
    ON CONFLICT (workspace_id, month) DO UPDATE SET spent_usd = s.spent_usd + excluded.spent_usd
)
SELECT workspace_id, model, status_class, charged, count(*), sum(prompt_tokens), sum(completion_tokens)
FROM recorded GROUP BY workspace_id, model, status_class, charged
"""
_INSERT_REJECT = 'INSERT INTO meter_rejects (log_path, "offset", line, reason) VALUES (%s, %s, %s, %s)'
_SAVE_POSITION = """
INSERT INTO meter_offsets (log_path, inode, "offset", updated_at) VALUES (%s, %s, %s, now())
ON CONFLICT (log_path) DO UPDATE SET inode = excluded.inode, "offset" = excluded."offset", updated_at = now()
"""


class SchemaMissing(Exception):
    pass


class RejectedLine(NamedTuple):
    offset: int
    raw: bytes
    reason: str


class RecordedUsage(NamedTuple):
    """Newly recorded rows of one batch, summed by what the metrics tell apart."""

    workspace_id: str | None
    model: str | None
    status_class: int | None  # 2 for 2xx
    charged: bool  # cost more than 0
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UsageStore:
    def __init__(self, conn: DB) -> None:
        self.conn = conn
        # Binary COPY needs the column types; they are read from the schema rather than restated here.
        self._batch_types = [row[0] for row in conn.execute(_BATCH_TYPES, (list(UsageRecord._fields),))]

    @classmethod
    def connect(cls, database_url: str) -> UsageStore:
        # Waiting for the WAL flush at each commit buys nothing here: a commit lost in a database crash
        # takes its read position with it, and the lines are read again after the reconnect.
        conn = psycopg.connect(database_url, autocommit=True, options="-c synchronous_commit=off")
        try:
            _check_schema(conn)
            conn.execute(_CREATE_BATCH_TABLE)
            return cls(conn)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def load_position(self, log_path: str) -> Position | None:
        row = self.conn.execute('SELECT inode, "offset" FROM meter_offsets WHERE log_path = %s', (log_path,)).fetchone()
        return Position(row[0], row[1]) if row else None

    def write(
        self, log_path: str, end: Position, records: Sequence[UsageRecord], rejects: Sequence[RejectedLine]
    ) -> list[RecordedUsage]:
        """Record one batch; return what it added (rows already there are left alone)."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            recorded: list[RecordedUsage] = []
            if records:
                with cur.copy(_COPY_BATCH) as copy:
                    copy.set_types(self._batch_types)
                    for record in records:
                        copy.write_row(record)
                cur.execute(_INSERT_USAGE)
                recorded = [RecordedUsage(*row) for row in cur.fetchall()]
            if rejects:
                cur.executemany(
                    _INSERT_REJECT,
                    [(log_path, reject.offset, _as_text(reject.raw), reject.reason) for reject in rejects],
                )
            cur.execute(_SAVE_POSITION, (log_path, end.inode, end.offset))
        return recorded


def _check_schema(conn: DB) -> None:
    missing = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NULL", (list(_REQUIRED_TABLES),)
        )
    ]
    if missing:
        raise SchemaMissing(
            f"table(s) {', '.join(missing)} missing from the database: apply the migrations first "
            "(`gatewayctl up` does, or control.migrate.apply_migrations)"
        )


def _as_text(raw: bytes) -> str:
    # PostgreSQL text holds neither invalid UTF-8 nor NUL, and a rejected line may contain both.
    return raw[: _REJECT_TEXT_CHARS * 4].decode("utf-8", "replace").replace("\x00", "\ufffd")[:_REJECT_TEXT_CHARS]
