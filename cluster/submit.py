#!/usr/bin/env python
"""Submit an `fcclip` command to a Ray cluster and follow it (same as `fcclip submit`).

    python cluster/submit.py --address http://127.0.0.1:8265 -- fcclip label s3://b/in/ --out s3://b/out/ --vocab V
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcclip_pipelines.submit import add_arguments, main_args  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="cluster/submit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main_args(parser.parse_args()))
