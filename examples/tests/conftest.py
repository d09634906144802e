"""The examples folder goes at the END of ``sys.path`` so that the tests import the examples as
a user runs them (an installed ``d2sm_loss`` still comes before the checkout's)."""

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1]
for path in (str(EXAMPLES.parent), str(EXAMPLES)):
    if path not in sys.path:
        sys.path.append(path)
