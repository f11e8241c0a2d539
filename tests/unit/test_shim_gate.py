"""The shim's gate in C (worker/native/gate.c) does what the Python gate does: the command's
process from fork to exec, held until the worker's go. Each test runs a real command through
both (tests/helpers/gate_probe.py) and compares; the library is built by scripts/bootstrap."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.stack import eventually
from worker import shim

PROBE = str(Path(__file__).resolve().parents[1] / "helpers" / "gate_probe.py")
MODES = ("native", "python")
# What the command reports of itself: session, stdin, open fds, arguments, environment.
INTROSPECT = (
    "import os, json;"
    "print(json.dumps({'leader': os.getsid(0) == os.getpid(), 'stdin': os.readlink('/proc/self/fd/0'),"
    "'fds': sorted(os.listdir('/proc/self/fd')),"
    "'argv': __import__('sys').argv[1:], 'env': {k: v for k, v in os.environ.items() if k.startswith('G')}}))"
)


def probe(mode: str, action: str, launch: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the command's stdout, the probe's result) for one command through one gate."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", PROBE, mode, action, json.dumps(launch)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(done.stderr.strip().splitlines()[-1])


def launch(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    return {"cwd": str(tmp_path), "argv": argv, "env": {"PATH": "/usr/bin:/bin"} if env is None else env}


def both(tmp_path: Path, action: str, argv: list[str], env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The same command through both gates; they must agree. Returns the native one's answer."""
    native, python = (probe(mode, action, launch(tmp_path, argv, env)) for mode in MODES)
    assert native == python
    return native


def test_the_native_gate_is_built_and_loaded_here() -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: scripts/bootstrap leaves the Python gate in place")
    assert shim.NATIVE_GATE is not None, f"{shim.NATIVE_GATE_PATH} not built or not trusted"


def test_the_command_starts_alone_in_its_session_with_its_argv_and_env(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "GREETING": "h\u00e9llo \x01", "=odd": "a first '=' is a name"}
    out, result = both(tmp_path, "go", [sys.executable, "-I", "-c", INTROSPECT, "x y", "\u00e9\x7f"], env)
    assert result == {"failure": "", "code": 0}
    seen = json.loads(out)
    assert seen["leader"] and seen["stdin"] == "/dev/null"
    assert seen["fds"] == ["0", "1", "2", "3"]  # 3: the listdir's own; nothing of the shim's leaks
    assert seen["argv"] == ["x y", "\u00e9\x7f"] and seen["env"] == {"GREETING": "h\u00e9llo \x01"}


