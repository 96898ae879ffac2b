-- Prices belong to the deployment they price (issue 16): a public name is only unique within one
-- workspace, so the old model-scoped prices applied to every workspace's deployment of that name.
-- Per-million-token prices of a managed deployment; bring-your-own (runpod) traffic is billed by RunPod
-- to the customer and costs 0 here. A managed deployment without a row takes no traffic.
CREATE TABLE deployment_prices (
    deployment_id       text PRIMARY KEY REFERENCES deployments (id),
    input_usd_per_mtok  numeric NOT NULL CHECK (input_usd_per_mtok >= 0),
    output_usd_per_mtok numeric NOT NULL CHECK (output_usd_per_mtok >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Each live managed deployment keeps what it was charged at: its own price if it had one, else the
-- price of its public name (what the meter applied to it until now). Managed deployments that had
-- neither were served at $0; they stay unpriced, and are refused until `gatewayctl prices set`.
INSERT INTO deployment_prices (deployment_id, input_usd_per_mtok, output_usd_per_mtok)
SELECT d.id, coalesce(own.input_usd_per_mtok, named.input_usd_per_mtok),
       coalesce(own.output_usd_per_mtok, named.output_usd_per_mtok)
FROM deployments d
LEFT JOIN model_prices own ON own.scope = 'deployment' AND own.ref = d.id
LEFT JOIN model_prices named ON named.scope = 'model' AND named.ref = d.public_name
WHERE d.destination = 'managed' AND d.state <> 'deleted'
  AND (own.ref IS NOT NULL OR named.ref IS NOT NULL);

DROP TABLE model_prices;

-- Managed spend per workspace and billing month (UTC, YYYYMM), kept by the meter in the transaction
-- that records the rows (only newly recorded rows add to it, so a replayed line adds nothing). The
-- spend limit is checked against it: one row read instead of a month of usage summed.
CREATE TABLE workspace_spend (
    workspace_id text NOT NULL,
    month        integer NOT NULL,
    spent_usd    numeric(18, 9) NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, month)
);

INSERT INTO workspace_spend (workspace_id, month, spent_usd)
SELECT workspace_id, (extract(year FROM start_time AT TIME ZONE 'UTC') * 100
                      + extract(month FROM start_time AT TIME ZONE 'UTC'))::integer, sum(cost_usd)
FROM usage_events
WHERE destination = 'managed' AND workspace_id IS NOT NULL AND start_time IS NOT NULL
GROUP BY 1, 2;
