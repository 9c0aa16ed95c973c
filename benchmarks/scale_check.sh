#!/usr/bin/env bash
# The labeling engine's scale runs (issue 20) on a machine with the cores the simulated cluster pretends to have:
# benchmarks/label_scale.py at 16 simulated GPU actors, 8 ms per image (the issue's example) and 57 ms (ConvNeXt-L's
# panoptic predictor at 1024 px, batch 4, TF32 on the H200: 17.6 images/s), with enough images that the steady window
# (10% to 90% of the rows) holds many chunks per actor.
#
#   OUT=/path/to/results bash benchmarks/scale_check.sh          # from the checkout's root; OUT defaults to ./scale-check
#
# On the lent GPU machine (16 cores), after `bash benchmarks/gpu_wheels.sh` here, two calls made back to back:
#   1. carry .whl:  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
#                   --target /tmp/site .whl/*.whl
#   2. carry .lake: xz -dc .lake/lake.tar.xz | tar -x -C /tmp/site && PYTHONPATH=/tmp/site OUT=$OUT PYTHON=python3
#                   bash benchmarks/scale_check.sh
# About 4 minutes an engine on 16 cores (most of it the 5 raylets' start and stop). IMAGES (default 12000) is N;
# each run also labels 3 N. Exit status: 0 when every run
# finished. The checkout is used from where it is (PYTHONPATH, and a link fcclip_pipelines -> pipelines): nothing is
# installed. ENGINES="main=pipelines other=PATH" runs each configuration with each engine, one after the other (a
# copy of another branch's pipelines/ folder, e.g. carried in an excluded folder), so that they compare within one run.
# On the device, a call brings back at most 8 files: with two engines (9 files), write to a folder under /tmp and
# end the command with `tar -C /tmp/res -czf $OUT/res.tgz .`.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/scale-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
IMAGES=${IMAGES:-12000}
exec > >(tee -a "$OUT/scale_check.log") 2>&1
# stopped (e.g. by an outer timeout), stop the run in progress too: label_scale.py then ends its simulated cluster
trap 'pkill -TERM -P $$; exit 143' TERM INT
ENGINES=${ENGINES:-main=pipelines}
links=$(mktemp -d)
echo "$(nproc) cores; $(grep -m1 -o 'model name.*' /proc/cpuinfo)"
status=0
run() {  # name, limit in seconds, label_scale.py arguments; once per engine
    local name=$1 limit=$2 engine tag
    shift 2
    for engine in $ENGINES; do
        tag=${engine%%=*}
        mkdir -p "$links/$tag" && ln -sfn "$(realpath "${engine#*=}")" "$links/$tag/fcclip_pipelines"
        echo; echo "=== $name, engine $tag (${engine#*=}): label_scale.py $* ($(date -u +%H:%M:%S) UTC)"
        PYTHONPATH="$PWD:$links/$tag${PYTHONPATH:+:$PYTHONPATH}" timeout "$limit" "$PY" benchmarks/label_scale.py "$@" \
            --json "$OUT/${name}_$tag.json" > "$OUT/${name}_$tag.md" &
        wait $!  # in the background, so that a TERM reaches the trap at once
        local rc=$?
        cat "$OUT/${name}_$tag.md"
        [ $rc -eq 0 ] || { echo "$name ($tag): exit $rc (124: cut by the timeout)"; status=1; }
    done
}
# 8 ms per image: ideal 2,000 rows/s, N and 3N take ~6 and ~18 s of model time
run scale_8ms 150 --actors 16 --images "$IMAGES" --scale 3
# 57 ms per image: ideal 281 rows/s; a seventh of the images
run scale_57ms 150 --actors 16 --per-image-ms 57 --images $((IMAGES / 7)) --scale 3
rm -rf "$links"
echo; echo "=== done: status $status ($(date -u +%H:%M:%S) UTC)"
exit $status
