-- Workspaces own keys, deployments and one RunPod credential. `generation` is bumped in the same
-- transaction as any change that the ext_authz caches depend on, so replicas can tell stale state.
CREATE TABLE workspaces (
    id              text PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    plan            text NOT NULL CHECK (plan IN ('starter', 'pro', 'team', 'enterprise')),
    rpm_default     integer CHECK (rpm_default > 0),
    rpm_ceiling     integer CHECK (rpm_ceiling > 0),
    spend_limit_usd numeric(14, 6) CHECK (spend_limit_usd >= 0),
    generation      bigint NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Only a SHA-256 digest of each gateway key is kept; the key itself is shown once at creation.
CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    workspace_id text NOT NULL REFERENCES workspaces (id),
    name         text NOT NULL DEFAULT '',
    key_hash     bytea NOT NULL UNIQUE,
    key_hint     text NOT NULL,
    rpm_limit    integer CHECK (rpm_limit > 0),
    generation   bigint NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_workspace ON api_keys (workspace_id);

-- The customer's RunPod key, AES-256-GCM encrypted under master key `key_version`, the workspace id
-- bound as associated data. `rejected_at` is set when RunPod refused it, so requests fail fast.
CREATE TABLE runpod_credentials (
    workspace_id text PRIMARY KEY REFERENCES workspaces (id),
    account_id   text NOT NULL,
    key_version  integer NOT NULL,
    nonce        bytea NOT NULL,
    ciphertext   bytea NOT NULL,
    linked_at    timestamptz NOT NULL DEFAULT now(),
    rejected_at  timestamptz
);

CREATE TABLE deployments (
    id            text PRIMARY KEY,
    workspace_id  text NOT NULL REFERENCES workspaces (id),
    public_name   text NOT NULL,
    model         text NOT NULL,
    modality      text NOT NULL CHECK (modality IN ('llm', 'embedding', 'image', 'speech', 'voice')),
    destination   text NOT NULL CHECK (destination IN ('runpod', 'managed')),
    account_id    text,
    template_id   text,
    endpoint_id   text,
    state         text NOT NULL CHECK (state IN ('creating', 'ready', 'deleting', 'deleted', 'failed')),
    options       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
-- A public model name is unique among a workspace's live deployments; retries of a crashed deploy find
-- the row they started instead of creating a second one.
CREATE UNIQUE INDEX deployments_live_name ON deployments (workspace_id, public_name) WHERE state <> 'deleted';
