"""Reproduce the Token Cropr paper's core comparison at small scale: `python scripts/reproduce.py --help`.

Full run (about an hour on a 2-core CPU): `python scripts/reproduce.py`; smoke test: `python scripts/reproduce.py
--quick --output-dir /tmp/cropr-quick`. Results, report and figures go to `docs/` by default.
"""

import sys

from cropr.reproduce import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
