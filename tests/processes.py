"""Several processes started together (the multi-process tests): a free port, and all run to the end."""

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands, envs, timeout: float = 300, **popen) -> list:
    """Start one process per (command, env), wait for all: [(returncode, stdout, stderr)].
    Any still running after ``timeout`` (or an error) is killed, never left behind."""
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
             for command, env in zip(commands, envs)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
