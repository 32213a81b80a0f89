"""The first process inside a sandbox (see ``daemon/sandbox.py``): PID 1 of its PID namespace.

Run as ``python -I -S sandbox_init.py [--listen HOST:PORT=SOCKET]... -- COMMAND [ARG...]`` by
the Python that runs ticketd, so it imports the standard library only, never ``daemon``. It

1. listens on each HOST:PORT (loopback addresses of the sandbox's own network) and relays every
   connection to the Unix socket SOCKET, where the daemon's side of the relay waits;
2. starts COMMAND with the signal state it would have outside (nothing blocked or ignored);
3. reaps every process orphaned to it, and passes SIGTERM, SIGINT, SIGHUP and SIGQUIT on to
   every process in the sandbox;
4. exits with COMMAND's exit status (128+N when signal N ended it). Being PID 1, its exit ends
   the namespace: the kernel kills every process left in it, ``setsid`` or not.

Exit status 125: the relays could not be set up; 126/127: COMMAND could not be started.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import threading
from contextlib import suppress

CHUNK = 65536
FORWARDED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})
WAITED = FORWARDED | {signal.SIGCHLD}
SETUP_FAILED = 125


def pump(a: socket.socket, b: socket.socket, stop: int | None = None) -> None:
    """Copy bytes both ways between two connected sockets until both directions reach end of
    file, an error occurs, or the file descriptor ``stop`` becomes readable; close both.

    The daemon's side of the relay uses it too."""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            if stop is not None:
                sel.register(stop, selectors.EVENT_READ, None)
            open_directions = 2
            while open_directions:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    src, dst = key.fileobj, key.data
                    assert isinstance(src, socket.socket)
                    data = src.recv(CHUNK)
                    if data:
                        dst.sendall(data)
                        continue
                    sel.unregister(src)
                    open_directions -= 1
                    with suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        a.close()
        b.close()


def _serve(listener: socket.socket, path: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_relay, args=(conn, path), daemon=True).start()


def _relay(conn: socket.socket, path: str) -> None:
    out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        out.connect(path)
    except OSError:
        out.close()
        conn.close()
        return
    pump(conn, out)


def _listen(spec: str) -> tuple[socket.socket, str]:
    """``HOST:PORT=SOCKET`` -> a socket listening on HOST:PORT, and SOCKET."""
    address, _, path = spec.partition("=")
    host, _, port = address.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, int(port)))
    listener.listen(64)
    return listener, path


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(args: list[str]) -> int:
    if "--" not in args or args.index("--") == len(args) - 1:
        print("usage: sandbox_init.py [--listen HOST:PORT=SOCKET]... -- COMMAND", file=sys.stderr)
        return 2
    split = args.index("--")
    options, command = args[:split], args[split + 1 :]
    if len(options) % 2 or any(flag != "--listen" for flag in options[::2]):
        print(f"sandbox: unknown options {options}", file=sys.stderr)
        return 2
    # Blocked before any thread starts, so every thread inherits the mask and the signals wait
    # for sigwaitinfo below (PID 1 would otherwise never see a signal it has no handler for).
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    try:
        routes = [_listen(spec) for spec in options[1::2]]
    except (OSError, ValueError) as e:
        print(f"sandbox: cannot listen as asked ({' '.join(options)}): {e}", file=sys.stderr)
        return SETUP_FAILED
    for listener, path in routes:
        threading.Thread(target=_serve, args=(listener, path), daemon=True).start()
    try:
        child = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            setsigmask=(),
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED),
        )
    except OSError as e:
        print(f"sandbox: cannot run {command[0]!r}: {e.strerror}", file=sys.stderr)
        return 126 if isinstance(e, PermissionError) else 127
    while True:
        info = signal.sigwaitinfo(WAITED)
        if info.si_signo != signal.SIGCHLD:
            with suppress(ProcessLookupError):
                os.kill(-1, info.si_signo)  # every process in the sandbox but this one
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                return _exit_code(status)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # relay threads may be mid-copy: do not wait for them
