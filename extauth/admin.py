"""Each ext_authz replica's admin HTTP port (EXTAUTH_METRICS_LISTEN): `/metrics` for Prometheus,
`/ready` for orchestration, `POST /internal/credential-rejected`, which envoy/gateway.lua calls when
RunPod refuses a workspace's key (the key is marked only once RunPod's account API confirms it is dead),
and `POST /internal/body-check`, where Envoy forwards, once its check has passed, a JSON body without a
`model` the check could name, to be answered with what is wrong with it (envoy.yaml, route
`body_check`). The port is for the internal network only; Envoy routes nothing else of a client's to
it. The internal routes answer only Envoy (extauth/custody.py); /metrics and /ready carry nothing
secret and stay open."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control import credentials
from control.context import open_context
from control.settings import ControlSettings
from extauth import body_facts, errors
from extauth.custody import REFUSED, SECRET_HEADER, EnvoySecret
from extauth.decision import BODY_CHECK_PATH

log = logging.getLogger("extauth")
_WORKSPACE_RE = re.compile(r"ws_[a-z0-9]{1,64}")


def _confirm_rejected(workspace_id: str) -> bool:
    with open_context(ControlSettings.from_env()) as ctx:
        return credentials.confirm_rejected(ctx, workspace_id)


def build_app(is_ready: Callable[[], bool], secret: EnvoySecret) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST})

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="ready" if is_ready() else "draining", status=200 if is_ready() else 503)

    async def credential_rejected(request: web.Request) -> web.Response:
        if not secret.admits(request.headers.get(SECRET_HEADER)):
            return web.Response(status=REFUSED.status, text=REFUSED.body(), content_type="application/json")
        workspace_id = (await request.text()).strip()
        if _WORKSPACE_RE.fullmatch(workspace_id) is None:
            return web.Response(status=400, text="workspace id expected")
        marked = await asyncio.to_thread(_confirm_rejected, workspace_id)
        if marked:
            log.warning("RunPod refused the key of workspace %s; marked until it is re-linked", workspace_id)
        else:
            log.warning("RunPod refused a request of workspace %s, but its key still works", workspace_id)
        return web.Response(status=204)

    async def body_check(request: web.Request) -> web.Response:
        if not secret.admits(request.headers.get(SECRET_HEADER)):
            return web.Response(status=REFUSED.status, text=REFUSED.body(), content_type="application/json")
        head = await request.content.read(body_facts.SHAPE_MAX_BYTES + 1)
        complete = len(head) <= body_facts.SHAPE_MAX_BYTES
        denial = errors.bad_body(body_facts.shape_of(head, complete))
        return web.Response(status=denial.status, text=denial.body(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ready", ready)
    app.router.add_post("/internal/credential-rejected", credential_rejected)
    app.router.add_post(BODY_CHECK_PATH, body_check)
    return app


async def serve(host: str, port: int, is_ready: Callable[[], bool], secret: EnvoySecret) -> web.AppRunner:
    runner = web.AppRunner(build_app(is_ready, secret), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("admin on %s:%s (pid %s)", host, port, os.getpid())
    return runner
