"""`python -m frontend [flags]`: serve the /v1 API with uvicorn (`--help` lists every setting)."""

from __future__ import annotations

import json
import logging
import logging.config
import sys

import uvicorn

from frontend.app import create_app
from frontend.server import DrainingServer
from frontend.settings import Settings, parse_settings

_RECORD_FIELDS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """`time level logger [task=ID] message`: every lifecycle line names its task."""

    def format(self, record: logging.LogRecord) -> str:
        task = getattr(record, "task_id", None)
        record.task_tag = f" [task={task}]" if task else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with `task_id` and any other `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update({key: value for key, value in record.__dict__.items()
                      if key not in _RECORD_FIELDS and not key.startswith("_") and key != "task_tag"})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> dict:
    """Logging for our loggers and uvicorn's; returns the dictConfig that uvicorn is given too."""
    formatter = ({"()": JsonFormatter} if settings.log_format == "json" else
                 {"()": TextFormatter, "fmt": "%(asctime)s %(levelname)s %(name)s%(task_tag)s %(message)s"})
    level = settings.log_level.upper()
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {
            "frontend": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }
    logging.config.dictConfig(config)
    return config


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    log_config = configure_logging(settings)
    app = create_app(settings)
    # h11, not httptools even where installed: h11 answers an oversized request head with 400; uvicorn's
    # httptools protocol buffers headers of any size.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=log_config, http="h11",
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=10,
                            limit_concurrency=settings.max_connections, access_log=settings.access_log)
    DrainingServer(config, drain=app.state.service.drain).run()


if __name__ == "__main__":
    main(sys.argv[1:])
