"""Seeds the demo that `gatewayctl up --demo` serves: a Pro workspace with the simulator's RunPod key
linked, a chat model and an embedding model deployed, and a gateway API key in `demo.env`.

Seeding is idempotent: on the same state directory a second start reuses the workspace, the deployments
(the simulator keeps its endpoints in the state directory) and the key `demo.env` already holds, and
revokes every other demo key, so exactly one is active."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control import credentials, deployments, keys, workspaces
from control.context import Context, open_context
from control.errors import ControlError
from control.settings import ControlSettings
from extauth.ratelimit import burst

WORKSPACE = "demo"
PLAN = "pro"
KEY_NAME = "demo"
CHAT_MODEL = "demo-chat"
EMBEDDING_MODEL = "demo-embedding"
_MODELS = (
    deployments.DeployOptions("Qwen/Qwen2.5-0.5B-Instruct", "llm", CHAT_MODEL, wait_timeout_s=30),
    deployments.DeployOptions("BAAI/bge-small-en-v1.5", "embedding", EMBEDDING_MODEL, wait_timeout_s=30),
)


def read_env(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _deployments(ctx: Context, ws_id: str, say: Callable[[str], None]) -> None:
    live = {d["name"]: d["id"] for d in deployments.list_deployments(ctx, ws_id)}
    for opts in _MODELS:
        dep_id = live.get(opts.public_name)
        if dep_id is not None and deployments.status(ctx, dep_id)["serves"]:
            say(f"demo       {opts.public_name}: reusing deployment {dep_id}")
            continue
        if dep_id is not None:  # its endpoint is gone (the simulator's state was lost): replace it
            deployments.teardown(ctx, dep_id)
        say(f"demo       {opts.public_name}: deploying {opts.model} ({opts.modality})")
        deployments.deploy(ctx, ws_id, opts, progress=lambda m: say(f"             {m}"))


def _key(ctx: Context, ws_id: str, previous: str | None, say: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The demo's one active key: the one demo.env holds if it is still active, else a new one. Every
    other demo key (earlier runs') is revoked."""
    kept = keys.find_active(ctx, ws_id, previous) if previous else None
    if previous is not None and kept is not None:
        api_key = previous
        say(f"demo       reusing key {kept} from demo.env")
    else:
        minted = keys.create(ctx, ws_id, name=KEY_NAME)
        api_key, kept = minted["key"], minted["id"]
        say(f"demo       new key {kept}")
    listed = keys.list_keys(ctx, ws_id)
    old = [k["id"] for k in listed if k["name"] == KEY_NAME and not k["revoked"] and k["id"] != kept]
    for key_id in old:
        keys.revoke(ctx, key_id)
    if old:
        say(f"demo       revoked the earlier demo key{'s' if len(old) > 1 else ''} {', '.join(old)}")
    return api_key, next(k for k in listed if k["id"] == kept)


def seed(settings: ControlSettings, runpod_key: str, say: Callable[[str], None]) -> Path:
    path = settings.state_dir / "demo.env"
    with open_context(settings) as ctx:
        try:
            ws = workspaces.resolve(ctx, WORKSPACE)
        except ControlError:
            ws = workspaces.create(ctx, WORKSPACE, PLAN)
        # The simulator's account gets a fresh key every start: link it again (same account: a rotation).
        credentials.link(ctx, ws["id"], runpod_key)
        _deployments(ctx, ws["id"], say)
        api_key, key = _key(ctx, ws["id"], read_env(path).get("OPENAI_API_KEY"), say)

    listen = f"http://{settings.listen}/v1"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(
            f"OPENAI_BASE_URL={listen}\nOPENAI_API_KEY={api_key}\n"
            f"DEMO_CHAT_MODEL={CHAT_MODEL}\nDEMO_EMBEDDING_MODEL={EMBEDDING_MODEL}\n"
        )
    limit = key["rpm_limit"]
    say(f"demo       workspace {ws['name']!r} ({ws['id']}), plan {ws['plan']}; models {CHAT_MODEL}, {EMBEDDING_MODEL}")
    say(f"           key {key['id']}: {limit} requests/min, bursts of {burst(limit)}, then one per "
        f"{60 / limit:.2g} s; beyond that 429. Raise it (up to {ws['rpm_ceiling']} on {ws['plan']}):"
        f" gatewayctl keys set-limit {key['id']} N")
    say(f"           credentials in {path}; call the demo from a second terminal: make demo-client")
    return path


def call(settings: ControlSettings) -> int:
    """`make demo-client`: one chat completion and one embedding through the running demo, with the
    OpenAI SDK and nothing but demo.env (the SDK is a development dependency: `make install` has it)."""
    import openai

    path = settings.state_dir / "demo.env"
    env = read_env(path)
    if "OPENAI_API_KEY" not in env:
        print(f"no demo credentials in {path}: start the demo with `make run` (it holds its terminal; "
              "run this in a second one)", file=sys.stderr)
        return 1
    client = openai.OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"], max_retries=0)
    try:
        chat = client.chat.completions.create(model=env["DEMO_CHAT_MODEL"],
                                              messages=[{"role": "user", "content": "Hello there"}])
        embedding = client.embeddings.create(model=env["DEMO_EMBEDDING_MODEL"], input="Hello there")
    except openai.APIConnectionError:
        print(f"the gateway at {env['OPENAI_BASE_URL']} is not answering: is `make run` still running?",
              file=sys.stderr)
        return 1
    except openai.APIStatusError as exc:
        print(f"the gateway answered {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1
    usage = chat.usage
    print(f"{env['DEMO_CHAT_MODEL']}: {chat.choices[0].message.content!r}"
          + (f" ({usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens)" if usage else ""))
    print(f"{env['DEMO_EMBEDDING_MODEL']}: a vector of {len(embedding.data[0].embedding)} numbers")
    return 0


if __name__ == "__main__":
    sys.exit(call(ControlSettings.from_env()))
