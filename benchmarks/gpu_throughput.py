"""Throughput and peak memory on one GPU: the forward, the panoptic predictor, and `fcclip label` beside them.

    python benchmarks/gpu_throughput.py                               # on a GPU: ConvNeXt-L, short edge 1024 and 800
    python benchmarks/gpu_throughput.py --device cpu                  # a dry run of the script on a CPU

For each short edge (images 4:3, e.g. 1024 x 1365), precision (fp32: strict float32; tf32: float32 with TF32
matrix products, CUDA only, what the label actor and training use; bf16: bf16 autocast with the pixel decoder, the
deformable attention and the class logits in float32, those with TF32 on CUDA, as `fcclip label --bf16` and
training run them), compiled or not (``torch.compile(dynamic=True)``: one graph
for every input size) and batch size (1, 4, 8):

    forward    ``model.inference(batch, text)`` on a ready (B, 3, H, W) batch under autocast: images/s and the peak
               memory of the call (CUDA: ``max_memory_allocated`` after a reset, beside the memory held before it).
    predictor  ``Predictor.infer`` + ``Predictor.postprocess`` with ``tasks=("panoptic",)`` (what labeling pays) on
               decoded uint8 arrays: resize, normalise, pad, model, panoptic post-processing at the image's size.

Then, at the first short edge and per dtype (bf16, and float32 as the label actor runs it: TF32 on a GPU), `fcclip
label` on the same kind of images written as JPEG files, run through its command line (this checkout's, as
pyproject.toml's ``fcclip`` script names it) in a subprocess with its own local Ray (one model actor on the GPU, the
largest batch size; uncompiled: the label command has no compile option), once on N and once on 2N images: images/s
end to end, and the steady rate N / (wall(2N) - wall(N)), which leaves out what every run pays once (Ray start-up,
model loading, text encoding), as a share of the uncompiled bare predictor's images/s at that batch size.

The model has random weights (nothing is downloaded); with trained weights more queries pass the panoptic threshold,
so post-processing costs somewhat more. Every configuration runs ``--warmup`` untimed then ``--iters`` timed calls;
figures are medians. A configuration the device cannot run (bf16 on a CPU without native bf16, see
fcclip.precision) is reported as skipped. ``--budget-s`` (default 270 s on a GPU) bounds the whole run: once it is
spent, the configurations not yet started are reported as not run, so the script finishes in under five minutes on
one GPU. With ``--json`` the figures are written after every configuration (``"partial": true`` until the end), so a
run cut short keeps what it measured.

Order: the uncompiled configurations, then the label runs, then the compiled ones (each compiled configuration's
warm-up pays its compilation, so they come last and take what the budget leaves).

Exit status 1 when any configuration or label run failed (an error, out of memory, a label run with failed images);
configurations left out by the budget or skipped for the device do not count. The CPU dry run checks the script so.

On a CPU the defaults make a dry run that checks the script works, not a measurement: ``fcclip-tiny`` at short edge
256, one warm-up and one timed call, no compiled configurations (compiling takes minutes there), N = 16 images for
the label runs, no time budget (every row runs). ``--model``, ``--size``, ``--iters``, ``--compile``,
``--label-images`` and ``--budget-s`` override them.

Compiled rows count the graphs dynamo compiled during the configuration (``graphs``): with ``dynamic=True`` the
second size and batch should compile nothing new.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import MemoryProbe, clock, device_name, load_average  # noqa: E402  (the sibling benchmark)

from fcclip.build import build_model, resolve_device  # noqa: E402
from fcclip.datasets.synthetic import synthetic_image  # noqa: E402
from fcclip.precision import cpu_flags, resolve_autocast_dtype  # noqa: E402
from fcclip.predictor import Predictor, pad_batch, resize_image  # noqa: E402
from fcclip.text import TextClassifierCache  # noqa: E402

DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16}  # the autocast dtype of each precision
MIB = 1024 * 1024
CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")


class Budget:
    """Seconds left of the run's time budget (0: none)."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds if seconds else float("inf")

    def left(self) -> float:
        return self.end - time.perf_counter()


