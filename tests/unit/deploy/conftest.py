"""Make deploy_spec importable from the tests beside it.

pytest runs with --import-mode=importlib, which does not put test folders on sys.path; the shared
contract for these tests lives in one plain module next to them.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
