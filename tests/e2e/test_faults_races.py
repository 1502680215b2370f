"""Races through real uvicorn and the session tritonserver: concurrent requests (httpx.AsyncClient, each on its
own connection) that hit the same task or the queue limit at the same moment. Each test asserts exactly who
won and the end state of every task involved."""

from __future__ import annotations

import asyncio

import av
import httpx
import pytest

from tests.e2e.test_frontend_flow import LONG_STEPS, wait_status, wait_step

SMALL = {"infer_steps": 2, "target_video_length": 1, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory, triton_server):
    from tests.conftest import CACHE
    from tests.e2e.conftest import FrontendServer

    data_dir = tmp_path_factory.mktemp("races") / "server_data"
    front = FrontendServer.create(data_dir, triton_server.grpc_url, CACHE / "logs" / "frontend-races.log",
                                  ["--max-queue-size", "5"])
    front.start()
    try:
        front.wait_up()
        yield front
    finally:
        front.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
        for task_id, record in http.get("/v1/tasks/?status=pending").json().items():
            http.delete(f"/v1/tasks/{task_id}")
        http.delete("/v1/tasks/running")


def at_once(server, requests: list[tuple[str, str, dict | None]]) -> list[httpx.Response]:
    """Send every (method, path, json) at the same moment, each on its own connection."""
    async def send_all():
        limits = httpx.Limits(max_connections=len(requests) + 1)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
            start = asyncio.Event()

            async def one(method, path, body):
                await start.wait()
                return await http.request(method, path, json=body)

            calls = [asyncio.create_task(one(*request)) for request in requests]
            await asyncio.sleep(0.05)
            start.set()
            return await asyncio.gather(*calls)

    return asyncio.run(send_all())


def post(client, **body) -> str:
    answer = client.post("/v1/tasks/", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["task_id"]


@pytest.mark.parametrize("target", ["running", "pending"])
def test_two_deletes_at_once_exactly_one_cancels(server, client, target):
    running = post(client, infer_steps=LONG_STEPS)
    pending = post(client, **SMALL)
    wait_step(client, running, 1)
    victim = running if target == "running" else pending
    answers = at_once(server, [("DELETE", f"/v1/tasks/{victim}", None)] * 2)
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200, 409], [answer.text for answer in answers]
    won = next(answer for answer in answers if answer.status_code == 200)
    lost = next(answer for answer in answers if answer.status_code == 409)
    assert won.json()["status"] == "cancelled" and lost.json() == {"detail": f"task {victim} already cancelled"}
    assert client.get(f"/v1/tasks/{victim}/status").json()["status"] == "cancelled"
    other = pending if victim == running else running
    if other == running:
        client.delete(f"/v1/tasks/{running}")
    assert wait_status(client, other)["status"] in ("cancelled", "completed")
    assert 'wan_frontend_rejected_total' in client.get("/metrics").text


def test_delete_as_the_task_completes_either_cancels_it_cleanly_or_leaves_it_completed(server, client, tmp_path):
    # ~0.1-0.2 s a task: the delays sweep the DELETE from the start of the run to after its end.
    race_task = {**SMALL, "infer_steps": 20}

    async def post_then_delete(delays: tuple[float, ...]) -> list[tuple[str, httpx.Response]]:
        answers = []
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await http.get("/healthz")  # the connection is open: each DELETE comes `delay` after its POST
            for delay in delays:
                task = (await http.post("/v1/tasks/", json=race_task)).json()["task_id"]
                await asyncio.sleep(delay)
                answers.append((task, await http.delete(f"/v1/tasks/{task}")))
                await asyncio.sleep(0.5)  # the task has ended (cancelled or completed) before the next POST
        return answers

    outcomes = []
    for task, answer in asyncio.run(post_then_delete((0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 2.0))):
        record = wait_status(client, task)
        result = client.get(f"/v1/tasks/{task}/result")
        file = server.data_dir / "outputs" / f"{task}.mp4"
        if answer.status_code == 200:
            assert record["status"] == "cancelled" and answer.json()["status"] == "cancelled"
            assert result.status_code == 404 and not file.exists()
        else:
            assert answer.status_code == 409, answer.text
            assert answer.json() == {"detail": f"task {task} already completed"}
            assert record["status"] == "completed" and result.status_code == 200
            path = tmp_path / f"{task}.mp4"
            path.write_bytes(result.content)
            with av.open(str(path)) as container:
                assert sum(1 for _ in container.decode(video=0)) == 1
        outcomes.append(answer.status_code)
    assert 200 in outcomes and 409 in outcomes, outcomes
    assert client.get("/v1/service/status").json()["service_status"] == "idle"


def test_two_posts_with_the_same_task_id_exactly_one_wins(server, client):
    body = {"task_id": "same-id-race", **SMALL}
    answers = at_once(server, [("POST", "/v1/tasks/", body)] * 8)
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] + [400] * 7, [answer.text for answer in answers]
    for answer in answers:
        if answer.status_code == 400:
            assert answer.json() == {"detail": "task_id same-id-race already exists"}
    assert wait_status(client, "same-id-race")["status"] == "completed"
    assert list(client.get("/v1/tasks/?limit=1000").json()).count("same-id-race") == 1


def test_many_posts_while_the_queue_is_almost_full_admit_no_more_than_the_limit(server, client):
    running = post(client, infer_steps=LONG_STEPS)
    early = [post(client, **SMALL) for _ in range(3)]  # 3 of 5 places taken
    wait_step(client, running, 1)
    answers = at_once(server, [("POST", "/v1/tasks/", SMALL)] * 20)
    accepted = [answer.json()["task_id"] for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code != 200]
    assert len(accepted) == 2 and len(refused) == 18
    assert all(answer.status_code == 429 and answer.json() == {"detail": "Service busy"} for answer in refused)
    assert all(int(answer.headers["Retry-After"]) >= 1 for answer in refused)
    status = client.get("/v1/service/status").json()
    assert status["queue_length"] == 5 and status["task_id"] == running
    pending = client.get("/v1/tasks/?status=pending").json()
    assert sorted(pending) == sorted(early + accepted)
    assert sorted(r["queue_position"] for r in pending.values()) == [1, 2, 3, 4, 5]
    client.delete(f"/v1/tasks/{running}")
    finals = [wait_status(client, task_id)["status"] for task_id in early + accepted]
    assert finals == ["completed"] * 5
