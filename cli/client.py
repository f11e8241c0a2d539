"""The CLI's side of the API: HTTP over the scheduler's Unix socket. Holds no Redis credentials."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jobs import api
from jobs.text import safe


class DaemonUnreachable(RuntimeError):
    def __init__(self, socket_path: Path, why: str) -> None:
        super().__init__(
            f"cannot reach the gpulab scheduler at {socket_path} ({why}); "
            "start it with 'gpulab up' (one server) or 'gpulab scheduler'"
        )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock

    def exchange(self, method: str, path: str, payload: bytes | None) -> http.client.HTTPResponse:
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        # The scheduler refuses a connection over its caps with an answer, at once, and closes
        # it unread: that answer is waiting here even when our send failed.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.request(method, path, body=payload, headers=headers)
        return self.getresponse()


class ApiClient:
    def __init__(self, socket_path: Path, timeout_s: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None) -> Any:
        conn = _UnixConnection(self.socket_path, timeout_s or self.timeout_s)
        try:
            response = conn.exchange(method, path, None if body is None else json.dumps(body).encode())
            data = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(self.socket_path, exc.strerror or type(exc).__name__) from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise DaemonUnreachable(self.socket_path, str(exc) or type(exc).__name__) from None
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else {}
        except json.JSONDecodeError:
            raise api.ApiError(response.status, f"bad answer from the scheduler: {data[:200]!r}") from None
        if response.status >= 400:
            # Errors may quote what someone sent: one escaped line on the user's terminal.
            error = decoded.get("error", response.reason) if isinstance(decoded, dict) else response.reason
            raise api.ApiError(response.status, safe(error, 500))
        return decoded

    def submit(self, spec: dict[str, Any]) -> int:
        return int(self.request("POST", api.jobs_path(), spec)["id"])

    def submit_answer(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The whole answer to a submit: the id, and a new webhook secret when one was made."""
        return dict(self.request("POST", api.jobs_path(), spec))

    def jobs(self, *, all_jobs: bool = False) -> list[dict[str, Any]]:
        query = "?" + urlencode({"all": "1"}) if all_jobs else ""
        return list(self.request("GET", api.jobs_path() + query)["jobs"])

    def jobs_page(self, query: dict[str, Any]) -> dict[str, Any]:
        """One page of `GET /v1/jobs` (filters: user, me, state, name; all, limit, cursor)."""
        params = urlencode({k: v for k, v in query.items() if v not in (None, "", False)})
        return dict(self.request("GET", api.jobs_path() + (f"?{params}" if params else "")))

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self.request("GET", api.job_path(job_id)))

    def action(self, job_id: int, action: str) -> dict[str, Any]:
        return dict(self.request("POST", api.job_path(job_id, action), {}))

    def bulk_action(self, action: str, job_ids: list[int], arrays: list[int] | None = None) -> list[dict[str, Any]]:
        """One action on many jobs, and on every task of the `arrays`, in one call."""
        body = {"ids": job_ids, "arrays": arrays or []}
        return list(self.request("POST", api.bulk_path(action), body, timeout_s=max(self.timeout_s, 300.0))["results"])

    def log(self, job_id: int, offset: int, wait_s: float = 0.0, as_base64: bool = False) -> dict[str, Any]:
        """Output from `offset`; with `wait_s`, the scheduler holds the answer until there is some
        (or the job changes state), at most that long. `as_base64`: `data` is the bytes as
        written, base64-encoded (else text, with U+FFFD for bytes that are not UTF-8)."""
        query: dict[str, object] = {"offset": offset} | ({"wait": wait_s} if wait_s > 0 else {})
        query |= {"encoding": "base64"} if as_base64 else {}
        path = api.job_path(job_id, "log") + "?" + urlencode(query)
        return dict(self.request("GET", path, timeout_s=wait_s + 30 if wait_s > 0 else None))

    def wait(self, job_id: int, timeout_s: float) -> dict[str, Any]:
        query = "?" + urlencode({"timeout": timeout_s})
        return dict(self.request("GET", api.job_path(job_id, "wait") + query, timeout_s=timeout_s + 10))

    def gpus(self) -> dict[str, Any]:
        return dict(self.request("GET", api.gpus_path()))

    def history(self, **query: Any) -> list[dict[str, Any]]:
        params = urlencode({k: v for k, v in query.items() if v not in (None, "")})
        return list(self.request("GET", f"{api.API_PREFIX}/history" + (f"?{params}" if params else ""))["jobs"])

    def profiles(self, user: str = "") -> dict[str, Any]:
        query = "?" + urlencode({"user": user}) if user else ""
        return dict(self.request("GET", f"{api.API_PREFIX}/profiles" + query))

    def preview_memory(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", f"{api.API_PREFIX}/profiles/resolve", spec))
