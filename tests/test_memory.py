"""Peak memory of a process (kdad.utils.memory): its own, not the RSS of the parent that started it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdad.utils.memory import run_measured

linux_only = pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux /proc")

CHILD = """
import sys
import numpy as np
block = np.ones({mb} * 2**20 // 8)  # touched: {mb} MB resident
with open(sys.argv[1], "w") as handle:
    handle.write(" ".join(sys.argv[1:]))
raise SystemExit({code})
"""


@linux_only
def test_peak_grows_with_what_the_process_touches(tmp_path):
    """In a fresh process (here, freed memory of earlier tests could be reused without growing)."""
    script = tmp_path / "grow.py"
    script.write_text(
        "import json, numpy as np\n"
        "from kdad.utils.memory import peak_rss_mb\n"
        "def rss():\n"
        "    lines = open('/proc/self/status').read().splitlines()\n"
        "    return next(int(l.split()[1]) for l in lines if l.startswith('VmRSS:')) / 1024\n"
        "before, peak_before = rss(), peak_rss_mb()\n"
        "block = np.ones(300 * 2**20 // 8)  # 300 MB, every page written\n"
        "print(json.dumps([before, peak_before, rss(), peak_rss_mb()]))\n")
    code, _, _ = run_measured([str(script)], str(tmp_path / "grow.log"))  # kdad importable there
    assert code == 0
    before, peak_before, after, peak_after = json.loads((tmp_path / "grow.log").read_text().splitlines()[-1])
    assert after >= before + 250 and peak_before >= before
    assert peak_after >= after and peak_after >= peak_before + 250


@linux_only
def test_a_child_reports_its_own_peak_not_its_large_parent(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(mb=80, code=3))
    parent = np.ones(1200 * 2**20 // 8)  # this process: 1.2 GB resident when it starts the child
    # what ru_maxrss says of such a child: at least the parent's size (the reason for kdad.utils.memory)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "plain.txt")])
    _, _, usage = os.wait4(child.pid, 0)
    assert usage.ru_maxrss / 1024.0 >= 1100

    code, seconds, peak = run_measured([str(script), str(tmp_path / "args.txt"), "--flag", "x y"],
                                       str(tmp_path / "child.log"))
    assert code == 3 and seconds > 0
    assert 80 <= peak < 400, peak  # the child's 80 MB block plus Python and numpy, not 1.2 GB
    assert (tmp_path / "args.txt").read_text() == f"{tmp_path / 'args.txt'} --flag x y"
    assert not os.path.exists(str(tmp_path / "child.log") + ".peak_mb")  # read and removed
    del parent


def test_a_failing_script_still_reports_and_its_error_is_logged(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("raise ValueError('bad input in fails.py')\n")
    code, _, peak = run_measured([str(script)], str(tmp_path / "fails.log"))
    assert code == 1 and peak is not None and peak > 0
    assert "ValueError: bad input in fails.py" in (tmp_path / "fails.log").read_text()
