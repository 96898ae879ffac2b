"""Every modality through the real stack with the real OpenAI SDK: the Responses API (plain and streamed),
images, speech synthesis (whole and streamed) and transcription/translation of a WAV file; each on the
destinations its modality runs on, refused elsewhere with the right error, metered exactly once in its
own unit and priced; and a spend limit that stops image and audio traffic as it stops tokens.
One gateway for the module."""

from __future__ import annotations

import io
import json
import secrets
import wave
from decimal import Decimal
from typing import Any

import openai
import pytest

from control import deployments, hotsync, pricing
from extauth.reservation import ReservationPolicy
from extauth.state import DeploymentEntry
from meter.parse import Reject, UsageRecord, parse_line
from tests.conftest import Gateway, Simulator, Tenant, make_tenant
from tests.support import call, checks_paused, wait_until

TOKEN_PRICE = pricing.Price(Decimal(10), Decimal(20))  # USD per million tokens
IMAGE_USD, CHARACTER_USD, SECOND_USD = Decimal("0.04"), Decimal("0.0001"), Decimal("0.01")


def wav(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * int(seconds * rate))
    return out.getvalue()


def deploy(gateway: Gateway, ws_id: str, modality: str, name: str, price: pricing.Price) -> None:
    with gateway.context() as ctx:
        opts = deployments.DeployOptions(f"org/{modality}", modality, name, wait_timeout_s=10, destination="managed")
        deployments.deploy(ctx, ws_id, opts, progress=lambda _m: None, price=price)


@pytest.fixture(scope="module")
def tenant(gateway: Gateway, simulator: Simulator) -> Tenant:
    t = make_tenant(gateway, simulator)
    deploy(gateway, t.workspace_id, "llm", "m-llm", TOKEN_PRICE)
    deploy(gateway, t.workspace_id, "image", "m-image", pricing.Price.per_unit("image", IMAGE_USD))
    deploy(gateway, t.workspace_id, "speech", "m-speech", pricing.Price.per_unit("character", CHARACTER_USD))
    deploy(gateway, t.workspace_id, "voice", "m-voice", pricing.Price.per_unit("audio_second", SECOND_USD))
    return t


@pytest.fixture(scope="module")
def sdk(gateway: Gateway, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=tenant.api_key, max_retries=0)


def rows(gateway: Gateway, ws_id: str, route: str, count: int) -> list[dict[str, Any]]:
    """The metered rows of `route`'s served requests, once there are `count` of them."""
    query = ("SELECT model, status, prompt_tokens, completion_tokens, usage_estimated, unit, quantity, unit_detail,"
             " cost_usd FROM usage_events WHERE workspace_id = %s AND route = %s AND status = 200 ORDER BY start_time")
    found: list[dict[str, Any]] = []

    def metered() -> bool:
        nonlocal found
        with gateway.context() as ctx:
            cur = ctx.db.execute(query, (ws_id, route))
            names = [c.name for c in cur.description or []]
            found = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        return len(found) >= count

    wait_until(metered, 30, f"{count} metered rows of {route}")
    assert count == 0 or len(found) == count, found
    return found


