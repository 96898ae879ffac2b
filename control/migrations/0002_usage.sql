-- Token usage recorded by the meter from Envoy's access log, one row per request. The primary key on
-- request_id is what makes replaying a stretch of the log harmless: a second copy of a line is dropped
-- by INSERT ... ON CONFLICT DO NOTHING. Absent access-log metadata is stored as NULL.
CREATE TABLE usage_events (
    request_id        text PRIMARY KEY,
    start_time        timestamptz,
    workspace_id      text,
    key_id            text,
    deployment_id     text,
    destination       text,
    route             text,
    model             text,
    response_model    text,
    status            integer,
    flags             text,
    prompt_tokens     integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    -- true only for a streamed 200 the client aborted before the usage chunk: the tokens are unknown.
    usage_estimated   boolean NOT NULL DEFAULT false,
    duration_ms       integer,
    ttfb_ms           integer,
    bytes_received    bigint,
    bytes_sent        bigint,
    cost_usd          numeric(18, 9) NOT NULL DEFAULT 0,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_workspace_time ON usage_events (workspace_id, start_time);

-- How far the meter has read each log file. Written in the same transaction as the rows of the lines
-- it covers, so after a crash the meter resumes exactly after the last committed line.
CREATE TABLE meter_offsets (
    log_path   text PRIMARY KEY,
    inode      bigint NOT NULL,
    "offset"   bigint NOT NULL CHECK ("offset" >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Lines the meter could not parse, kept for inspection instead of stopping the meter.
CREATE TABLE meter_rejects (
    id          bigserial PRIMARY KEY,
    log_path    text NOT NULL,
    "offset"    bigint NOT NULL,
    line        text NOT NULL,
    reason      text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Per-million-token prices of managed destinations; a deployment's own price beats its model's.
-- Bring-your-own (runpod) traffic is billed by RunPod to the customer, so it costs 0 here.
CREATE TABLE model_prices (
    scope               text NOT NULL CHECK (scope IN ('model', 'deployment')),
    ref                 text NOT NULL,
    input_usd_per_mtok  numeric NOT NULL CHECK (input_usd_per_mtok >= 0),
    output_usd_per_mtok numeric NOT NULL CHECK (output_usd_per_mtok >= 0),
    PRIMARY KEY (scope, ref)
);
