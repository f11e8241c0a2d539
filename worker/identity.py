"""Who a job runs as. A worker running as root runs each job as the Unix user who submitted
it (uid, primary gid, supplementary groups, home); a worker running as anyone else runs only
that user's own jobs. A job never runs as root unless root submitted it."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path


class IdentityError(RuntimeError):
    """This worker cannot run the job as its owner; the message says why."""


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    groups: tuple[int, ...]
    user: str
    home: str

    def environment(self) -> dict[str, str]:
        return {"USER": self.user, "LOGNAME": self.user, "HOME": self.home}

    def own(self, path: Path, mode: int) -> None:
        """Hand a file or directory the job writes to its owner, private to them."""
        os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)


def resolve_run_as(job_uid: int) -> RunAs | None:
    """None: run as this worker's own user (it is the job's owner)."""
    me = os.geteuid()
    if job_uid == me:
        return None
    if me != 0:
        raise IdentityError(
            f"this worker runs as uid {me} and runs only that user's jobs, not uid {job_uid}'s; "
            "run the worker as root to serve several users"
        )
    try:
        entry = pwd.getpwuid(job_uid)
    except KeyError:
        raise IdentityError(f"uid {job_uid} does not exist on this node") from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return RunAs(entry.pw_uid, entry.pw_gid, groups, entry.pw_name, entry.pw_dir)
