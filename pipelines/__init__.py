"""The ``fcclip`` command (cli.py, one module per subcommand) and the Ray jobs around the fcclip model library:
labeling (label.py with sources, stages and engine), the labeling output's format (output.py), training (train.py),
evaluation (evaluate.py), reports (show/) and job submission (submit.py). The dependency points one way: these
modules import ``fcclip``, never the reverse. This folder (pipelines/ in the repository) installs as the package
``fcclip_pipelines``."""
