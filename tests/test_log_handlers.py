"""Log lines once: a library that calls logging.basicConfig (open_clip's `logging.warning` does, while
TIGER loads its text tower) must not make every `sak` line print twice."""

import subprocess
import sys

SCRIPT = """
import logging
from sak.cli.common import setup_logging
setup_logging()
setup_logging()  # a second set-up installs nothing more
logging.warning("a library's warning")  # what open_clip does: basicConfig when the root has no handler
logging.getLogger("sak.train").info("step 1/1 | loss 1.0")
"""


def test_each_line_is_printed_once_after_a_library_configures_logging():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines.count("step 1/1 | loss 1.0") == 1 and len(lines) == 2, lines
    assert lines[0] == "WARNING:root:a library's warning"


QUIET = """
import logging, warnings
from sak.cli.common import setup_logging
setup_logging(quiet=True)  # what every torchrun rank but 0 does
logging.warning("a library's warning")
warnings.warn("a library's python warning")
logging.getLogger("sak.train").warning("a sak warning")
logging.getLogger("sak.train").error("a sak error")
"""


def test_ranks_other_than_0_print_errors_only():
    proc = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["a sak error"]
