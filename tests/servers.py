"""The servers the tests start on loopback (moto, fake-gcs-server, a Ray head, Prometheus, Label Studio): a free port,
and the wait until one answers."""
import socket
import subprocess
import time
import urllib.request
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(request, proc: subprocess.Popen, timeout: float, log: Callable[[], str] = lambda: "",
                      every: float = 0.2) -> None:
    """Until a GET of ``request`` (a URL or a ``urllib.request.Request``) answers 200, polled every ``every`` s while
    ``proc``, the server, runs; ``log()`` (the server's output) goes into the error when it exits or does not answer
    within ``timeout`` s."""
    url = request if isinstance(request, str) else request.full_url
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or an HTTP error status while the server starts
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before serving {url}:\n{log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} was not served within {timeout:.0f} s:\n{log()}")
        time.sleep(every)
