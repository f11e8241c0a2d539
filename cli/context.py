"""What every command shares: the configuration, the API client, and one-line failures."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from cli.client import ApiClient, DaemonUnreachable
from jobs.api import ApiError
from jobs.config import Config, ConfigError, load_config
from jobs.text import safe

EXIT_USAGE = 2


def fail(message: str, code: int = 1) -> NoReturn:
    # One printable line: a message may quote what Redis held (a worker's refusal names the
    # holder of a GPU claim, which anyone able to write Redis can set to escape sequences).
    click.echo(f"gpulab: {safe(message, 2000)}", err=True)
    sys.exit(code)


class Context:
    def __init__(self) -> None:
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config()
            except ConfigError as exc:
                fail(str(exc), EXIT_USAGE)
        return self._config

    def client(self) -> ApiClient:
        return ApiClient(self.config.socket_path)

    def call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except DaemonUnreachable as exc:
            fail(str(exc), 1)
        except ApiError as exc:
            # Bad input or a refused request (including a per-user limit, 429): exit 2.
            # Permission denied (403: not the job's owner nor an admin) and daemon trouble: exit 1.
            fail(exc.message, EXIT_USAGE if exc.status in (400, 404, 409, 413, 429) else 1)


pass_ctx = click.make_pass_decorator(Context, ensure=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


