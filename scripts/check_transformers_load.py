#!/usr/bin/env python3
"""Check that a text model folder finelens fine-tuned loads in transformers unchanged.

    ~/.cache/hf-venv/bin/python scripts/check_transformers_load.py OUT_DIR VAL.jsonl

Loads OUT_DIR with `AutoTokenizer` and `BertForSequenceClassification.from_pretrained` (no
conversion, no warning about missing or unexpected weights), classifies VAL.jsonl (the
validation set finelens used: `text`, `label` per line) and checks that the accuracy and the mean
cross-entropy equal the best epoch's validation figures in OUT_DIR/metrics.json (the loss to
1e-4 relative: the logits are transformers'). Needs torch and transformers.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open


def main():
    out, val = Path(sys.argv[1]), Path(sys.argv[2])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model, info = transformers.BertForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"weights did not load cleanly: {problems}"
    model.eval()
    label2id = model.config.label2id
    rows = [json.loads(line) for line in val.read_text().splitlines() if line.strip()]
    metrics = json.loads((out / "metrics.json").read_text())
    with safe_open(out / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
        record = json.loads(meta.get("finelens-text") or meta["finelens"])
    max_length = record["max_length"]
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            chunk = rows[i : i + 32]
            batch = tok(
                [r["text"] for r in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            logits = model(**batch).logits
            labels = torch.tensor([label2id[r["label"]] for r in chunk])
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
    accuracy, loss = correct / len(rows), loss_sum / len(rows)
    val = metrics["val"]
    print(
        f"transformers: accuracy {accuracy:.4f}, loss {loss:.6f} on {len(rows)} texts; "
        f"finelens: accuracy {val['accuracy']:.4f}, loss {val['loss']:.6f}"
    )
    assert abs(accuracy - val["accuracy"]) < 1e-9, "the accuracies disagree"
    assert abs(loss - val["loss"]) <= 1e-4 * abs(val["loss"]), "the losses disagree"
    print("ok: the folder loads in transformers and classifies as finelens did")


if __name__ == "__main__":
    main()
