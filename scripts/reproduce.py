"""Reproduce the Token Cropr paper's core comparison at small scale: `python scripts/reproduce.py --help`.

Full run (about an hour on a 2-core CPU): `python scripts/reproduce.py`; smoke test: `python scripts/reproduce.py
--quick --output-dir /tmp/cropr-quick`. Results, report and figures go to `docs/` by default.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds experiments/

from experiments.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
