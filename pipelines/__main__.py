"""``python -m pipelines ...`` is the ``fcclip`` command (for an environment whose scripts are not on PATH)."""
import sys

from pipelines.cli import main

sys.exit(main())
