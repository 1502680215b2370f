"""Limits and hostile input on the real app (fake Triton): prompt length, text that cannot be stored or sent,
booleans for numbers, listing pages, slow bodies, and server paths kept out of task errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from frontend.app import create_app
from frontend.tasks import one_line, redact_paths
from tests.unit.frontend_fakes import AppHarness, make_settings, wait_status


@pytest.fixture
def app(tmp_path):
    with AppHarness(tmp_path, max_prompt_chars=100, max_list_limit=3) as harness:
        yield harness


def one_line_detail(response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def test_prompts_are_cut_to_the_limit_and_the_record_says_what_was_used(app):
    task_id = app.client.post("/v1/tasks/", json={"prompt": "p" * 5000, "negative_prompt": "n" * 101}).json()["task_id"]
    message = wait_status(app.client, task_id)["message"]
    assert message["prompt"] == "p" * 100 and message["negative_prompt"] == "n" * 100
    assert app.fake.calls[-1][1]["prompt"] == "p" * 100


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "image_path"])
@pytest.mark.parametrize("text", ["a\x00b", "\x07bell", "esc\x1b[31m", "del\x7f", "\ud800", "x\udfffy"])
def test_nul_control_characters_and_lone_surrogates_are_422(app, field, text):
    body = json.dumps({field: text}).encode()  # json.dumps writes \ud800 as an escape, as a hostile client would
    response = app.client.post("/v1/tasks/", content=body, headers={"content-type": "application/json"})
    assert field in one_line_detail(response, 422)


def test_tabs_and_newlines_in_a_prompt_are_fine(app):
    answer = app.client.post("/v1/tasks/", json={"prompt": "line one\n\tline two\r\n", "infer_steps": 1})
    assert answer.status_code == 200


@pytest.mark.parametrize("text", ["a\x00.mp4", "\ud800.mp4", "a\\b.mp4"])
def test_save_video_path_with_nul_surrogates_or_backslashes_is_422(app, text):
    body = json.dumps({"save_video_path": text}).encode()
    response = app.client.post("/v1/tasks/", content=body, headers={"content-type": "application/json"})
    assert "save_video_path" in one_line_detail(response, 422)


@pytest.mark.parametrize("field", ["infer_steps", "seed", "height", "guidance_scale", "fps"])
def test_booleans_are_not_numbers(app, field):
    assert field in one_line_detail(app.client.post("/v1/tasks/", json={field: True}), 422)


@pytest.mark.parametrize("body", [b'{"prompt": ', b"{'prompt': 'x'}", b'{"prompt": "x",}'])
def test_malformed_json_is_422_with_a_plain_message(app, body):
    response = app.client.post("/v1/tasks/", content=body, headers={"content-type": "application/json"})
    assert one_line_detail(response, 422).startswith("request body is not valid JSON")


@pytest.mark.parametrize("body", [b"[" * 50_000 + b"]" * 50_000, b'{"seed": ' + b"9" * 5000 + b"}",
                                  b'{"prompt": "\xff\xfe"}'])
def test_bodies_the_json_parser_cannot_take_are_400(app, body):
    response = app.client.post("/v1/tasks/", content=body, headers={"content-type": "application/json"})
    one_line_detail(response, 400)


def test_listing_pages_are_capped_and_offset_pages_on(app):
    ids = []
    for _ in range(5):
        ids.append(app.client.post("/v1/tasks/", json={"infer_steps": 1}).json()["task_id"])
        wait_status(app.client, ids[-1])
    newest_first = ids[::-1]
    assert list(app.client.get("/v1/tasks/").json()) == newest_first[:3]  # the default page is the cap
    assert list(app.client.get("/v1/tasks/?limit=1000").json()) == newest_first[:3]
    assert list(app.client.get("/v1/tasks/?limit=2&offset=2").json()) == newest_first[2:4]
    assert list(app.client.get("/v1/tasks/?offset=3").json()) == newest_first[3:]
    assert app.client.get("/v1/tasks/?offset=99").json() == {}
    assert app.client.get("/v1/tasks/?offset=-1").status_code == 422
    assert app.client.get("/v1/tasks/?limit=0").status_code == 422


def slow_body_call(settings, chunks: list[tuple[float, bytes]]) -> tuple[int, bytes]:
    """Send POST /v1/tasks/ to the ASGI app with the body in timed chunks; (status, body) of the answer."""
    app = create_app(settings)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/tasks/", "raw_path": b"/v1/tasks/", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000)}
    answer: dict = {"body": b""}

    async def scenario():
        pending = list(chunks)

        async def receive():
            if not pending:
                await asyncio.sleep(3600)
            delay, data = pending.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": data, "more_body": bool(pending)}

        async def send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")

        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(scenario())
    return answer["status"], answer["body"]


def test_a_body_that_trickles_in_too_slowly_is_408(tmp_path):
    settings = make_settings(tmp_path, body_timeout=0.3)
    status, body = slow_body_call(settings, [(0.0, b'{"pro'), (0.2, b'mpt"'), (0.2, b': "x"}')])
    assert status == 408 and json.loads(body) == {"detail": "request body not received within 0.3 s"}
    status, body = slow_body_call(settings, [(0.05, b'{"prompt": '), (0.05, b"5}")])
    assert status == 422  # in time: parsed (and refused for its own reason)


def test_redact_paths_keeps_routes_and_urls_but_not_server_paths():
    top = frozenset({"srv", "tmp", "home"})
    assert redact_paths("dit: cannot load /srv/models/dit/1/model.onnx (bad)", top) == \
        "dit: cannot load .../model.onnx (bad)"
    assert redact_paths("File \"/home/me/x.py\", line 3", top) == 'File ".../x.py", line 3'
    for kept in ("use /v1/tasks/form", "see https://example.org/srv/a", "step 3/8", "/srv alone"):
        assert redact_paths(kept, top) == kept


def test_task_errors_are_one_line_without_server_paths():
    assert one_line("engine failed\n  at /tmp/repo/dit/1/model.py:12\nTraceback") == \
        "engine failed at .../model.py:12 Traceback"
