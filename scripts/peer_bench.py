#!/usr/bin/env python3
"""finelens against its peer (PyTorch + Captum, ../shared/peer-bench/), interleaved in one sitting.

    ~/.cache/peer-venv/bin/python scripts/peer_bench.py [--rounds 3] [--only explain,train,text-explain] \
        [--finelens target/release/finelens] [--peer ../shared/peer-bench] [--out peer-bench.json]

The machine is shared and its speed moves by up to 2x between days, so only ratios measured in
one sitting mean anything. Each round runs, for the same model (torchvision resnet18, 10 classes),
sizes (64 and 224) and methods, finelens's benchmark and the peer's back to back, the order
alternating between rounds; the table is the median over rounds of each side's figure and their
ratio (finelens / peer: below 1 means finelens is faster; for training, peer img/s / finelens
img/s, so the same reading holds).

`text-explain` compares `finelens bench text-explain` with scripts/peer_text_explain_bench.py
(Captum's LayerIntegratedGradients and layer gradients on an all-MiniLM-L6-v2-shaped classifier,
64 tokens; needs transformers too).

Needs the peer's environment (../shared/peer-bench/README.md: torch, torchvision, captum,
safetensors) and a release build of finelens (`cargo build --release -p finelens-cli`). CI does
not run it.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

# finelens's explain figure for each of the peer's columns.
EXPLAIN = [
    ("forward", "forward_ms", "forward_b1"),
    ("forward + backward to input", "forward_backward_ms", "fwd_bwd_input_b1_frozen"),
    ("saliency", "saliency_ms", "saliency"),
    ("SmoothGrad-20", "smoothgrad_20_ms", "smoothgrad20"),
    ("IG-50, internal batch 10", ("ig", 10), "ig50_ibs10"),
    ("IG-50, internal batch 50", ("ig", 50), "ig50_ibs50"),
    ("Grad-CAM (layer4)", "grad_cam_ms", "gradcam_layer4"),
]
SIZES = [64, 224]
OPTIMIZERS = ["sgd", "adamw"]


def run(cmd):
    print("  $ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout


def finelens_explain(exe, tmp):
    path = os.path.join(tmp, "explain.json")
    run([exe, "bench", "explain", "--repeats", "3", "--ig-batches", "10,50", "--json", path])
    rows = {}
    for t in json.load(open(path)):
        if t["arch"] != "resnet18":
            continue
        by_batch = dict((b, ms) for b, ms in t["integrated_gradients_50_by_batch"])
        rows[t["size"]] = {
            name: (by_batch[key[1]] if isinstance(key, tuple) else t[key]) for name, key, _ in EXPLAIN
        }
    return rows


def peer_explain(python, peer, tmp):
    path = os.path.join(tmp, "captum.json")
    run([python, os.path.join(peer, "captum_bench.py"), "--sizes", ",".join(map(str, SIZES)),
         "--reps", "3", "--out", path])
    doc = json.load(open(path))
    rows = {int(s): {name: r[col]["median_ms"] for name, _, col in EXPLAIN} for s, r in doc["rows"].items()}
    return rows, {k: doc[k] for k in ("torch", "torchvision", "captum", "cpu")}


def finelens_train(exe, tmp, optimizer):
    path = os.path.join(tmp, "train.json")
    run([exe, "bench", "train", "--steps", "3", "--optimizer", optimizer, "--json", path])
    return {t["size"]: t["images_per_second"] for t in json.load(open(path)) if t["arch"] == "resnet18"}


def peer_train(python, peer, optimizer):
    out = run([python, os.path.join(peer, "torch_train_bench.py"), "--sizes", ",".join(map(str, SIZES)),
               "--steps", "3", "--optimizer", optimizer])
    found = re.findall(r"resnet18 (\d+)x\d+ batch \d+ \w+: [\d.]+ ms/step, ([\d.]+) img/s", out)
    return {int(s): float(v) for s, v in found}


TEXT_EXPLAIN = ["forward_ms", "saliency_ms", "gradient_x_input_ms"]


def text_rows(doc):
    row = {k: doc[k] for k in TEXT_EXPLAIN}
    for b, ms in doc["integrated_gradients_50_by_batch"]:
        row[f"IG-50, internal batch {b}"] = ms
    return row


def finelens_text_explain(exe, tmp):
    path = os.path.join(tmp, "text-explain.json")
    run([exe, "bench", "text-explain", "--repeats", "3", "--ig-batches", "10,50", "--json", path])
    return text_rows(json.load(open(path)))


def peer_text_explain(python, tmp):
    path = os.path.join(tmp, "captum-text.json")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_text_explain_bench.py")
    run([python, script, "--reps", "3", "--ig-batches", "10,50", "--out", path])
    doc = json.load(open(path))
    return text_rows(doc), {k: doc[k] for k in ("torch", "captum", "transformers")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="explain,train")
    ap.add_argument("--finelens", default="target/release/finelens")
    ap.add_argument("--peer", default=os.path.join("..", "shared", "peer-bench"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    only = a.only.split(",")
    ours = {}    # (kind, size, line) -> [figures]
    theirs = {}
    versions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            print(f"round {r + 1} of {a.rounds}", file=sys.stderr, flush=True)
            jobs = []
            if "explain" in only:
                def ex_ours():
                    for s, row in finelens_explain(a.finelens, tmp).items():
                        for k, v in row.items():
                            ours.setdefault(("explain", s, k), []).append(v)

                def ex_theirs():
                    rows, v = peer_explain(sys.executable, a.peer, tmp)
                    versions.update(v)
                    for s, row in rows.items():
                        for k, v in row.items():
                            theirs.setdefault(("explain", s, k), []).append(v)
                jobs.append((ex_ours, ex_theirs))
            if "text-explain" in only:
                def tx_ours():
                    for k, v in finelens_text_explain(a.finelens, tmp).items():
                        ours.setdefault(("text-explain", 64, k), []).append(v)

                def tx_theirs():
                    row, v = peer_text_explain(sys.executable, tmp)
                    versions.update(v)
                    for k, v in row.items():
                        theirs.setdefault(("text-explain", 64, k), []).append(v)
                jobs.append((tx_ours, tx_theirs))
            if "train" in only:
                for opt in OPTIMIZERS:
                    def tr_ours(opt=opt):
                        for s, v in finelens_train(a.finelens, tmp, opt).items():
                            ours.setdefault(("train", s, opt), []).append(v)

                    def tr_theirs(opt=opt):
                        for s, v in peer_train(sys.executable, a.peer, opt).items():
                            theirs.setdefault(("train", s, opt), []).append(v)
                    jobs.append((tr_ours, tr_theirs))
            for first, second in jobs:
                if r % 2:
                    first, second = second, first
                first()
                second()
    rows = []
    for key in sorted(set(ours) & set(theirs), key=lambda k: (k[0], k[1])):
        kind, size, line = key
        f, p = statistics.median(ours[key]), statistics.median(theirs[key])
        # Below 1, finelens is faster: time over time, or the peer's throughput over ours.
        ratio = p / f if kind == "train" else f / p
        rows.append({"kind": kind, "size": size, "line": line, "finelens": f, "peer": p, "ratio": ratio})
    print(f"\nresnet18 (text-explain: all-MiniLM-L6-v2's shape, 64 tokens), {a.rounds} interleaved rounds, medians; {platform.node()}, {versions.get('cpu', '?')}, "
          f"torch {versions.get('torch', '?')}, captum {versions.get('captum', '?')}")
    print("\n| what | size | finelens | PyTorch + Captum | ratio |\n|---|---|---|---|---|")
    for r in rows:
        unit = "img/s" if r["kind"] == "train" else "ms"
        what = f"train ({r['line']}), batch 32" if r["kind"] == "train" else r["line"]
        if r["kind"] == "text-explain":
            what = f"text: {what.removesuffix('_ms').replace('_', ' ')}"
        print(f"| {what} | {r['size']} | {r['finelens']:.1f} {unit} | {r['peer']:.1f} {unit} | {r['ratio']:.2f} |")
    if a.out:
        json.dump({"rounds": a.rounds, "versions": versions, "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
