"""Print the service status, the task list and (with --task-id) one task's record, as lightx2v's check_status.py.

    python scripts/check_status.py [--url http://127.0.0.1:8000] [--task-id ID] [--limit 20] [--status pending]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_client import add_server_arguments, open_client  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--task-id", help="also show this task's record")
    parser.add_argument("--limit", type=int, default=20, help="newest tasks to list")
    parser.add_argument("--status", help="list only tasks in this state")
    args = parser.parse_args(argv)
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    with open_client(args, timeout=10) as client:
        try:
            print("service:", json.dumps(client.get("/v1/service/status").json()))
            tasks = client.get("/v1/tasks/", params=params).json()
            print("tasks:", json.dumps(tasks, indent=2, ensure_ascii=False))
            if args.task_id:
                response = client.get(f"/v1/tasks/{args.task_id}/status")
                print(f"task {args.task_id}:", json.dumps(response.json(), indent=2, ensure_ascii=False))
                return 0 if response.status_code == 200 else 1
        except httpx.HTTPError as error:
            print(f"request failed: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
