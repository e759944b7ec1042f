#!/usr/bin/env python3
"""Expected outputs of the reference implementations, for finelens's text parity tests.

    ~/.cache/hf-venv/bin/python scripts/text_parity.py .cache/models/all-minilm-l6-v2

writes fixtures/text/tokenizer-parity.json (Hugging Face `tokenizers`: ids, type ids, character
offsets and word ids of awkward strings, whole and truncated) and fixtures/text/minilm-parity.json
(transformers: the logits of all-MiniLM-L6-v2 with a `BertForSequenceClassification` head and
with a mean-pooling head, both with the deterministic classifier weights below, on a padded batch
of real sentences). Needs torch, transformers and tokenizers; finelens's tests need only the JSON.
"""
import json
import math
import sys
from pathlib import Path

import tokenizers
import torch
import transformers

CLASSES = 3
MAX_LENGTH = 16

AWKWARD = [
    "The film was wonderful.",
    "Crème brûlée, naïve café — déjà vu!",
    "\u201cCurly quotes\u201d and \u2018single ones\u2019 don\u2019t break it",
    "東京で映画を見ました",
    "Great movie 👍🎬 would watch again 😀",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a very long word",
    "zero\u200bwidth\u200djoiners\ufeffhere",
    "",
    "   spaces   everywhere   ",
    "UPPER lower MiXeD 123 4.5 $6",
]

SENTENCES = [
    "A gripping, beautifully acted drama that stays with you.",
    "Dull, predictable and far too long.",
    "It's fine.",
    "The soundtrack is the only thing worth remembering about this mess of a sequel.",
    "I laughed, I cried, I bought the DVD.",
]


def classifier_weights(inp):
    """W[i][j] = 0.05·sin(0.37·i + 0.11·j + 0.5), b[i] = 0.01·(i + 1): finelens's test builds the same."""
    w = [[0.05 * math.sin(0.37 * i + 0.11 * j + 0.5) for j in range(inp)] for i in range(CLASSES)]
    b = [0.01 * (i + 1) for i in range(CLASSES)]
    return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


def tokenizer_cases(folder):
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    cases = []
    for text in AWKWARD:
        whole = tok.encode(text)
        tok.enable_truncation(MAX_LENGTH)
        cut = tok.encode(text)
        tok.no_truncation()
        cases.append(
            {
                "text": text,
                "ids": whole.ids,
                "type_ids": whole.type_ids,
                "offsets": [list(o) for o in whole.offsets],
                "word_ids": whole.word_ids,
                "truncated_ids": cut.ids,
            }
        )
    return {"tokenizers_version": tokenizers.__version__, "max_length": MAX_LENGTH, "cases": cases}


def model_cases(folder):
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    w, b = classifier_weights(384)
    cls = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=CLASSES)
    cls.eval()
    with torch.no_grad():
        cls.classifier.weight.copy_(w)
        cls.classifier.bias.copy_(b)
        cls_logits = cls(**batch).logits
        hidden = cls.bert(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1)
        mean_logits = mean @ w.T + b
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "classes": CLASSES,
        "sentences": SENTENCES,
        "input_ids": batch["input_ids"].tolist(),
        "token_type_ids": batch["token_type_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "cls_logits": cls_logits.tolist(),
        "mean_logits": mean_logits.tolist(),
    }


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/models/all-minilm-l6-v2")
    out = Path(__file__).resolve().parent.parent / "fixtures" / "text"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer-parity.json").write_text(
        json.dumps(tokenizer_cases(folder), ensure_ascii=False, indent=1) + "\n"
    )
    (out / "minilm-parity.json").write_text(json.dumps(model_cases(folder), indent=1) + "\n")
    print(f"wrote {out}/tokenizer-parity.json and {out}/minilm-parity.json")


if __name__ == "__main__":
    main()
