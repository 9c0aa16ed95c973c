"""The ``fcclip`` command (cli.py, one module per subcommand) and the Ray jobs around the fcclip model library:
labeling (label.py with sources, stages and sink), training (train.py), evaluation (evaluate.py), reports (show.py)
and job submission (submit.py). The dependency points one way: these modules import ``fcclip``, never the reverse."""
