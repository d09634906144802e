"""The examples folder goes at the END of ``sys.path``, so that the tests import the examples as
a user runs them, by file, while an installed ``d2sm_loss`` still comes first."""

import sys
from pathlib import Path

EXAMPLES = str(Path(__file__).resolve().parents[1])
if EXAMPLES not in sys.path:
    sys.path.append(EXAMPLES)
