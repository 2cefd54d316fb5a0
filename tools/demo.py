"""Run the whole job end to end on generated data: python tools/demo.py"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from kdad.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
