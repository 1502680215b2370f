"""Stop the running task (DELETE /v1/tasks/running), or cancel one task by id (DELETE /v1/tasks/{id}).

    python scripts/stop_running_task.py [--url http://127.0.0.1:8000] [--task-id ID]
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
    parser.add_argument("--task-id", help="cancel this task (pending or running) instead of the running one")
    args = parser.parse_args(argv)
    path = f"/v1/tasks/{args.task_id}" if args.task_id else "/v1/tasks/running"
    with open_client(args, timeout=10) as client:
        try:
            response = client.delete(path)
        except httpx.HTTPError as error:
            print(f"request failed: {error}", file=sys.stderr)
            return 2
    print(json.dumps(response.json()))
    return 0 if response.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
