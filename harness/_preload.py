"""Imported once by the serial executor's fork server, so that each killable job child starts
with the harness and POT already loaded (POT without its torch integration)."""

import harness.runner  # noqa: F401
from harness import metrics

metrics._ot()
