-- A downgrade waits for the next billing period (issue 18): the plan it moves to and the moment it takes
-- effect (the start of that period, UTC). Both NULL when no change is pending. Readers work out the plan
-- in force by comparing the time, so nothing has to run at the boundary; the control plane folds a
-- change whose time has passed into `plan` the next time it touches the workspace.
ALTER TABLE workspaces
    ADD COLUMN pending_plan text CHECK (pending_plan IN ('starter', 'pro', 'team', 'enterprise')),
    ADD COLUMN pending_plan_at timestamptz,
    ADD CONSTRAINT workspaces_pending_plan_pair CHECK ((pending_plan IS NULL) = (pending_plan_at IS NULL));

-- Tiers: Flex scales to zero; Active keeps `min_workers` warm (managed destination only) for a flat
-- monthly base fee, fixed at deploy time from control/tier_fees.json. `billed_from` is when the
-- deployment first served: an Active one's fee is prorated per day from then until `deleted_at`.
ALTER TABLE deployments
    ADD COLUMN tier text NOT NULL DEFAULT 'flex' CHECK (tier IN ('flex', 'active')),
    ADD COLUMN min_workers integer NOT NULL DEFAULT 0 CHECK (min_workers >= 0),
    ADD COLUMN base_fee_usd_month numeric(14, 6) NOT NULL DEFAULT 0 CHECK (base_fee_usd_month >= 0),
    ADD COLUMN billed_from timestamptz,
    ADD CONSTRAINT deployments_active_is_managed CHECK (tier = 'flex' OR destination = 'managed');