def image_size(short_edge: int, aspect: float) -> tuple[int, int]:
    return short_edge, int(round(short_edge * aspect))


def time_calls(fn, device: torch.device, warmup: int, iters: int) -> tuple[list[float], dict]:
    """Seconds of each timed call and the memory of the call that grew most."""
    for _ in range(warmup):
        fn()
    seconds, worst = [], None
    for _ in range(iters):
        probe = MemoryProbe(device)
        probe.start()
        start = clock(device)
        fn()
        seconds.append(clock(device) - start)
        mem = probe.stop()
        if worst is None or mem["growth_mib"] > worst["growth_mib"]:
            worst = mem
    return seconds, worst or {}


def bench_model(args, device, model, vocabulary, cache, short_edge, dtype_name, compiled, batch, budget) -> list[dict]:
    """The forward and the panoptic predictor for one configuration."""
    height, width = image_size(short_edge, args.aspect)
    predictor = Predictor(
        model, vocabulary, short_edge=short_edge, max_size=max(height, width), tasks=("panoptic",),
        autocast_dtype=DTYPES[dtype_name], text_cache=cache,
    )
    decoded = [synthetic_image(seed, height, width) for seed in range(batch)]
    tensors = []
    for img in decoded:
        resized = resize_image(img, predictor.short_edge, predictor.max_size)
        t = torch.from_numpy(resized.copy()).to(device).permute(2, 0, 1).float()
        tensors.append(model.normalize(t))
    images = pad_batch(tensors, model.config.inference.size_divisibility)
    text = predictor.text
    dtype = predictor.autocast_dtype  # None where the device has no native support (skipped before we get here)

    def forward():
        with torch.inference_mode(), (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
            model.inference(images, text)

    def predict():
        out, sizes, padded = predictor.infer(decoded)
        for i, img in enumerate(decoded):
            predictor.postprocess(out.class_logits[i], out.mask_logits[i], sizes[i], padded, img.shape[:2])

    # bf16 as the label actor and training run it: they turn TF32 on (fcclip.precision.use_tf32) for the parts that
    # autocast leaves in float32; only fp32 is strict
    set_tf32(device, dtype_name != "fp32")

    rows = []
    for what, fn in (("forward", forward), ("predictor (panoptic)", predict)):
        row = {"what": what, "short_edge": short_edge, "input": f"{height}x{width}", "padded": list(images.shape[-2:]),
               "dtype": dtype_name, "compiled": compiled, "batch": batch}
        if budget.left() <= 0:
            rows.append(dict(row, status="not run (time budget spent)"))
            continue
        graphs = compiled_graphs()
        try:
            seconds, mem = time_calls(fn, device, args.warmup, args.iters)
        except torch.OutOfMemoryError as e:
            rows.append(dict(row, status=f"out of memory: {str(e).splitlines()[0]}"))
            torch.cuda.empty_cache()
            continue
        except Exception as e:  # a failed configuration is a row (the exit status says so), the others still run
            rows.append(dict(row, status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            continue
        rows.append(dict(row, status="ok", seconds=seconds, images_per_s=batch / statistics.median(seconds),
                         memory=mem, **({"graphs": compiled_graphs() - graphs} if compiled else {})))
    return rows


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def set_tf32(device: torch.device, on: bool) -> None:
    """TF32 matrix products and convolutions on or off (CUDA; a CPU has none)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def fcclip_command() -> list[str]:
    """This checkout's ``fcclip`` command: the console script's target as pyproject.toml names it, run by this Python
    from the checkout (an installed ``fcclip`` script may belong to another checkout or version)."""
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["fcclip"]
    module, func = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def run_label(args, short_edge: int, dtype_name: str, batch: int, folder: Path, out: Path) -> dict:
    """One `fcclip label` run through its command line, in a subprocess with its own local Ray."""
    height, width = image_size(short_edge, args.aspect)
    summary_path = out.with_suffix(".summary.json")
    cmd = [
        *fcclip_command(), "label", str(folder), "--out", str(out), "--vocab", args.vocab,
        "--model", args.model, "--weights", "random", "--batch-size", str(batch),
        "--short-edge", str(short_edge), "--max-size", str(max(height, width)),
        "--shard-size", str(batch), "--no-progress", "--summary-json", str(summary_path),
    ]
    if args.num_cpus:
        cmd += ["--num-cpus", str(args.num_cpus)]
    if dtype_name == "bf16":
        cmd.append("--bf16")
    start = time.perf_counter()
    # the checkout first on the path of the command and of its Ray workers
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, RAY_DEDUP_LOGS="1", PYTHONPATH=path))
    wall = time.perf_counter() - start
    command = " ".join(["fcclip", *cmd[len(fcclip_command()):]])
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}", "command": command}
    summary = json.loads(summary_path.read_text())
    if summary["failed"]:
        return {"status": f"failed: {summary['failed']} of {summary['ok'] + summary['failed']} images: "
                          f"{json.dumps(summary.get('errors', ''))[:500]}", "command": command}
    return {"status": "ok", "wall_s": wall, "images": summary["ok"] + summary["failed"], "failed": summary["failed"],
            "command": command}


def bench_label(args, short_edge: int, dtype_name: str, batch: int, work: Path) -> dict:
    """`fcclip label` on N and on 2N images: end-to-end images/s, and the pipeline's steady rate N / (wall(2N) -
    wall(N)), which leaves out what both runs pay once (Ray start-up, model loading, text encoding)."""
    n = args.label_images
    row = {"short_edge": short_edge, "dtype": dtype_name, "batch": batch, "images": [n, 2 * n]}
    runs = []
    for count in (n, 2 * n):
        folder = work / f"images-{short_edge}-{count}"
        if not folder.exists():
            write_images(folder, count, short_edge, args.aspect)
        run = run_label(args, short_edge, dtype_name, batch, folder, work / f"labels-{short_edge}-{dtype_name}-{count}")
        if run["status"] != "ok":
            return dict(row, **run)
        runs.append(run)
    extra = runs[1]["wall_s"] - runs[0]["wall_s"]
    return dict(row, status="ok", wall_s=[r["wall_s"] for r in runs], failed=sum(r["failed"] for r in runs),
                end_to_end_images_per_s=runs[1]["images"] / runs[1]["wall_s"],
                steady_images_per_s=(runs[1]["images"] - runs[0]["images"]) / extra if extra > 0 else None,
                command=runs[1]["command"])


def write_images(folder: Path, n: int, short_edge: int, aspect: float) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    height, width = image_size(short_edge, aspect)
    for i in range(n):
        Image.fromarray(synthetic_image(100 + i, height, width)).save(folder / f"img_{i:05d}.jpg", quality=90)


def fmt_mem(mem: dict) -> str:
    if not mem:
        return ""
    return f"{mem['peak_mib']:.0f} MiB (held before {mem['before_mib']:.0f})"


def report(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# GPU throughput: {meta['model']}",
        "",
        f"- date: {meta['date']}; torch {meta['torch']}; device: {meta['device_name']}",
        f"- CPU flags that matter: {', '.join(meta['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS_SHOWN)}",
        f"- vocabulary: {meta['vocab']}; images {meta['aspect']:.3g}:1 (width:height); warm-up {meta['warmup']}, "
        f"timed {meta['iters']} calls (medians); random weights",
        (f"- load average before: {meta['load_before']}, after: {meta['load_after']}; wall {meta['wall_s']:.0f} s"
         if "wall_s" in meta else f"- load average before: {meta['load_before']}; CUT SHORT: the run was stopped "
         "before its end, these are the configurations it finished"),
        "",
        "| what | short edge | input (padded) | dtype | compiled (new graphs) | batch | images/s | ms / batch "
        "| peak memory |",
        "|---|---:|---|---|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        padded = "x".join(str(v) for v in r["padded"])
        if r["status"] != "ok":
            lines.append(f"| {r['what']} | {r['short_edge']} | {r['input']} ({padded}) | {r['dtype']} | "
                         f"{'yes' if r['compiled'] else 'no'} | {r['batch']} | {r['status']} | | |")
            continue
        lines.append(
            f"| {r['what']} | {r['short_edge']} | {r['input']} ({padded}) | {r['dtype']} | "
            f"{'yes (%d)' % r['graphs'] if r['compiled'] else 'no'} | {r['batch']} | {r['images_per_s']:.2f} | "
            f"{1000 * statistics.median(r['seconds']):.0f} | {fmt_mem(r['memory'])} |"
        )
    if result["label"]:
        lines += ["", "`fcclip label` (local Ray, one model actor, uncompiled) on N and 2N images; steady = N / (wall(2N) -"
                  " wall(N)), beside the bare panoptic predictor (uncompiled, same batch):", "",
                  "| short edge | dtype | batch | images | wall s | images/s end to end (2N) | steady images/s | "
                  "share of the bare predictor |", "|---:|---|---:|---|---|---:|---:|---:|"]
        for r in result["label"]:
            images = "/".join(str(i) for i in r["images"])
            if r["status"] != "ok":
                lines.append(f"| {r['short_edge']} | {r['dtype']} | {r['batch']} | {images} | {r['status']} | | | |")
                continue
            steady, share = r["steady_images_per_s"], r.get("share_of_bare")
            lines.append(
                f"| {r['short_edge']} | {r['dtype']} | {r['batch']} | {images} | "
                f"{' / '.join(f'{w:.1f}' for w in r['wall_s'])} | {r['end_to_end_images_per_s']:.2f} | "
                f"{'' if steady is None else f'{steady:.2f}'} | {'' if share is None else f'{share:.0%}'} |"
            )
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu; auto = CUDA when available")
    p.add_argument("--model", default=None, help="preset (default: fcclip-convnext-large on a GPU, fcclip-tiny on a CPU)")
    p.add_argument("--size", default=None,
                   help="short edges, comma-separated (default: 1024,800 on a GPU, 256 on a CPU)")
    p.add_argument("--aspect", type=float, default=4 / 3, help="width / height of the images (default 4:3)")
    p.add_argument("--dtypes", default="fp32,tf32,bf16", help="precisions (default: %(default)s; tf32 on CUDA only)")
    p.add_argument("--order", choices=("bf16-first", "given"), default="bf16-first",
                   help="the order the precisions run in: bf16 first (a run cut short has the recommended setting), "
                        "or as --dtypes gives them (to compare two in both orders, one run each)")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--compile", default=None,
                   help="off, on or both (default: both on a GPU; off on a CPU, where compiling takes minutes)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default: 5 on a GPU, 1 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default: 2 on a GPU, 1 on a CPU)")
    p.add_argument("--vocab", default="coco_panoptic")
    p.add_argument("--label-images", type=int, default=None,
                   help="N: `fcclip label` runs on N and 2N images per dtype (default: 64 on a GPU, 16 on a CPU; 0 = skip)")
    p.add_argument("--label-batch", type=int, default=None, help="batch size of the label runs (default: largest)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the label run's local Ray (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in this process")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting configurations after this many s (default: 270 on a GPU, none on a CPU; "
                        "0: none)")
    p.add_argument("--label-dtypes", default=None,
                   help="precisions of the label runs (default: bf16 and the float32 the label actor runs: tf32 on a "
                        "GPU, fp32 on a CPU)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the tables of a JSON this script wrote (one cut short too) and exit")
    args = p.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    started = time.perf_counter()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.model = args.model or ("fcclip-convnext-large" if gpu else "fcclip-tiny")
    args.iters = args.iters if args.iters is not None else (5 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    args.label_images = args.label_images if args.label_images is not None else (64 if gpu else 16)
    args.size = args.size or ("1024,800" if gpu else "256")
    args.budget_s = args.budget_s if args.budget_s is not None else (270.0 if gpu else 0.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.size.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    args.compile = args.compile or ("both" if gpu else "off")
    if args.compile not in ("off", "on", "both"):
        raise SystemExit(f"--compile must be off, on or both, not {args.compile!r}")
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    budget = Budget(args.budget_s)
    flags = sorted(cpu_flags() & set(CPU_FLAGS_SHOWN))
    meta = {"model": args.model, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "device_name": device_name(device), "cpu_flags": flags, "vocab": args.vocab,
            "aspect": args.aspect, "warmup": args.warmup, "iters": args.iters, "load_before": load_average()}
    result = {"meta": meta, "rows": [], "label": [], "skipped": [], "args": {k: str(v) for k, v in vars(args).items()}}

    usable = []
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = DTYPES[name] is None or resolve_autocast_dtype(DTYPES[name], device) is not None
        if name == "tf32" and not gpu:
            result["skipped"].append("tf32: no TF32 on a CPU")
        elif ok:
            usable.append(name)
        else:
            result["skipped"].append(f"{name}: {device.type} without native {name} (it would run float32; see "
                                     "fcclip.precision)")

    cache = TextClassifierCache(enabled=False)

    def save(partial: bool) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**result, "partial": partial}, indent=1, default=str) + "\n")

    def model_rows(compiled: bool) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*random weights.*")
            model = build_model(args.model, weights="random", device=device)
        if compiled:
            model.compile_parts(dynamic=True)
        # bf16 first (the recommended setting: a budget cut short leaves it measured), every size per dtype (a
        # compiled model's second size shows whether it recompiles)
        order = usable if args.order == "given" else sorted(usable, key=lambda d: d != "bf16")
        for dtype_name in order:
            for short_edge in sizes:
                for batch in batches:
                    result["rows"] += bench_model(args, device, model, args.vocab, cache, short_edge, dtype_name,
                                                  compiled, batch, budget)
                    print(f"done: short edge {short_edge}, {dtype_name}, compiled {compiled}, batch {batch} "
                          f"({budget.left():.0f} s of the budget left)", file=sys.stderr)
                    save(partial=True)
        del model
        if gpu:
            torch.cuda.empty_cache()

    # uncompiled first, then the label runs (compared with it), then compiled with the budget that is left
    if False in compile_modes:
        model_rows(False)
    if args.label_images > 0:
        label_batch = args.label_batch or max(batches)
        with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as tmp:
            short_edge = sizes[0]  # the label runs are long (two Ray start-ups each): the first size only
            # the label actor runs float32 with TF32 on a GPU (fcclip.precision.use_tf32): compared with that
            label_dtypes = [d for d in usable if d != ("fp32" if "tf32" in usable else "tf32")]
            if args.label_dtypes:
                label_dtypes = [d for d in args.label_dtypes.split(",") if d in usable]
            for dtype_name in sorted(label_dtypes, key=lambda d: d != "bf16"):  # bf16 first: the target setting
                if budget.left() <= 0:
                    result["label"].append({"short_edge": short_edge, "dtype": dtype_name, "batch": label_batch,
                                            "images": [args.label_images, 2 * args.label_images],
                                            "status": "not run (time budget spent)"})
                    continue
                row = bench_label(args, short_edge, dtype_name, label_batch, Path(tmp))
                bare = next((r for r in result["rows"] if r["what"].startswith("predictor") and r["status"] == "ok"
                             and r["short_edge"] == short_edge and r["dtype"] == dtype_name
                             and r["batch"] == label_batch and not r["compiled"]), None)
                if row["status"] == "ok" and bare and row["steady_images_per_s"]:
                    row["share_of_bare"] = row["steady_images_per_s"] / bare["images_per_s"]
                result["label"].append(row)
                print(f"done: label, short edge {short_edge}, {dtype_name}", file=sys.stderr)
                save(partial=True)
    if True in compile_modes:
        model_rows(True)
    set_tf32(device, False)

    meta["load_after"] = load_average()
    meta["wall_s"] = time.perf_counter() - started
    text = report(result)
    print(text)
    save(partial=False)
    failed = [r for r in [*result["rows"], *result["label"]]
              if r["status"] != "ok" and not r["status"].startswith("not run")]
    for r in failed:
        print(f"FAILED: {r.get('what', 'fcclip label')}, short edge {r['short_edge']}, {r['dtype']}, "
              f"batch {r['batch']}: {r['status'][:300]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
