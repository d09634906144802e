"""The checkout's root goes at the END of ``sys.path``, so that ``import experiments`` works
while an installed ``d2sm_loss`` still comes before the checkout's."""

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.append(REPO)