def test_responses_plain_and_streamed_on_managed_and_own_runpod(gateway: Gateway, tenant: Tenant,
                                                                  sdk: openai.OpenAI) -> None:
    for model in ("m-llm", tenant.chat_model):
        reply = sdk.responses.create(model=model, input="one two three")
        assert reply.output_text == "Echo: one two three"
        assert (reply.usage and reply.usage.input_tokens, reply.usage and reply.usage.output_tokens) == (3, 4)
        events = list(sdk.responses.create(model=model, input="one two three", stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Echo: one two three"
        done = events[-1]
        assert done.type == "response.completed" and done.response.usage is not None
        assert done.response.usage.output_tokens == 4  # the client keeps the final event's usage
    metered = rows(gateway, tenant.workspace_id, "/v1/responses", 4)
    assert [(r["model"], r["prompt_tokens"], r["completion_tokens"], r["unit"]) for r in metered] == [
        ("m-llm", 3, 4, None), ("m-llm", 3, 4, None),
        (tenant.chat_model, 3, 4, None), (tenant.chat_model, 3, 4, None)]
    # Tokens at $10/$20 per million on managed; the customer's own RunPod bills them, not us.
    assert [r["cost_usd"] for r in metered] == [Decimal("0.00011")] * 2 + [Decimal(0)] * 2


def test_images_metered_by_count_and_size(gateway: Gateway, tenant: Tenant, sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(model="m-image", prompt="a lighthouse", n=2, size="512x512")
    assert len(result.data) == 2 and all(d.b64_json for d in result.data)
    assert len(sdk.images.generate(model="m-image", prompt="a lighthouse").data) == 1
    metered = rows(gateway, tenant.workspace_id, "/v1/images/generations", 2)
    assert [(r["unit"], r["quantity"], r["unit_detail"], r["cost_usd"], r["usage_estimated"]) for r in metered] == [
        ("image", 2, "512x512", 2 * IMAGE_USD, False), ("image", 1, "default", IMAGE_USD, False)]


def test_speech_whole_and_streamed_metered_by_input_characters(gateway: Gateway, tenant: Tenant,
                                                               sdk: openai.OpenAI) -> None:
    # Escapes, a quoted "input" inside the text and characters beyond the BMP all count as the upstream does.
    text = 'Say "input": naïve café 👋\n'
    audio = sdk.audio.speech.create(model="m-speech", voice="alloy", input=text)
    assert len(audio.content) == len(text) * 64
    with sdk.audio.speech.with_streaming_response.create(model="m-speech", voice="alloy", input=text,
                                                         response_format="wav") as streamed:
        assert streamed.headers["content-type"] == "audio/wav"
        pieces = list(streamed.iter_bytes())
    assert b"".join(pieces) == audio.content
    # A client hiding its text behind decoys: a nested `input`, a key that ends in an escaped "input".
    voice: Any = {"id": "alloy", "input": "x"}
    decoyed = sdk.audio.speech.create(model="m-speech", voice=voice, input="the real text",
                                      extra_body={'x "input': "y"})
    assert len(decoyed.content) == 13 * 64
    # Two `input` members: the upstream's parser takes the last, so does the meter; a value "input" is no member.
    twice = b'{"model": "m-speech", "input": "a", "input": "the real text", "voice": "input"}'
    assert len(call("POST", f"{gateway.base_url}/audio/speech", raw=twice, key=tenant.api_key).body) == 13 * 64
    # A client that hangs up after the first piece of a long synthesis still pays for what it asked.
    long = "word " * 800
    with sdk.audio.speech.with_streaming_response.create(model="m-speech", voice="alloy", input=long) as cut:
        assert next(cut.iter_bytes(1024))
    metered = rows(gateway, tenant.workspace_id, "/v1/audio/speech", 5)
    assert [(r["unit"], r["quantity"], r["cost_usd"]) for r in metered] == [
        ("character", len(text), len(text) * CHARACTER_USD)] * 2 + [("character", 13, 13 * CHARACTER_USD)] * 2 + [
        ("character", 4000, 4000 * CHARACTER_USD)]


def test_transcription_and_translation_of_a_wav_file(gateway: Gateway, tenant: Tenant, sdk: openai.OpenAI) -> None:
    audio = wav(2.5)
    text = sdk.audio.transcriptions.create(model="m-voice", file=("clip.wav", audio, "audio/wav"))
    assert text.text == "Transcribed 2.5 seconds of audio."
    plain = sdk.audio.translations.create(model="m-voice", file=("clip.wav", audio, "audio/wav"),
                                          response_format="text")
    assert str(plain).strip() == "Translated 2.5 seconds of audio."
    # Five minutes of 16 kHz audio (9.6 MB): the file is read whole.
    long = sdk.audio.translations.create(model="m-voice", file=("long.wav", wav(300.0)), response_format="text")
    assert str(long).strip() == "Translated 300 seconds of audio."
    transcribed = rows(gateway, tenant.workspace_id, "/v1/audio/transcriptions", 1)
    translated = rows(gateway, tenant.workspace_id, "/v1/audio/translations", 2)
    # The upstream's own usage where it reports one (json), else the WAV header's duration (text).
    assert [(r["unit"], r["quantity"], r["unit_detail"], r["cost_usd"]) for r in transcribed + translated] == [
        ("audio_second", 2.5, "upstream", Decimal("0.025")), ("audio_second", 2.5, "wav", Decimal("0.025")),
        ("audio_second", 300.0, "wav", Decimal("3"))]


def test_a_25_mb_upload_passes_and_a_larger_one_is_the_gateways_413(
    gateway: Gateway, tenant: Tenant, sdk: openai.OpenAI
) -> None:
    """OpenAI's own limit for an audio file is 25 MB: that file with its form passes the gateway (above
    the listener's 16 MiB buffer); past the voice routes' 26 MiB the gateway refuses it, as its own limit."""
    before = len(rows(gateway, tenant.workspace_id, "/v1/audio/transcriptions", 0))
    big = wav(781.0)  # 16 kHz, 16-bit mono: 32,000 bytes a second
    assert 24_900_000 < len(big) <= 25_000_000
    # With the checks slow (a loaded host): the file arrives while the key's pre-check is in flight.
    # Envoy then held the stream to the listener's 16 MiB, stopped reading past it and never resumed:
    # the upload hung until the 10 s idle timeout (408), as CI saw.
    with checks_paused(gateway.state_dir, 0.3):
        text = sdk.audio.transcriptions.create(model="m-voice", file=("big.wav", big, "audio/wav"))
    assert text.text == "Transcribed 781 seconds of audio."
    [row] = rows(gateway, tenant.workspace_id, "/v1/audio/transcriptions", before + 1)[before:]
    assert (row["unit"], row["quantity"], row["cost_usd"]) == ("audio_second", 781.0, 781 * SECOND_USD)
    with pytest.raises(openai.APIStatusError) as info:
        sdk.audio.transcriptions.create(model="m-voice", file=("huge.wav", wav(900.0), "audio/wav"))
    assert info.value.status_code == 413
    error = info.value.body["error"] if isinstance(info.value.body, dict) and "error" in info.value.body \
        else info.value.body
    assert error["code"] == "request_too_large" and "26 MiB on /v1/audio/transcriptions" in error["message"]
    assert "RunPod" not in error["message"]


def test_a_handmade_multipart_body_file_first_with_decoys(gateway: Gateway, tenant: Tenant) -> None:
    """The form's `model` is read from part headers only: not from a file named "model", not from the
    file's own bytes, wherever the field comes in the body."""
    before = len(rows(gateway, tenant.workspace_id, "/v1/audio/transcriptions", 0))
    boundary = "b" + secrets.token_hex(8)
    decoy = b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nm-llm\r\n'
    # Two files: the gateway cannot know which one the upstream reads, so it meters both.
    parts = [(b'name="file"; filename="model"', b"Content-Type: audio/wav\r\n", wav(1.5) + decoy),
             (b'name="response_format"', b"", b"text"), (b'name="model"', b"", b"m-voice"),
             (b'name="file"; filename="b.wav"', b"", wav(0.5))]
    body = b"".join(b"--%s\r\nContent-Disposition: form-data; %s\r\n%s\r\n%s\r\n" % (boundary.encode(), d, h, v)
                    for d, h, v in parts) + b"--%s--\r\n" % boundary.encode()
    reply = call("POST", f"{gateway.base_url}/audio/transcriptions", raw=body, key=tenant.api_key,
                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status == 200, reply.body
    assert reply.body.decode().strip() == "Transcribed 1.5 seconds of audio."
    # A file cut inside its header: not measured (nor an error), the request goes on to the upstream.
    cut = body.replace(wav(1.5), wav(1.5)[:30]).replace(wav(0.5), b"")
    assert call("POST", f"{gateway.base_url}/audio/transcriptions", raw=cut, key=tenant.api_key,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}).status == 400
    # Seconds from the WAV header: the data chunk's size, not the bytes that follow it in the part.
    [row] = rows(gateway, tenant.workspace_id, "/v1/audio/transcriptions", before + 1)[before:]
    assert row["quantity"] == 2.0
    assert (row["model"], row["unit_detail"]) == ("m-voice", "wav")


def test_each_route_refuses_other_modalities_and_own_runpod_serves_llm_and_embedding_only(
    gateway: Gateway, tenant: Tenant, sdk: openai.OpenAI
) -> None:
    def refused(call: Any, code: str) -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.code == code, caught.value.body

    refused(lambda: sdk.images.generate(model=tenant.chat_model, prompt="x"), "model_not_supported")
    refused(lambda: sdk.responses.create(model="m-image", input="x"), "model_not_supported")
    refused(lambda: sdk.chat.completions.create(model="m-speech", messages=[{"role": "user", "content": "x"}]),
            "model_not_supported")
    refused(lambda: sdk.audio.speech.create(model="m-voice", voice="alloy", input="x"), "model_not_supported")
    refused(lambda: sdk.audio.transcriptions.create(model="m-speech", file=("a.wav", wav(0.1))),
            "model_not_supported")
    refused(lambda: sdk.responses.create(model=tenant.embedding_model, input="x"), "model_not_supported")
    # An image deployment on the customer's own RunPod (`deploy` refuses to create one; a row of before):
    with gateway.context() as ctx, hotsync.changing(ctx) as change:
        ctx.db.execute(
            "INSERT INTO deployments (id, workspace_id, public_name, model, modality, destination, account_id,"
            " endpoint_id, state) VALUES (%s, %s, 'own-image', 'org/img', 'image', 'runpod', %s, %s, 'ready')",
            ("dep_" + secrets.token_hex(6), tenant.workspace_id, tenant.account_id, "ep" + secrets.token_hex(6)))
        change.workspace(tenant.workspace_id)
    refused(lambda: sdk.images.generate(model="own-image", prompt="x"), "byoc_modality_unsupported")
    with pytest.raises(openai.NotFoundError):
        sdk.post("/audio/voices", body={}, cast_to=object)


def test_a_unit_price_of_another_unit_is_refused(gateway: Gateway, tenant: Tenant) -> None:
    done = gateway.ctl("prices", "set", "m-image", "--workspace", tenant.workspace_id, "--input", "1",
                       "--output", "1")
    assert done.returncode != 0 and "priced per image" in done.stderr
    shown = gateway.ctl_json("prices", "set", "m-image", "--workspace", tenant.workspace_id, "--unit", "image",
                             "--usd", str(IMAGE_USD))
    assert (shown["unit"], Decimal(shown["usd_per_unit"])) == ("image", IMAGE_USD)


def test_usage_report_shows_each_unit(gateway: Gateway, tenant: Tenant, sdk: openai.OpenAI) -> None:
    """`units` per period and per model, in the contract's key names; whatever ran before in the module
    (this test adds three images, a clip and a sentence to it), the report equals the metered rows."""
    images_before = len(rows(gateway, tenant.workspace_id, "/v1/images/generations", 0))
    clips_before = len(rows(gateway, tenant.workspace_id, "/v1/audio/transcriptions", 0))
    speech_before = len(rows(gateway, tenant.workspace_id, "/v1/audio/speech", 0))
    sdk.images.generate(model="m-image", prompt="again", n=3)
    sdk.audio.transcriptions.create(model="m-voice", file=("c.wav", wav(0.25)))
    sdk.audio.speech.create(model="m-speech", voice="alloy", input="three words here")
    rows(gateway, tenant.workspace_id, "/v1/audio/speech", speech_before + 1)
    rows(gateway, tenant.workspace_id, "/v1/images/generations", images_before + 1)
    rows(gateway, tenant.workspace_id, "/v1/audio/transcriptions", clips_before + 1)
    report = gateway.ctl_json("usage", tenant.workspace_id)
    period = report["periods"][0]
    with gateway.context() as ctx:
        metered = ctx.db.execute(
            "SELECT model, unit, sum(quantity), sum(cost_usd) FROM usage_events WHERE workspace_id = %s"
            " AND unit IS NOT NULL AND quantity > 0 GROUP BY 1, 2", (tenant.workspace_id,)).fetchall()
    expected: dict[str, dict[str, Any]] = {}
    for model, unit, quantity, _ in metered:
        expected.setdefault(model, {})[unit] = round(quantity, 3) if unit == "audio_second" else round(quantity)
    models = {m["model"]: m for m in period["models"]}
    assert {name: m["units"] for name, m in models.items() if m["units"]} == expected
    assert set(expected) == {"m-image", "m-speech", "m-voice"}
    assert all(m["units"] == {} for name, m in models.items() if name not in expected)  # tokens only
    assert expected["m-image"]["image"] >= 3 and isinstance(expected["m-image"]["image"], int)
    assert expected["m-voice"]["audio_second"] >= 0.25
    totals: dict[str, Any] = {}
    for units in expected.values():
        for unit, quantity in units.items():
            totals[unit] = totals.get(unit, 0) + quantity
    assert period["units"] == totals
    # Their cost is in the cost figures: the unit models' cost is their units' price.
    assert Decimal(models["m-image"]["cost_usd"]) == expected["m-image"]["image"] * IMAGE_USD
    assert f"{expected['m-image']['image']} images" in gateway.ctl("usage", tenant.workspace_id).stdout


def test_spend_limit_stops_image_and_audio_traffic(gateway: Gateway, simulator: Simulator) -> None:
    t = make_tenant(gateway, simulator)
    deploy(gateway, t.workspace_id, "image", "capped-image", pricing.Price.per_unit("image", IMAGE_USD))
    deploy(gateway, t.workspace_id, "voice", "capped-voice", pricing.Price.per_unit("audio_second", SECOND_USD))
    gateway.ctl_json("workspace", "set-spend-limit", t.workspace_id, "0.1")
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=t.api_key, max_retries=0)
    sdk.images.generate(model="capped-image", prompt="x", n=2)  # $0.08 of $0.10
    rows(gateway, t.workspace_id, "/v1/images/generations", 1)

    def stopped(call: Any) -> bool:
        try:
            call()
        except openai.PermissionDeniedError as exc:
            assert exc.code == "plan_limit_exceeded"
            return True
        return False

    # One more image ($0.04) or 2.5 s of audio ($0.025) would pass the limit: both are refused up front.
    wait_until(lambda: stopped(lambda: sdk.images.generate(model="capped-image", prompt="x")), 30, "images stop")
    assert stopped(lambda: sdk.audio.transcriptions.create(model="capped-voice", file=("a.wav", wav(2.5))))
    # A client's own body facts never reach ext_authz (Envoy removes the header before routing).
    forged = {"x-gateway-form": "model=capped-voice&audio_seconds=0&bytes=0",
              "x-gateway-body": '0 {"model":"capped-voice"}'}
    assert stopped(lambda: sdk.audio.transcriptions.create(model="capped-voice", file=("a.wav", wav(2.5)),
                                                           extra_headers=forged))
    # Not a WAV file: sized from its bytes (40 kB at 1,000 bytes a second: $0.40).
    assert stopped(lambda: sdk.audio.transcriptions.create(model="capped-voice", file=("a.mp3", b"\xff" * 40_000)))
    # A shorter clip fits what is left ($0.01 of audio), once.
    sdk.audio.transcriptions.create(model="capped-voice", file=("a.wav", wav(1.0)))
    # The Responses API's max_output_tokens sizes its reservation (16 tokens at $20 per million, not the
    # 4,096 a request without a budget reserves, which would not fit the $0.01 left).
    deploy(gateway, t.workspace_id, "llm", "capped-llm", TOKEN_PRICE)
    assert sdk.responses.create(model="capped-llm", input="a b", max_output_tokens=16).output_text == "Echo: a b"
    assert stopped(lambda: sdk.responses.create(model="capped-llm", input="a b"))
    with gateway.context() as ctx:
        row = ctx.db.execute("SELECT sum(cost_usd) FROM usage_events WHERE workspace_id = %s",
                             (t.workspace_id,)).fetchone()
    assert row is not None and row[0] <= Decimal("0.1")


def _line(**fields: Any) -> bytes:
    base = {"request_id": secrets.token_hex(8), "status": 200, "destination": "managed", "upstream_host": "1.2.3.4:443",
            "usage_source": None, "prompt_tokens": None, "completion_tokens": None, "bytes_received": 4000}
    return json.dumps({**base, **fields}).encode()


def test_the_meter_counts_a_unit_only_for_a_served_request() -> None:
    served = parse_line(_line(units={"unit": "image", "quantity": 2.0, "detail": "512x512"}))
    assert isinstance(served, UsageRecord)
    assert (served.unit, served.quantity, served.unit_detail, served.usage_estimated) == ("image", 2, "512x512", False)
    assert served.prompt_tokens == 0  # no token estimate from the body's bytes for a unit-metered request
    seconds = {"unit": "audio_second", "quantity": 3.5, "detail": "wav"}
    for refused in (_line(units=seconds, status=400), _line(units=seconds, status=200, upstream_host=None)):
        record = parse_line(refused)
        assert isinstance(record, UsageRecord) and (record.unit, record.quantity) == ("audio_second", 0)
    assert isinstance(parse_line(_line(units={"unit": "image", "quantity": -1})), Reject)
    assert isinstance(parse_line(_line(units={"unit": "dollar", "quantity": 1})), Reject)
    assert isinstance(parse_line(_line(units="image")), Reject)
    # Audio the gateway could not measure and an answer without usage: 0 seconds, marked estimated.
    unmeasured = parse_line(_line(units={"unit": "audio_second", "quantity": 0, "detail": "unmeasured"}))
    assert isinstance(unmeasured, UsageRecord) and (unmeasured.quantity, unmeasured.usage_estimated) == (0, True)


def test_reservations_in_each_unit() -> None:
    policy = ReservationPolicy()

    def entry(modality: str, unit: str) -> DeploymentEntry:
        return DeploymentEntry("d", "m", modality, "managed", "ep", None, 0, 0.0, 0.0, unit, 0.5)

    assert policy.cost_uusd(entry("image", "image"), "100", None, "3") == 1_500_000  # n images
    assert policy.cost_uusd(entry("image", "image"), "100", None, "100000") == 64_000_000  # n capped at 128
    assert policy.cost_uusd(entry("speech", "character"), "40", None, None) == 20_000_000  # ≤ body bytes
    assert policy.cost_uusd(entry("voice", "audio_second"), "96044", None, None, "3.000") == 1_500_000  # WAV
    assert policy.cost_uusd(entry("voice", "audio_second"), "50000", None, None, None) == 25_000_000  # bytes
    assert not entry("image", "token").priced and entry("image", "image").priced
