#!/usr/bin/env python
"""Submit an `fcclip` command to a Ray cluster and follow it (same as `fcclip submit`).

    python cluster/submit.py --address http://127.0.0.1:8265 -- fcclip label s3://b/in/ --out s3://b/out/ --vocab V

It runs from a checkout without the package installed (Ray and PyYAML are what it needs): the checkout's pipelines/
folder is imported as the package it installs as, fcclip_pipelines.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if importlib.util.find_spec("fcclip_pipelines") is None:
    sys.path.insert(0, str(ROOT))  # fcclip/
    spec = importlib.util.spec_from_file_location(
        "fcclip_pipelines", ROOT / "pipelines" / "__init__.py", submodule_search_locations=[str(ROOT / "pipelines")])
    sys.modules["fcclip_pipelines"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["fcclip_pipelines"])

from fcclip_pipelines.submit import add_arguments, main_args  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="cluster/submit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main_args(parser.parse_args()))
