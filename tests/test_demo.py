"""`make run` on this checkout brings up the demo with embedded PostgreSQL and Redis, which the OpenAI
SDK can call using nothing but demo.env; Ctrl-C stops all of it."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import openai

from control.net import free_port, wait_for_port
from control.settings import read_runtime
from tests.support import ROOT, wait_until


def test_make_run_serves_the_demo_from_demo_env_alone(tmp_path: object) -> None:
    tmp = Path(str(tmp_path))
    os.chmod(tmp, 0o755)
    state_dir = tmp / "state"
    listen = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "RUNPOD_API_URL", "RUNPOD_INFERENCE_URL", "MAKEFLAGS")}
    env.update(GATEWAY_STATE_DIR=str(state_dir), GATEWAY_LISTEN=f"127.0.0.1:{listen}",
               GATEWAY_ADMIN=f"127.0.0.1:{free_port()}", EXTAUTH_LISTEN=f"127.0.0.1:{free_port()}",
               # `up` refuses to start on a taken address: none of the defaults, other stacks may run here.
               GATEWAY_STATS_LISTEN=f"127.0.0.1:{free_port()}", EXTAUTH_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
               METER_METRICS_LISTEN=f"127.0.0.1:{free_port()}")
    out = (tmp / "make-run.out").open("wb")
    proc = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: read_runtime(state_dir).get("ready") or proc.poll() is not None, 120, "demo ready")
        assert proc.poll() is None, (tmp / "make-run.out").read_text()
        demo = dict(line.split("=", 1) for line in (state_dir / "demo.env").read_text().split())
        assert set(demo) == {"OPENAI_BASE_URL", "OPENAI_API_KEY", "DEMO_CHAT_MODEL", "DEMO_EMBEDDING_MODEL"}
        sdk = openai.OpenAI(base_url=demo["OPENAI_BASE_URL"], api_key=demo["OPENAI_API_KEY"], max_retries=0)
        chat = sdk.chat.completions.create(model=demo["DEMO_CHAT_MODEL"],
                                           messages=[{"role": "user", "content": "hello"}])
        assert chat.choices[0].message.content == "Echo: hello"
        assert sdk.embeddings.create(model=demo["DEMO_EMBEDDING_MODEL"], input="hi").data
        assert (state_dir / "postgres").is_dir(), "embedded PostgreSQL under the state directory"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=60)
        out.close()
    console = (tmp / "make-run.out").read_text()
    assert "stopped" in console, console
    assert not wait_for_port("127.0.0.1", listen, 0.3), "Envoy is gone after Ctrl-C"
    assert read_runtime(state_dir) == {}
