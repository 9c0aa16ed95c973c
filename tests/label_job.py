"""`fcclip label` with stand-in stages that really fail, handed to the job through its Python API.

    python tests/label_job.py [--fault KIND:NAME ...] [--hanging-model] -- SOURCE --out DEST ... (fcclip label's)

--fault KIND:NAME  the reader (URI -> bytes, run in the decode tasks within the decode time limit) misbehaves on URIs
                   containing NAME: ``crash`` ends its worker (as a decoder segfault would), ``hang`` sleeps in
                   Python (a read that never returns), ``stall`` sleeps with SIGALRM blocked (a decoder stuck in
                   native code, out of the time limit's alarm);
--hanging-model    the model stage is a stand-in that segments each image as one "thing" segment, and never returns
                   from a batch holding an image whose top-left pixel is pure magenta (255, 0, 255);
--model-seconds S  ... and takes S seconds for every other batch;
--slow-model S     the model stage is a stand-in that takes S seconds per image and names in its model id the GPUs
                   Ray assigned to its actor (the rows' ``model`` column shows them);
--log-reads FILE   each read appends a line to FILE: the Ray node type it ran on ($RAY_NODE_TYPE_NAME, set on the
                   nodes of a fake autoscaling cluster) and the time it read;
--read-seconds S   each read takes S seconds more (decode tasks that keep asking for CPUs).

Run as a script, so that Ray ships these classes to its workers by value: production code has no switch for them.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcclip_pipelines.label import add_arguments, main_args  # noqa: E402
from fcclip_pipelines.stages import read_bytes  # noqa: E402

MAGENTA = (255, 0, 255)


class FaultyReader:
    def __init__(self, faults: list[tuple[str, str]], log: str | None = None, seconds: float = 0.0):
        self.faults = faults
        self.log = log
        self.seconds = seconds

    def __call__(self, uri: str) -> bytes:
        time.sleep(self.seconds)
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.environ.get('RAY_NODE_TYPE_NAME', 'head')} {time.time()}\n")
        for kind, needle in self.faults:
            if needle in uri:
                if kind == "crash":
                    os._exit(77)
                if kind == "hang":
                    time.sleep(3600)
                if kind == "stall":
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                    time.sleep(3600)
        return read_bytes(uri)


class HangingModel:
    model_id = "hanging-stand-in@none"

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds  # per batch that does not hang

    def __call__(self, images, sizes):
        if any(tuple(int(v) for v in image[0, 0]) == MAGENTA for image in images):
            time.sleep(3600)  # a forward that never returns
        time.sleep(self.seconds)
        segment = {"id": 1, "label": "thing", "category_id": 1, "is_thing": True, "score": 1.0}
        return [(np.ones(size, np.uint8), [segment]) for size in sizes]


class SlowModel:
    def __init__(self, seconds: float):
        import ray

        self.seconds = seconds
        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        self.model_id = f"slow-stand-in@gpus={','.join(gpus) or 'none'}"

    def __call__(self, images, sizes):
        time.sleep(self.seconds * len(images))
        segment = {"id": 1, "label": "thing", "category_id": 1, "is_thing": True, "score": 1.0}
        return [(np.ones(size, np.uint8), [segment]) for size in sizes]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--")
    own = argparse.ArgumentParser()
    own.add_argument("--fault", action="append", default=[])
    own.add_argument("--hanging-model", action="store_true")
    own.add_argument("--model-seconds", type=float, default=0.0)
    own.add_argument("--slow-model", type=float, default=None)
    own.add_argument("--log-reads", default=None)
    own.add_argument("--read-seconds", type=float, default=0.0)
    mine = own.parse_args(argv[:split])
    label = argparse.ArgumentParser(prog="fcclip label")
    add_arguments(label)
    args = label.parse_args(argv[split + 1 :])
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    faults = [tuple(f.split(":", 1)) for f in mine.fault]
    make_model_stage = None
    if mine.hanging_model:
        make_model_stage = functools.partial(HangingModel, mine.model_seconds)
    elif mine.slow_model is not None:
        make_model_stage = functools.partial(SlowModel, mine.slow_model)
    reader = (FaultyReader(faults, mine.log_reads, mine.read_seconds)
              if faults or mine.log_reads or mine.read_seconds else None)
    return main_args(args, reader=reader, make_model_stage=make_model_stage)


if __name__ == "__main__":
    sys.exit(main())
