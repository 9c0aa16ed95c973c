#!/usr/bin/env bash
# The labeling engine's scale runs (issue 20) on a machine with the cores the simulated cluster pretends to have:
# benchmarks/label_scale.py at 16 simulated GPU actors, 8 ms and 100 ms per image, with enough images that the
# steady window (10% to 90% of the rows) holds many chunks per actor.
#
#   OUT=/path/to/results bash benchmarks/scale_check.sh          # from the checkout's root; OUT defaults to ./scale-check
#
# On the lent GPU machine (16 cores), after `bash benchmarks/gpu_wheels.sh` here, two calls made back to back:
#   1. carry .whl:  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
#                   --target /tmp/site .whl/*.whl
#   2. carry .lake: xz -dc .lake/lake.tar.xz | tar -x -C /tmp/site && PYTHONPATH=/tmp/site OUT=$OUT PYTHON=python3
#                   bash benchmarks/scale_check.sh
# About 4 minutes on 16 cores. IMAGES (default 20000) is N; each run also labels 3 N. Exit status: 0 when every run
# finished. The checkout is used from where it is (PYTHONPATH, and a link fcclip_pipelines -> pipelines): nothing is
# installed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/scale-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
IMAGES=${IMAGES:-20000}
exec > >(tee -a "$OUT/scale_check.log") 2>&1
links=$(mktemp -d)
ln -s "$PWD/pipelines" "$links/fcclip_pipelines"
export PYTHONPATH="$PWD:$links${PYTHONPATH:+:$PYTHONPATH}"
echo "$(nproc) cores; $(grep -m1 -o 'model name.*' /proc/cpuinfo)"
status=0
run() {  # name, limit in seconds, label_scale.py arguments
    local name=$1 limit=$2
    shift 2
    echo; echo "=== $name: label_scale.py $* ($(date -u +%H:%M:%S) UTC)"
    timeout "$limit" "$PY" benchmarks/label_scale.py "$@" --json "$OUT/$name.json" > "$OUT/$name.md"
    local rc=$?
    cat "$OUT/$name.md"
    [ $rc -eq 0 ] || { echo "$name: exit $rc (124: cut by the timeout)"; status=1; }
}
# 8 ms per image: ideal 2,000 rows/s, N and 3N take ~10 and ~30 s of model time
run scale_8ms 150 --actors 16 --images "$IMAGES" --scale 3
# 100 ms per image: ideal 160 rows/s; a tenth of the images
run scale_100ms 150 --actors 16 --per-image-ms 100 --images $((IMAGES / 10)) --scale 3
rm -rf "$links"
echo; echo "=== done: status $status ($(date -u +%H:%M:%S) UTC)"
exit $status
