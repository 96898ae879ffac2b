"""`gatewayctl`: the operator's command line. Every command accepts --json and then prints exactly one
JSON object; errors go to stderr with a non-zero exit status."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from control import credentials, deployments, hf_tokens, keys, pricing, spend, stack, tiers, usage, workspaces
from control.context import Context, open_context
from control.crypto import CryptoError
from control.env import SettingsError
from control.errors import ControlError
from control.migrate import apply_migrations
from control.plans import PLANS
from control.settings import ControlSettings
from control.usage_html import write as write_usage_page
from extauth.ratelimit import burst

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
        max_model_len=a.max_model_len, params_b=a.params, disk_gb=a.disk, init_timeout_s=a.init_timeout,
        tier=a.tier, min_workers=a.min_workers,
    )
    if a.dry_run:
        plan = deployments.dry_run(ctx, a.workspace, opts, a.utilization)
        if a.json:
            return plan
        print(deployments.render_dry_run(plan))
        return None
    return deployments.deploy(ctx, a.workspace, opts, price=pricing.explicit(
        a.price_input, a.price_output, a.price_per_unit, a.modality))


def _usage(ctx: Context, a: argparse.Namespace) -> Any:
    result = usage.report(ctx, a.workspace, ctx.settings.state_dir / "charts")
    if a.html:
        name = workspaces.resolve(ctx, a.workspace)["name"]
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        write_usage_page(a.html, result, name, stamp)
        result["html"] = str(a.html)
    return result


COMMANDS: dict[tuple[str, ...], Handler] = {
    ("workspace", "list"): lambda ctx, a: {"workspaces": workspaces.list_all(ctx)},
    ("workspace", "show"): lambda ctx, a: workspaces.show(ctx, a.workspace),
    ("workspace", "create"): lambda ctx, a: workspaces.create(ctx, a.name, a.plan),
    ("workspace", "set-plan"): lambda ctx, a: workspaces.set_plan(
        ctx, a.workspace, a.plan, a.rpm_default, a.rpm_ceiling, a.now
    ),
    ("workspace", "cancel-plan-change"): lambda ctx, a: workspaces.cancel_plan_change(ctx, a.workspace),
    ("keys", "create"): lambda ctx, a: keys.create(ctx, a.workspace, a.name, a.rpm),
    ("keys", "list"): lambda ctx, a: {"keys": keys.list_keys(ctx, a.workspace)},
    ("keys", "revoke"): lambda ctx, a: keys.revoke(ctx, a.key_id),
    ("keys", "set-limit"): lambda ctx, a: keys.set_limit(ctx, a.key_id, a.rpm),
    ("runpod", "link"): lambda ctx, a: credentials.link(ctx, a.workspace, _read_secret("RunPod API key: ")),
    ("runpod", "unlink"): lambda ctx, a: credentials.unlink(ctx, a.workspace),
    ("hf-token", "set"): lambda ctx, a: hf_tokens.set_token(ctx, a.workspace, _read_secret("Hugging Face token: ")),
    ("hf-token", "clear"): lambda ctx, a: hf_tokens.clear_token(ctx, a.workspace),
    ("workspace", "set-spend-limit"): lambda ctx, a: spend.set_limit(ctx, a.workspace, a.usd),
    ("prices", "set"): lambda ctx, a: pricing.set_price(
        ctx, deployments.find(ctx, a.deployment, a.workspace), a.input, a.output, a.unit, a.usd
    ),
    ("usage",): _usage,
    ("master-key", "rotate"): lambda ctx, a: credentials.rotate_master_key(ctx, a.retire_old),
    ("deploy",): _deploy,
    ("status",): lambda ctx, a: deployments.status(ctx, a.deployment, a.workspace),
    ("teardown",): lambda ctx, a: deployments.teardown(ctx, a.deployment, a.workspace),
    ("deployments", "list"): lambda ctx, a: {"deployments": deployments.list_deployments(ctx, a.workspace, a.all)},
}


WS = "workspace name or id"
Formatter = argparse.RawDescriptionHelpFormatter


def _doc(summary: str, *examples: str, about: str = "") -> dict[str, Any]:
    """A subcommand's help: its one line in the parent's list, and a --help page with examples."""
    description = summary[0].upper() + summary[1:] + "."
    return {
        "help": summary,
        "description": f"{description}\n\n{about}" if about else description,
        "epilog": "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None,
        "formatter_class": Formatter,
    }


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    parser = argparse.ArgumentParser(
        prog="gatewayctl", description=__doc__, formatter_class=Formatter,
        epilog="A first hour:\n"
        "  gatewayctl workspace create acme --plan pro\n"
        "  gatewayctl keys create acme --name backend        # prints the key once\n"
        "  gatewayctl runpod link acme < runpod-key.txt\n"
        "  gatewayctl deploy acme --model Qwen/Qwen2.5-0.5B-Instruct --modality llm --name chat\n"
        "  gatewayctl status chat --workspace acme\n"
        "Every command has its own --help with examples (gatewayctl keys create --help).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", parents=[common], **_doc(
        "run the whole stack in the foreground", "gatewayctl up --demo",
        "GATEWAY_LISTEN=127.0.0.1:8081 GATEWAY_ADMIN=127.0.0.1:9902 gatewayctl up",
        about="Envoy, ext_authz, the meter and, unless DATABASE_URL / REDIS_URL are set, an embedded\n"
        "PostgreSQL and Redis under $GATEWAY_STATE_DIR. It holds the terminal: run other commands in a\n"
        "second one. Ctrl-C stops everything, Envoy first."))
    up.add_argument("--demo", action="store_true",
                    help="start the RunPod simulator and seed (or reuse) the demo workspace, models and key")

    sub.add_parser("reload", parents=[common], **_doc(
        "validate envoy.yaml and hot-restart the running Envoy", "gatewayctl reload",
        about="A file that does not validate is refused and the running config keeps serving."))
    sub.add_parser("migrate", parents=[common], **_doc(
        "apply pending database migrations", "DATABASE_URL=postgresql://... gatewayctl migrate",
        about="`gatewayctl up` does this on start."))

    ws = sub.add_parser("workspace", **_doc("workspaces, plans and spend caps")).add_subparsers(
        dest="action", required=True, metavar="ACTION")
    ws.add_parser("list", parents=[common], **_doc(
        "list every workspace with its plan, active keys and live deployments", "gatewayctl workspace list"))
    p = ws.add_parser("show", parents=[common], **_doc(
        "one workspace: plan, key limits, spend cap, RunPod link", "gatewayctl workspace show demo"))
    p.add_argument("workspace", help=WS)
    p = ws.add_parser("create", parents=[common], **_doc(
        "create a workspace on a plan", "gatewayctl workspace create acme --plan pro",
        about="Plans (a key's requests per minute by default, its burst, and the most it may be given):\n" + "\n".join(
            f"  {n:<11} {pl.rpm_default}/min, burst {burst(pl.rpm_default)}, up to {pl.rpm_ceiling}/min"
            f"{'' if pl.can_mint_keys else '; no API keys'}{'' if pl.can_deploy else '; no deploys'}"
            f"{'' if pl.byoc_allowed else '; no own RunPod account'}"
            for n, pl in PLANS.items())))
    p.add_argument("name", help="a unique name, 1 to 100 characters")
    p.add_argument("--plan", choices=list(PLANS), required=True, help="see the plans above")
    p = ws.add_parser("set-plan", parents=[common], **_doc(
        "change a workspace's plan: upgrades at once, downgrades at the next billing period",
        "gatewayctl workspace set-plan acme team",
        "gatewayctl workspace set-plan acme starter         # pending until the 1st of next month, UTC",
        "gatewayctl workspace set-plan acme starter --now   # operator: applies at once",
        "gatewayctl workspace set-plan acme enterprise --rpm-default 20000 --rpm-ceiling 50000",
        about="The billing period is the calendar month in UTC. An upgrade (or the same plan) applies on the\n"
        "next request and drops a pending downgrade. A downgrade is recorded as pending (pending_plan and\n"
        "pending_plan_effective_at) and takes effect at the start of the next period on every gateway,\n"
        "with the lower plan's key ceilings and bring-your-own-RunPod rule; `cancel-plan-change` drops it."))
    p.add_argument("workspace", help=WS)
    p.add_argument("plan", choices=list(PLANS), help="the new plan")
    p.add_argument("--now", action="store_true", help="apply a downgrade at once instead of at the next period")
    p.add_argument("--rpm-default", type=int, help="enterprise only: a new key's requests per minute")
    p.add_argument("--rpm-ceiling", type=int, help="enterprise only: the most a key may be given")

    p = ws.add_parser("cancel-plan-change", parents=[common], **_doc(
        "drop a pending downgrade", "gatewayctl workspace cancel-plan-change acme"))
    p.add_argument("workspace", help=WS)

    p = ws.add_parser("set-spend-limit", parents=[common], **_doc(
        "monthly cap on managed inference spend", "gatewayctl workspace set-spend-limit acme 250",
        "gatewayctl workspace set-spend-limit acme none"))
    p.add_argument("workspace", help=WS)
    p.add_argument("usd", type=_usd_or_none, help="US dollars per month, or `none`")

    pr = sub.add_parser("prices", **_doc("per-token prices of managed deployments")).add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = pr.add_parser("set", parents=[common], **_doc(
        "set a managed deployment's price per million tokens",
        "gatewayctl prices set dep_0123 --input 0.15 --output 0.60",
        "gatewayctl prices set chat --workspace acme --input 0.15 --output 0.60",
        "gatewayctl prices set painter --workspace acme --unit image --usd 0.04",
        about="Prices belong to one deployment: two workspaces' deployments of the same public name are priced\n"
        "independently. `deployments list WS` shows the ids. Each modality has its unit: token (llm,\n"
        "embedding: --input/--output per million), image, audio_second (voice), character (speech: --usd each)."))
    p.add_argument("deployment", help="the managed deployment's id, or its public name (with --workspace when "
                   "several workspaces use it)")
    p.add_argument("--workspace", "-w", help="the workspace whose deployment DEPLOYMENT names")
    p.add_argument("--input", type=Decimal, help="USD per million input tokens")
    p.add_argument("--output", type=Decimal, help="USD per million output tokens")
    p.add_argument("--unit", choices=["token", "image", "audio_second", "character"],
                   help="the unit priced (default: the deployment's modality's, which it must be)")
    p.add_argument("--usd", type=Decimal, help="USD per image, audio second or character")

    ks = sub.add_parser("keys", **_doc("gateway API keys")).add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = ks.add_parser("create", parents=[common], **_doc(
        "mint a key (printed once)", "gatewayctl keys create acme --name backend",
        "gatewayctl keys create acme --name batch --rpm 100"))
    p.add_argument("workspace", help=WS)
    p.add_argument("--name", default="", help="a label to recognise the key by")
    p.add_argument("--rpm", type=int, help="requests per minute (default: the plan's)")
    p = ks.add_parser("list", parents=[common], **_doc(
        "list a workspace's keys with their limit and last use", "gatewayctl keys list acme",
        about="rpm_limit is the key's requests per minute and burst what it may send at once; last_used_at\n"
        "is the start of its latest metered request."))
    p.add_argument("workspace", help=WS)
    p = ks.add_parser("revoke", parents=[common], **_doc(
        "revoke a key: refused on its next request", "gatewayctl keys revoke key_0123"))
    p.add_argument("key_id", help="the key's id (`keys list` shows them)")
    p = ks.add_parser("set-limit", parents=[common], **_doc(
        "change a key's requests per minute, up to the plan's ceiling", "gatewayctl keys set-limit key_0123 800"))
    p.add_argument("key_id", help="the key's id (`keys list` shows them)")
    p.add_argument("rpm", type=int, help="requests per minute")

    rp = sub.add_parser("runpod", **_doc("the workspace's RunPod key")).add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = rp.add_parser("link", parents=[common], **_doc(
        "link a RunPod key read from stdin", "gatewayctl runpod link acme            # asks for it, no echo",
        "gatewayctl runpod link acme < runpod-key.txt",
        about="The key is validated live, stored sealed and never shown again."))
    p.add_argument("workspace", help=WS)
    p = rp.add_parser("unlink", parents=[common], **_doc(
        "forget the workspace's RunPod key", "gatewayctl runpod unlink acme"))
    p.add_argument("workspace", help=WS)

    hf = sub.add_parser("hf-token", **_doc("the workspace's Hugging Face token, for gated models")).add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = hf.add_parser("set", parents=[common], **_doc(
        "store a Hugging Face token read from stdin (sealed, never shown)",
        "gatewayctl hf-token set acme < hf-token.txt",
        about="Reads the token from stdin (a prompt on a terminal), seals it with the master keyring and gives\n"
        "it to the workers of later deploys as HF_TOKEN."))
    p.add_argument("workspace", help=WS)
    p = hf.add_parser("clear", parents=[common], **_doc(
        "forget the workspace's Hugging Face token", "gatewayctl hf-token clear acme"))
    p.add_argument("workspace", help=WS)

    mk = sub.add_parser("master-key", **_doc("the master keyring")).add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = mk.add_parser("rotate", parents=[common], **_doc(
        "add a master-key version and re-seal every stored key", "gatewayctl master-key rotate",
        "gatewayctl master-key rotate --retire-old"))
    p.add_argument("--retire-old", action="store_true", help="then drop the older versions")

    p = sub.add_parser("deploy", parents=[common], **_doc(
        "deploy a model on the workspace's RunPod",
        "gatewayctl deploy acme --model Qwen/Qwen2.5-0.5B-Instruct --modality llm --name chat",
        "gatewayctl deploy acme --model BAAI/bge-small-en-v1.5 --modality embedding --dry-run",
        "gatewayctl deploy acme --model org/m --modality image --destination managed --tier active --min-workers 2 "
        "--dry-run",
        about="Tiers: flex (default) scales to zero when idle; active keeps --min-workers warm on the managed\n"
        "destination for a flat monthly base fee per warm worker by GPU pool (control/tier_fees.json),\n"
        "prorated per day in `gatewayctl usage`. Your own RunPod account is Flex only."))
    p.add_argument("workspace", help=WS)
    p.add_argument("--model", required=True, help="Hugging Face model id")
    p.add_argument("--modality", required=True, choices=["llm", "embedding", "image", "speech", "voice"],
                   help="llm and embedding run on your own RunPod; every modality on the managed destination")
    p.add_argument("--name", help="the model name clients send (default: --model)")
    p.add_argument("--destination", choices=["runpod", "managed"], default="runpod",
                   help="the workspace's own RunPod account (default) or the managed destination")
    p.add_argument("--tier", choices=list(tiers.TIERS), default="flex",
                   help="flex: scale to zero (default); active: keep workers warm (managed only, base fee)")
    p.add_argument("--min-workers", type=int, help="active: workers kept warm (default 1, at most --workers-max)")
    p.add_argument("--gpu", action="append", help="GPU pool, in order of preference (default ADA_24)")
    p.add_argument("--workers-max", type=int, default=3, help="most workers the endpoint scales to (default 3)")
    p.add_argument("--idle-timeout", type=int, default=5, help="seconds before an idle worker stops")
    p.add_argument("--wait-timeout", type=float, default=600,
                   help="seconds to wait for a request to be served through RunPod (default 600)")
    p.add_argument("--max-model-len", type=int,
                   help="vLLM's context length (default: the longest that fits the smallest --gpu pool, ≤32768)")
    p.add_argument("--params", type=float, help="billions of parameters, when the model's name does not say")
    p.add_argument("--disk", type=int, help="container disk in GB (default: sized for the model, at least 150 "
                   "for vLLM and 20 for embeddings, as the workers' hub configs recommend)")
    p.add_argument("--init-timeout", type=int,
                   help="seconds of cold start before RunPod marks a worker unhealthy (RUNPOD_INIT_TIMEOUT; "
                   "default: sized for the model, at least 800)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be created (readable text, or JSON with --json), its memory estimate "
                   "and projected monthly cost (base fee + usage estimate); a Hugging Face token shows masked")
    p.add_argument("--price-input", type=Decimal, help="managed: USD per million input tokens (default: catalog)")
    p.add_argument("--price-output", type=Decimal, help="managed: USD per million output tokens (default: catalog)")
    p.add_argument("--price-per-unit", type=Decimal,
                   help="managed image, speech, voice: USD per image, input character, or second of audio")
    p.add_argument("--utilization", type=float, default=0.1,
                   help="with --dry-run: fraction of the month a worker is busy (default 0.1)")
    p = sub.add_parser("usage", parents=[common], **_doc(
        "usage and cost: this billing period and the two before", "gatewayctl usage acme",
        "gatewayctl usage acme --json", "gatewayctl usage acme --html acme-usage.html"))
    p.add_argument("workspace", help=WS)
    p.add_argument("--html", type=Path, metavar="FILE",
                   help="also write the usage page: one self-contained HTML file (charts with values, no network)")

    dp = sub.add_parser("deployments", **_doc("a workspace's deployments")).add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = dp.add_parser("list", parents=[common], **_doc(
        "list a workspace's deployments", "gatewayctl deployments list acme",
        "gatewayctl deployments list acme --all     # torn-down ones too"))
    p.add_argument("workspace", help=WS)
    p.add_argument("--all", action="store_true", help="include deleted deployments")
    for name, summary in (("status", "RunPod's view of a deployment: ready, initializing, throttled, unhealthy"
                                     " or unreachable"),
                          ("teardown", "stop a deployment's traffic, then delete its RunPod endpoint and template")):
        p = sub.add_parser(name, parents=[common], **_doc(
            summary, f"gatewayctl {name} chat --workspace acme", f"gatewayctl {name} dep_0123",
            about="A deployment is named by its id or by the model name clients send; a name live in several\n"
            "workspaces needs --workspace."))
        p.add_argument("deployment", help="deployment id (dep_...) or public model name")
        p.add_argument("--workspace", "-w", help=f"{WS} the model name belongs to")
    return parser


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)


def _print_table(title: str, rows: list[Any]) -> None:
    """A list as aligned columns, one row per item, headed by its fields' names."""
    if not rows:
        print(f"{title}: none")
        return
    if not all(isinstance(row, dict) for row in rows):
        print(f"{title}: {', '.join(map(_cell, rows))}")
        return
    columns = list(dict.fromkeys(name for row in rows for name in row))
    cells = [columns, *[[_cell(row.get(name)) for name in columns] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


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
                _print_table(key, value)
            else:
                print(f"{key}: {json.dumps(value, default=str) if isinstance(value, dict | list) else value}")
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
