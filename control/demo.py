"""Seeds the demo that `gatewayctl up --demo` serves: a Pro workspace with the simulator's RunPod key
linked, a chat model and an embedding model deployed, and a fresh gateway API key in `demo.env`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from control import credentials, deployments, keys, workspaces
from control.context import open_context
from control.errors import ControlError
from control.settings import ControlSettings

WORKSPACE = "demo"
CHAT_MODEL = "demo-chat"
EMBEDDING_MODEL = "demo-embedding"
_MODELS = (
    deployments.DeployOptions("Qwen/Qwen2.5-0.5B-Instruct", "llm", CHAT_MODEL, wait_timeout_s=30),
    deployments.DeployOptions("BAAI/bge-small-en-v1.5", "embedding", EMBEDDING_MODEL, wait_timeout_s=30),
)


def seed(settings: ControlSettings, runpod_key: str, say: Callable[[str], None]) -> Path:
    with open_context(settings) as ctx:
        try:
            ws = workspaces.resolve(ctx, WORKSPACE)
        except ControlError:
            ws = workspaces.create(ctx, WORKSPACE, "pro")
        # The simulator starts empty every time: link its key again and replace deployments whose
        # endpoints it no longer knows.
        credentials.link(ctx, ws["id"], runpod_key)
        rows = ctx.db.execute(
            "SELECT id, public_name FROM deployments WHERE workspace_id = %s AND state <> 'deleted'", (ws["id"],)
        ).fetchall()
        live = {name: dep_id for dep_id, name in rows}
        for opts in _MODELS:
            dep_id = live.get(opts.public_name)
            if dep_id is not None and deployments.status(ctx, dep_id)["serves"]:
                continue
            if dep_id is not None:
                deployments.teardown(ctx, dep_id)
            deployments.deploy(ctx, ws["id"], opts, progress=lambda _m: None)
        api_key = keys.create(ctx, ws["id"], name="demo")["key"]

    listen = f"http://{settings.listen}/v1"
    path = settings.state_dir / "demo.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(
            f"OPENAI_BASE_URL={listen}\nOPENAI_API_KEY={api_key}\n"
            f"DEMO_CHAT_MODEL={CHAT_MODEL}\nDEMO_EMBEDDING_MODEL={EMBEDDING_MODEL}\n"
        )
    say(f"demo       workspace {WORKSPACE!r}: models {CHAT_MODEL}, {EMBEDDING_MODEL}; credentials in {path}")
    say(
        f"           try: set -a; . {path}; set +a; curl -s $OPENAI_BASE_URL/chat/completions"
        ' -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json"'
        f' -d \'{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"Hello there"}}]}}\''
    )
    return path
