"""Peak resident memory of a process, its own and nobody else's.

Linux's ``ru_maxrss`` (``getrusage``, ``wait4``) is not only the process's own peak: ``exec`` carries
the high-water mark of the address space it replaces over, so a child forked from a large process
(a benchmark that has already evaluated a model, say) reports at least that parent's size. ``VmHWM``
in ``/proc/self/status`` is the high-water mark of the process's own address space.

``python -m kdad.utils.memory REPORT SCRIPT [ARGS...]`` runs ``SCRIPT`` as ``__main__`` and writes its
own peak in MB to the file ``REPORT``, also when the script fails; :func:`run_measured` does that
for a parent and returns the child's exit code, wall time and peak.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

#: the folder holding the ``kdad`` package
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` where ``/proc`` has it (Linux),
    else ``ru_maxrss`` (KB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource  # not on Windows, where neither source exists

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2.0**20 if sys.platform == "darwin" else peak / 1024.0


def run_measured(script_and_args: Sequence[str], log_path: str, cwd: Optional[str] = None,
                 ) -> Tuple[int, float, Optional[float]]:
    """Run ``python SCRIPT ARGS...`` with stdout and stderr to ``log_path``; return its exit code,
    wall seconds and own peak memory in MB (None if it died before reporting it)."""
    report = f"{log_path}.peak_mb"
    if os.path.exists(report):
        os.remove(report)
    command = [sys.executable, "-m", "kdad.utils.memory", report, *script_and_args]
    env = dict(os.environ)  # this package importable from any cwd
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                              check=False).returncode
    seconds = time.time() - started
    peak = None
    if os.path.isfile(report):
        with open(report, encoding="utf-8") as handle:
            peak = float(handle.read())
        os.remove(report)
    return code, seconds, peak


def main(argv: List[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m kdad.utils.memory REPORT SCRIPT [ARGS...]")
    report, script = argv[0], argv[1]
    sys.argv = [script, *argv[2:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` would
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(report, "w", encoding="utf-8") as handle:
            handle.write(f"{peak_rss_mb():.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
