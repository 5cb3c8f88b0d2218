"""Run the ``vitxai`` CLI with a fault injected at one named write event (tests only).

    python tests/fault_driver.py SPEC -- vitxai-arguments...

Every durable write of the store is an event: ``write:NAME`` before an atomic file write,
``tmp-written:NAME`` when its temporary file is complete but not yet renamed, ``renamed:NAME``
after the rename, ``append:NAME`` / ``appended:NAME`` around a CSV append. SPEC is

- ``record:FILE``: run normally and write the event names, one a line, to FILE;
- ``kill:PREFIX#N``: SIGKILL this process at the N-th event whose name starts with PREFIX;
- ``kill:@N``: SIGKILL at the N-th event of any kind;
- ``pause:PREFIX#N``: at that event, create the file named by $FAULT_PAUSE_FILE and wait
  (60 s at most) until it is removed;
- ``efbig:PREFIX#N``: at the N-th CSV append whose event starts with PREFIX, lower
  RLIMIT_FSIZE to the file's size + 30 bytes, so that the kernel stops the append mid-row
  with EFBIG, as a full disk would (the limit is restored right after that append);
- ``efbig-kill:PREFIX#N``: the same, then SIGKILL before any clean-up, leaving the partial
  row on disk.

Exit status 3 means the program ended without reaching the fault. ``fault_driver.py serve``
runs many such jobs from one process that has imported torch and timm once (see
:func:`serve`), which keeps a chain of faulted runs fast.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path


def run(spec: str, argv: list[str]) -> int:
    """Run the CLI with ``argv`` and the fault ``spec`` (see the module docstring)."""
    kind, _, target = spec.partition(":")
    prefix, _, nth = target.partition("#")
    events: list[str] = []

    def event(name: str, path: Path | None = None) -> None:
        events.append(name)
        hit = target == f"@{len(events)}" or (
            name.startswith(prefix) and nth.isdigit()
            and sum(e.startswith(prefix) for e in events) == int(nth))
        if kind == "kill" and hit:
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "pause" and hit:
            flag = Path(os.environ["FAULT_PAUSE_FILE"])
            flag.touch()
            for _ in range(600):
                if not flag.exists():
                    break
                time.sleep(0.1)
        if kind.startswith("efbig") and hit and path is not None:
            size = path.stat().st_size if path.exists() else 0
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 30, resource.RLIM_INFINITY))

    import vitxai.report.figures as figures
    import vitxai.store as store

    real_atomic, real_append = store.atomic_write, store.append_csv

    def atomic_write(path, write):
        name = Path(path).name

        def traced(tmp):
            write(tmp)
            event(f"tmp-written:{name}")

        event(f"write:{name}")
        result = real_atomic(path, traced)
        event(f"renamed:{name}")
        return result

    def append_csv(path, rows):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        event(f"append:{Path(path).name}", Path(path))
        try:
            result = real_append(path, rows)
        except OSError:
            if kind == "efbig-kill":  # die with the fragment on disk, before any clean-up
                os.kill(os.getpid(), signal.SIGKILL)
            raise
        finally:  # the limit stops this append only, not the error message after it
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        event(f"appended:{Path(path).name}")
        return result

    store.atomic_write = figures.atomic_write = atomic_write
    store.append_csv = append_csv
    from vitxai.cli import main as cli_main

    code = cli_main(argv)
    if kind == "record":
        Path(target).write_text("\n".join(events) + "\n")
        return code
    return 3 if code == 0 else code


def serve() -> None:
    """Fork server: import the heavy modules once, then run each job in a forked child.

    Reads JSON lines ``{"op": "start", "spec", "argv", "env", "stdout", "stderr"}`` (answers
    ``{"pid"}``) and ``{"op": "wait", "pid"}`` (answers ``{"status"}``: the exit code, or
    minus the signal that ended the child). The server runs no torch operation itself, so
    no thread pool exists yet when it forks.
    """
    import matplotlib.pyplot  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    import vitxai.cli  # noqa: F401
    import vitxai.compare  # noqa: F401
    import vitxai.evaluate  # noqa: F401
    import vitxai.models.bundled  # noqa: F401
    import vitxai.report.html  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if job["op"] == "wait":
            _, status = os.waitpid(job["pid"], 0)
            code = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                    else -os.WTERMSIG(status))
            print(json.dumps({"status": code}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(job["env"])
                for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                    target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                sys.stdin.close()
                code = run(job["spec"], job["argv"])
            except BaseException:  # noqa: BLE001 - the child must always reach _exit
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)


def main() -> int:
    if sys.argv[1:] == ["serve"]:
        serve()
        return 0
    spec, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: fault_driver.py SPEC -- ARGS | fault_driver.py serve"
    return run(spec, argv)


if __name__ == "__main__":
    sys.exit(main())