def test_the_command_starts_with_no_signal_ignored_or_blocked(tmp_path: Path) -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and an ignored signal survives exec: a job's
    `yes | head` would then see EPIPE errors instead of dying quietly."""
    out, result = both(tmp_path, "go", ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    assert result == {"failure": "", "code": 0}
    assert out.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]


def test_a_gate_closed_without_go_starts_nothing(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    out, result = both(tmp_path, "close", ["/bin/sh", "-c", f"touch {ran}"])
    assert result == {"failure": "", "code": 127} and out == ""
    assert not ran.exists()


@pytest.mark.parametrize(
    "argv, why",
    [
        (["no-such-command-gpulab"], "No such file or directory"),
        (["/nonexistent/dir/cmd"], "No such file or directory"),
        (["/etc/passwd/x"], "Not a directory"),
        (["/etc/passwd"], "Permission denied"),
        (["/tmp"], "Permission denied"),
    ],
)
def test_a_command_that_cannot_start_fails_with_the_same_line(tmp_path: Path, argv: list[str], why: str) -> None:
    _, result = both(tmp_path, "go", argv)
    assert result == {"failure": f"cannot start {argv[0]!r}: {why}", "code": 127}


def test_an_executable_without_a_shebang_is_not_run_by_a_shell(tmp_path: Path) -> None:
    """os.execvpe does not fall back to /bin/sh on ENOEXEC (execvp(3) would): neither does the C gate."""
    script = tmp_path / "script"
    script.write_text(f"touch {tmp_path / 'ran'}\n")
    script.chmod(0o755)
    _, result = both(tmp_path, "go", [str(script)])
    assert result == {"failure": f"cannot start {str(script)!r}: Exec format error", "code": 127}
    assert not (tmp_path / "ran").exists()


def test_the_path_search_keeps_the_first_real_error_and_goes_on(tmp_path: Path) -> None:
    """As os.execvpe: an entry that is not executable is remembered, a later one that is
    runs; with none, the remembered error (not the last 'not found') is the answer."""
    locked, real, empty = tmp_path / "locked", tmp_path / "real", tmp_path / "empty"
    for folder in (locked, real, empty):
        folder.mkdir()
    (locked / "tool").write_text("#!/bin/sh\necho locked\n")
    (real / "tool").write_text("#!/bin/sh\necho real\n")
    (real / "tool").chmod(0o755)
    out, result = both(tmp_path, "go", ["tool"], {"PATH": f"{empty}:{locked}:{real}"})
    assert (out, result) == ("real\n", {"failure": "", "code": 0})
    _, result = both(tmp_path, "go", ["tool"], {"PATH": f"{empty}:{locked}:/nonexistent"})
    assert result["failure"] == "cannot start 'tool': Permission denied"
    _, result = both(tmp_path, "go", ["tool"], {})  # no PATH: os.defpath, as os.execvpe
    assert result["failure"] == "cannot start 'tool': No such file or directory"


@pytest.mark.parametrize(
    "argv, env",
    [
        (["/bin/echo", "nul\x00byte"], {}),
        (["/bin/echo"], {"A=B": "x"}),
        (["/bin/echo"], {"": "x"}),
        (["/bin/echo"], {"A": "nul\x00"}),
        ([""], {}),
        (["/bin/echo", "\ud800"], {}),
    ],
)
def test_what_execve_refuses_is_left_to_the_python_gate(tmp_path: Path, argv: list[str], env: dict[str, str]) -> None:
    assert shim.native_gate_call(argv, env) is None
    _, result = both(tmp_path, "go", argv, env)
    assert result["failure"].startswith(f"cannot start {argv[0]!r}: ") and result["code"] == 127


def test_an_error_line_past_the_cap_is_cut_like_the_python_one(tmp_path: Path) -> None:
    name = "x" * 3000
    _, result = both(tmp_path, "go", [f"/nonexistent/{name}"])
    assert len(result["failure"].encode()) == 2000


@pytest.mark.parametrize("mode", MODES)
def test_the_held_command_dies_with_its_shim(tmp_path: Path, mode: str) -> None:
    ran = tmp_path / "ran"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            PROBE,
            mode,
            "hold",
            json.dumps(launch(tmp_path, ["/bin/sh", "-c", f"touch {ran}"])),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    child = psutil.Process(int(proc.stderr.readline()))
    assert child.ppid() == proc.pid
    proc.kill()
    proc.wait()
    eventually(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=10)
    assert not ran.exists()


def _copy_shim(tmp_path: Path) -> Path:
    folder = tmp_path / "worker"
    (folder / "native").mkdir(parents=True)
    shutil.copy(shim.__file__, folder / "shim.py")
    shutil.copy(shim.NATIVE_GATE_PATH, folder / "native" / "libgpulab_gate.so")
    tmp_path.chmod(0o755)
    return folder


def _loads_native(folder: Path) -> bool:
    check = f"import sys; sys.path.insert(0, {str(folder)!r}); import shim; print(shim.NATIVE_GATE is not None)"
    return (
        subprocess.run([sys.executable, "-I", "-S", "-c", check], capture_output=True, text=True, check=True).stdout
        == "True\n"
    )


@pytest.mark.parametrize("where", ["library", "folder"])
def test_a_gate_library_others_can_write_is_not_loaded(tmp_path: Path, where: str) -> None:
    """The fork server (root) loads it: a library or folder writable by a lab member would be
    their code in root's process. The Python gate is used instead."""
    if shim.NATIVE_GATE is None:
        pytest.skip("the native gate is not built here")
    folder = _copy_shim(tmp_path)
    assert _loads_native(folder)
    target = folder / "native" / ("libgpulab_gate.so" if where == "library" else "")
    target.chmod(target.stat().st_mode | stat.S_IWOTH)
    assert not _loads_native(folder)


def test_a_gate_library_owned_by_someone_else_is_not_loaded(tmp_path: Path) -> None:
    if shim.NATIVE_GATE is None or os.geteuid() != 0:
        pytest.skip("needs the native gate and root (to give the file away)")
    folder = _copy_shim(tmp_path)
    os.chown(folder / "native" / "libgpulab_gate.so", 65534, 65534)
    assert not _loads_native(folder)
