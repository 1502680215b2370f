"""What the /v1 client scripts share: the server options and an HTTP client that sends the API key."""

from __future__ import annotations

import argparse
import os

import httpx


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the /v1 API")
    parser.add_argument("--api-key", default=os.environ.get("WAN_API_KEY", "").split(",")[0] or None,
                        help="sent as 'Authorization: Bearer KEY' (default: the first key of $WAN_API_KEY)")


def open_client(args: argparse.Namespace, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), timeout=timeout, headers=headers)
