"""`gatewayctl`: the operator's command line. Every command accepts --json and then prints exactly one
JSON object; errors go to stderr with a non-zero exit status."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from control import credentials, deployments, keys, pricing, spend, stack, usage, workspaces
from control.context import Context, open_context
from control.crypto import CryptoError
from control.env import SettingsError
from control.errors import ControlError
from control.migrate import apply_migrations
from control.plans import PLANS
from control.settings import ControlSettings

Handler = Callable[[Context, argparse.Namespace], Any]


def _read_secret(prompt: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().strip()


def _usd_or_none(text: str) -> Decimal | None:
    return None if text.lower() == "none" else Decimal(text)


def _deploy(ctx: Context, a: argparse.Namespace) -> Any:
    opts = deployments.DeployOptions(
        model=a.model, modality=a.modality, public_name=a.name or a.model,
        gpu_pools=tuple(a.gpu or ("ADA_24",)), workers_max=a.workers_max,
        idle_timeout_s=a.idle_timeout, wait_timeout_s=a.wait_timeout, destination=a.destination,
    )
    if a.dry_run:
        return deployments.dry_run(ctx, a.workspace, opts, a.utilization)
    return deployments.deploy(ctx, a.workspace, opts, price=pricing.explicit(a.price_input, a.price_output))


COMMANDS: dict[tuple[str, ...], Handler] = {
    ("workspace", "create"): lambda ctx, a: workspaces.create(ctx, a.name, a.plan),
    ("workspace", "set-plan"): lambda ctx, a: workspaces.set_plan(
        ctx, a.workspace, a.plan, a.rpm_default, a.rpm_ceiling
    ),
    ("keys", "create"): lambda ctx, a: keys.create(ctx, a.workspace, a.name, a.rpm),
    ("keys", "list"): lambda ctx, a: {"keys": keys.list_keys(ctx, a.workspace)},
    ("keys", "revoke"): lambda ctx, a: keys.revoke(ctx, a.key_id),
    ("keys", "set-limit"): lambda ctx, a: keys.set_limit(ctx, a.key_id, a.rpm),
    ("runpod", "link"): lambda ctx, a: credentials.link(ctx, a.workspace, _read_secret("RunPod API key: ")),
    ("runpod", "unlink"): lambda ctx, a: credentials.unlink(ctx, a.workspace),
    ("workspace", "set-spend-limit"): lambda ctx, a: spend.set_limit(ctx, a.workspace, a.usd),
    ("prices", "set"): lambda ctx, a: pricing.set_price(ctx, a.deployment, a.input, a.output),
    ("usage",): lambda ctx, a: usage.report(ctx, a.workspace, ctx.settings.state_dir / "charts"),
    ("master-key", "rotate"): lambda ctx, a: credentials.rotate_master_key(ctx, a.retire_old),
    ("deploy",): _deploy,
    ("status",): lambda ctx, a: deployments.status(ctx, a.deployment),
    ("teardown",): lambda ctx, a: deployments.teardown(ctx, a.deployment),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    parser = argparse.ArgumentParser(prog="gatewayctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="run the whole stack in the foreground")
    up.add_argument("--demo", action="store_true", help="start the RunPod simulator and seed a demo")

    sub.add_parser("reload", parents=[common], help="validate envoy.yaml and hot-restart the running Envoy")
    sub.add_parser("migrate", parents=[common], help="apply pending database migrations")

    ws = sub.add_parser("workspace", help="workspaces and plans").add_subparsers(dest="action", required=True)
    p = ws.add_parser("create", parents=[common])
    p.add_argument("name")
    p.add_argument("--plan", choices=list(PLANS), required=True)
    p = ws.add_parser("set-plan", parents=[common])
    p.add_argument("workspace")
    p.add_argument("plan", choices=list(PLANS))
    p.add_argument("--rpm-default", type=int)
    p.add_argument("--rpm-ceiling", type=int)

    p = ws.add_parser("set-spend-limit", parents=[common], help="monthly cap on managed inference spend")
    p.add_argument("workspace")
    p.add_argument("usd", type=_usd_or_none, help="US dollars per month, or `none`")

    pr = sub.add_parser("prices", help="per-token prices of managed deployments").add_subparsers(
        dest="action", required=True)
    p = pr.add_parser("set", parents=[common])
    p.add_argument("deployment", help="the managed deployment's id (prices belong to one deployment)")
    p.add_argument("--input", type=Decimal, required=True, help="USD per million input tokens")
    p.add_argument("--output", type=Decimal, required=True, help="USD per million output tokens")

    ks = sub.add_parser("keys", help="gateway API keys").add_subparsers(dest="action", required=True)
    p = ks.add_parser("create", parents=[common], help="mint a key (printed once)")
    p.add_argument("workspace")
    p.add_argument("--name", default="")
    p.add_argument("--rpm", type=int, help="requests per minute (default: the plan's)")
    p = ks.add_parser("list", parents=[common])
    p.add_argument("workspace")
    p = ks.add_parser("revoke", parents=[common])
    p.add_argument("key_id")
    p = ks.add_parser("set-limit", parents=[common])
    p.add_argument("key_id")
    p.add_argument("rpm", type=int)

    rp = sub.add_parser("runpod", help="the workspace's RunPod key").add_subparsers(dest="action", required=True)
    p = rp.add_parser("link", parents=[common], help="link a RunPod key read from stdin")
    p.add_argument("workspace")
    p = rp.add_parser("unlink", parents=[common])
    p.add_argument("workspace")

    mk = sub.add_parser("master-key", help="the master keyring").add_subparsers(dest="action", required=True)
    p = mk.add_parser("rotate", parents=[common], help="add a master-key version and re-seal every stored key")
    p.add_argument("--retire-old", action="store_true", help="then drop the older versions")

    p = sub.add_parser("deploy", parents=[common], help="deploy a model on the workspace's RunPod")
    p.add_argument("workspace")
    p.add_argument("--model", required=True, help="Hugging Face model id")
    p.add_argument("--modality", required=True, choices=["llm", "embedding", "image", "speech", "voice"])
    p.add_argument("--name", help="the model name clients send (default: --model)")
    p.add_argument("--destination", choices=["runpod", "managed"], default="runpod",
                   help="the workspace's own RunPod account (default) or the managed destination")
    p.add_argument("--gpu", action="append", help="GPU pool, in order of preference (default ADA_24)")
    p.add_argument("--workers-max", type=int, default=3)
    p.add_argument("--idle-timeout", type=int, default=5, help="seconds before an idle worker stops")
    p.add_argument("--wait-timeout", type=float, default=600, help="seconds to wait for the endpoint")
    p.add_argument("--dry-run", action="store_true", help="print what would be created and its projected cost")
    p.add_argument("--price-input", type=Decimal, help="managed: USD per million input tokens (default: catalog)")
    p.add_argument("--price-output", type=Decimal, help="managed: USD per million output tokens (default: catalog)")
    p.add_argument("--utilization", type=float, default=0.1,
                   help="with --dry-run: fraction of the month a worker is busy (default 0.1)")
    p = sub.add_parser("usage", parents=[common], help="usage and cost: this billing period and the two before")
    p.add_argument("workspace")
    for name in ("status", "teardown"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("deployment")
    return parser


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
        return
    if isinstance(result, dict) and "periods" in result:
        print(usage.render_text(result))
        return
    if isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, list):
                for item in value:
                    print(json.dumps(item, default=str))
            else:
                print(f"{key}: {value}")
    if isinstance(result, dict) and "key" in result:
        print("Store this key now: it is not shown again.", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        if args.command == "up":
            return stack.up(ControlSettings.from_env(use_runtime=False), args.demo)
        if args.command == "migrate":
            settings = ControlSettings.from_env()
            if not settings.database_url:
                raise ControlError("not_configured", "set DATABASE_URL")
            _print({"applied": apply_migrations(settings.database_url)}, as_json)
            return 0
        if args.command == "reload":
            _print(stack.request_reload(ControlSettings.from_env()), as_json)
            return 0
        handler = COMMANDS[tuple(x for x in (args.command, getattr(args, "action", None)) if x)]
        with open_context(ControlSettings.from_env()) as ctx:
            _print(handler(ctx, args), as_json)
        return 0
    except (ControlError, CryptoError, SettingsError) as exc:
        code = getattr(exc, "code", "invalid_settings" if isinstance(exc, SettingsError) else "crypto_error")
        if as_json:
            print(json.dumps({"error": {"code": code, "message": str(exc)}}), file=sys.stderr)
        else:
            print(f"error ({code}): {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
