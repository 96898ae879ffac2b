-- A workspace's Hugging Face token for gated models, sealed like its RunPod key: AES-256-GCM under master
-- key `key_version`, with the workspace id and the purpose ("hf-token") bound as associated data. Only
-- deploys open it, to put it in the RunPod template's env; nothing shows it back.
CREATE TABLE hf_credentials (
    workspace_id text PRIMARY KEY REFERENCES workspaces (id),
    key_version  integer NOT NULL,
    nonce        bytea NOT NULL,
    ciphertext   bytea NOT NULL,
    set_at       timestamptz NOT NULL DEFAULT now()
);
