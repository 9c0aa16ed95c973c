"""``python -m fcclip_pipelines ...`` is the ``fcclip`` command (for an environment whose scripts are not on PATH)."""
import sys

from fcclip_pipelines.cli import main

sys.exit(main())
