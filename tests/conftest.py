from __future__ import annotations

import os

# Keep torch from oversubscribing the two cores the tests run on.
os.environ.setdefault("OMP_NUM_THREADS", "1")
