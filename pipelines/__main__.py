"""``python -m fcclip_pipelines ...`` is the ``fcclip`` command (for an environment whose scripts are not on PATH)."""
from fcclip_pipelines.cli import run

run()
