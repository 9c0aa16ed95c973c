#!/usr/bin/env bash
# The Python packages benchmarks/gpu_check.sh needs that the lent GPU machine lacks (its image has torch, timm,
# pyarrow, pandas, numpy, ...; no Ray, open_clip or pycocotools), as cp312 wheels in .whl/ for the device tool's
# `carry`. Ray's own wheel (79 MB) is over the 64 MiB a call may carry: its Java jars, rllib, serve, llm and the
# dashboard's web client, none of which a job here uses, are taken out of it (about 42 MB left).
#
#   bash benchmarks/gpu_wheels.sh            # from the repository root; then, on the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site; LABEL_IMAGES=0 OUT=$OUT PYTHON=python3 bash benchmarks/gpu_check.sh
#
# (LABEL_IMAGES=0: DuckDB and deltalake, which `fcclip label` needs, would not fit beside Ray; see .lake below.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps "${platform[@]}" -d .whl \
    open_clip_torch==3.3.0 ftfy wcwidth pycocotools jsonschema jsonschema-specifications referencing rpds-py \
    tensorboardX pydantic pydantic-core annotated-types typing-inspection
# unpack WHEEL FOLDER: with the files' modes (python -m zipfile -e drops them: Ray's gcs_server and raylet would
# not run)
unpack() {
    mkdir -p "$2" && (cd "$2" && "$PY" -c "
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info)
        if info.external_attr >> 16:
            os.chmod(path, (info.external_attr >> 16) & 0o777)
" "$1")
}
work=$(mktemp -d)
"$PY" -m pip download -q --no-deps "${platform[@]}" -d "$work" ray==2.60.0
unpack "$(echo "$work"/ray-2.60.0-*.whl)" "$work/x"
(cd "$work/x" && rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client ray/tune/examples \
    && "$PY" - <<'EOF'
import csv, os
record = "ray-2.60.0.dist-info/RECORD"
rows = [r for r in csv.reader(open(record)) if r and (r[0] == record or os.path.exists(r[0]))]
with open(record, "w", newline="") as f:
    csv.writer(f).writerows(rows)
EOF
)
(cd "$work/x" && "$PY" -c "
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED, compresslevel=9) as z:
    for top in ('ray', 'ray-2.60.0.dist-info'):
        for folder, _, files in os.walk(top):
            for name in files:
                path = os.path.join(folder, name)
                info = zipfile.ZipInfo.from_file(path, path)
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(path, 'rb') as f:
                    z.writestr(info, f.read(), compresslevel=9)
" "$OLDPWD/.whl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl")
rm -rf "$work"
du -sh .whl

# DuckDB and deltalake, which `fcclip label` needs (and so benchmarks/scale_check.sh): 52 + 25 MB of wheels do not fit
# beside Ray in one call's carry. They go in .lake/lake.tar.xz (45 MB, the unpacked wheels), carried by a second call
# made at once after the first (a machine stays warm 30 s; what the first call put in /tmp is still there), which
# runs `xz -dc .lake/lake.tar.xz | tar -x -C /tmp/site`. LAKE=0 leaves it out.
if [ "${LAKE:-1}" = 1 ]; then
    grep -qx '/.lake/' .git/info/exclude 2>/dev/null || echo '/.lake/' >> .git/info/exclude
    rm -rf .lake && mkdir .lake
    work=$(mktemp -d)
    # the versions this checkout's environment has (constraints.txt)
    pins=$("$PY" -c "import importlib.metadata as m
print(' '.join(f'{n}=={m.version(n)}' for n in ('duckdb', 'deltalake', 'arro3-core', 'deprecated')))")
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps "${platform[@]}" -d "$work" $pins
    for wheel in "$work"/*.whl; do
        unpack "$wheel" "$work/site"
    done
    tar -C "$work/site" -cf - . | xz -9 -T0 > .lake/lake.tar.xz
    rm -rf "$work"
    du -sh .lake
fi
