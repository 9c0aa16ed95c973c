"""Ray jobs around the fcclip model library: labeling (label.py), and more to come."""
