"""Retention of results and inputs (frontend.retention): the pure policy, the sweep on real folders, the
clean-up of temporary files after a crash, and the service keeping what unfinished tasks need."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from frontend.retention import Policy, StoredFile, plan, remove_temporary_files, scan, sweep
from tests.unit.frontend_fakes import AppHarness, FakeTritonClient, wait_status

NOW = 1_000_000.0
HOUR = 3600.0


def stored(name: str, size: int, age_s: float) -> StoredFile:
    return StoredFile(Path(name), size, NOW - age_s)


def names(files) -> list[str]:
    return [str(item.path) for item in files]


def test_no_policy_deletes_nothing():
    files = [stored("old.mp4", 10**9, 10**6)]
    assert plan(files, Policy(), NOW) == []


def test_max_age_deletes_only_files_older_than_it():
    files = [stored("a.mp4", 1, 2 * HOUR), stored("b.mp4", 1, 0.5 * HOUR), stored("c.mp4", 1, HOUR + 1)]
    assert names(plan(files, Policy(max_age_s=HOUR), NOW)) == ["a.mp4", "c.mp4"]


def test_max_bytes_deletes_the_oldest_first_until_under_the_limit():
    files = [stored("new.mp4", 40, 2 * HOUR), stored("oldest.mp4", 40, 5 * HOUR), stored("old.mp4", 40, 3 * HOUR)]
    assert names(plan(files, Policy(max_bytes=100, min_age_s=HOUR), NOW)) == ["oldest.mp4"]
    assert names(plan(files, Policy(max_bytes=40, min_age_s=HOUR), NOW)) == ["oldest.mp4", "old.mp4"]


def test_max_bytes_never_deletes_a_file_younger_than_the_minimum_age():
    files = [stored("fresh.mp4", 10**9, 60), stored("old.mp4", 10, 2 * HOUR)]
    # over the limit even after deleting every old file: the fresh one stays anyway
    assert names(plan(files, Policy(max_bytes=100, min_age_s=HOUR), NOW)) == ["old.mp4"]


def test_protected_files_are_never_deleted_whatever_their_age():
    files = [stored("in-use.png", 10**6, 10 * HOUR), stored("done.mp4", 10, 10 * HOUR)]
    protected = {Path("in-use.png")}
    policy = Policy(max_age_s=HOUR, max_bytes=1, min_age_s=0)
    assert names(plan(files, policy, NOW, protected=lambda path: path in protected)) == ["done.mp4"]


def test_age_and_size_together():
    files = [stored("ancient.mp4", 5, 50 * HOUR), stored("old.mp4", 50, 3 * HOUR), stored("mid.mp4", 50, 2 * HOUR),
             stored("new.mp4", 50, 60)]
    policy = Policy(max_age_s=24 * HOUR, max_bytes=100, min_age_s=HOUR)
    assert names(plan(files, policy, NOW)) == ["ancient.mp4", "old.mp4"]


def make_file(path: Path, size: int, age_s: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_sweep_on_real_folders_skips_links_and_temporary_files(tmp_path):
    now = time.time()
    outputs, inputs, outside = tmp_path / "outputs", tmp_path / "inputs", tmp_path / "outside"
    old = make_file(outputs / "sub" / "old.mp4", 10, 3 * HOUR, now)
    young = make_file(outputs / "young.mp4", 10, 60, now)
    image = make_file(inputs / "T1.png", 10, 3 * HOUR, now)
    writing = make_file(outputs / ".next.mp4.abcd1234.tmp", 10, 3 * HOUR, now)
    secret = make_file(outside / "secret.mp4", 10, 3 * HOUR, now)
    (outputs / "link.mp4").symlink_to(secret)
    (outputs / "linkdir").symlink_to(outside)

    deleted = sweep([outputs, inputs], Policy(max_age_s=HOUR), protected_paths=set(), now=now)

    assert sorted(deleted) == sorted([old, image])
    assert young.exists() and writing.exists() and secret.exists() and (outputs / "link.mp4").is_symlink()
    assert (outputs / "sub").is_dir()  # folders stay: a result may be written into one right now


def test_sweep_keeps_protected_paths(tmp_path):
    now = time.time()
    keep = make_file(tmp_path / "outputs" / "keep.mp4", 10, 3 * HOUR, now)
    assert sweep([tmp_path / "outputs"], Policy(max_age_s=HOUR), {keep.resolve()}, now=now) == []
    assert keep.exists()


def test_temporary_files_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    now = time.time()
    left = [make_file(tmp_path / ".a.mp4.k3j_x9q2.tmp", 5, 0, now),
            make_file(tmp_path / "sub" / ".T1.png.0a1b2c3d.tmp", 5, 0, now)]
    kept = [make_file(tmp_path / "a.mp4", 5, 0, now), make_file(tmp_path / ".hidden", 5, 0, now),
            make_file(tmp_path / "notes.tmp", 5, 0, now), make_file(tmp_path / ".short.tmp", 5, 0, now)]
    assert remove_temporary_files(tmp_path) == 2
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)
    assert {item.path for item in scan(tmp_path)} == set(kept)


def test_the_service_sweeps_old_results_keeps_records_and_says_why_the_result_is_gone(tmp_path):
    with AppHarness(tmp_path, retention_max_age=HOUR, retention_interval=3600) as app:
        task_id = app.client.post("/v1/tasks/", json={"infer_steps": 1}).json()["task_id"]
        assert wait_status(app.client, task_id)["status"] == "completed"
        result = app.outputs / f"{task_id}.mp4"
        run_sweep(app)
        assert result.exists()  # young: kept
        os.utime(result, (time.time() - 2 * HOUR,) * 2)
        run_sweep(app)
        assert not result.exists()
        record = app.client.get(f"/v1/tasks/{task_id}/status").json()
        assert record["status"] == "completed"  # the record stays
        gone = app.client.get(f"/v1/tasks/{task_id}/result")
        assert gone.status_code == 404 and "retention" in gone.json()["detail"]


def test_the_service_keeps_the_files_of_unfinished_tasks(tmp_path):
    fake = FakeTritonClient(step_delay_s=0.05)
    with AppHarness(tmp_path, fake=fake, retention_max_age=HOUR, retention_max_bytes=1, retention_min_age=0,
                    retention_interval=3600) as app:
        running = app.client.post("/v1/tasks/", json={"infer_steps": 50}).json()["task_id"]
        pending = app.client.post("/v1/tasks/", json={"save_video_path": "shared.mp4"}).json()["task_id"]
        old_result = make_file(app.outputs / "shared.mp4", 100, 5 * HOUR, time.time())  # an earlier task's
        run_sweep(app)
        assert old_result.exists()  # the pending task will write there: not the sweep's to take
        app.client.delete(f"/v1/tasks/{pending}")
        app.client.delete(f"/v1/tasks/{running}")
        run_sweep(app)
        assert not old_result.exists()


def run_sweep(app: AppHarness) -> list[Path]:
    return app.client.portal.call(app.service.retention.run_once)


def test_retention_settings_are_checked(monkeypatch):
    from frontend.settings import parse_settings

    monkeypatch.setenv("WAN_RETENTION_MAX_AGE", "604800")
    monkeypatch.setenv("WAN_RETENTION_MAX_BYTES", "1000000")
    settings = parse_settings(["--retention-min-age", "60"])
    assert (settings.retention_max_age, settings.retention_max_bytes, settings.retention_min_age) == \
        (604800.0, 1000000, 60.0)
    for bad in (["--retention-interval", "0"], ["--retention-max-age", "-1"]):
        with pytest.raises(SystemExit):
            parse_settings(bad)


def test_the_sweep_runs_in_the_background(tmp_path):
    async def scenario():
        from frontend.retention import RetentionSweeper

        old = make_file(tmp_path / "old.mp4", 1, 2 * HOUR, time.time())
        sweeper = RetentionSweeper([tmp_path], Policy(max_age_s=HOUR), 0.01, protected=set)
        sweeper.start()
        for _ in range(200):
            if not old.exists():
                break
            await asyncio.sleep(0.01)
        await sweeper.stop()
        assert not old.exists() and sweeper.deleted_total == 1

    asyncio.run(scenario())
