"""Markdown tables of our per-class results against published numbers, one report per method and
backbone (see kdad/accuracy_table.py):
python tools/accuracy_table.py --log_dir logs --tolerance 2.0 [--method padim]"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.accuracy_table import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
