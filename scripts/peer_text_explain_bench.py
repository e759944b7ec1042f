#!/usr/bin/env python3
"""The peer for `finelens bench text-explain`: Captum's token attributions on an
all-MiniLM-L6-v2-shaped `BertForSequenceClassification` on the same CPU.

    ~/.cache/peer-venv/bin/python scripts/peer_text_explain_bench.py [--tokens 64] [--reps 3] \
        [--ig-batches 10,50] [--out captum-text.json]

Random initialisation (2 classes; speed does not depend on the weights), one sentence of word
tokens between [CLS] and [SEP] (the same ids as finelens's bench), eval mode, 2 threads as
finelens's machine, target class 1. The methods as finelens runs them on the word embeddings:
- saliency: the logit's gradient with respect to the word embeddings (LayerGradientXActivation's
  gradient half: a hook on `bert.embeddings.word_embeddings`), its L2 norm per token;
- gradient x input: Captum's LayerGradientXActivation on the word embeddings, summed;
- IG-50: Captum's LayerIntegratedGradients on the word embeddings, Gauss-Legendre 50 steps, the
  `pad` baseline ([CLS] [PAD]... [SEP]), per internal batch size.
One warm-up call, then the median of --reps. Prints ms per sentence and the peak resident memory;
--out writes them as JSON. Needs torch, transformers and captum.
"""
import argparse
import json
import resource
import statistics
import time

import captum
import torch
import transformers
from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

MINILM = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
    intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
    hidden_act="gelu", layer_norm_eps=1e-12, num_labels=2,
)


def median_ms(reps, f):
    f()
    t = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        t.append((time.perf_counter() - start) * 1e3)
    return statistics.median(t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ig-batches", default="10,50")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**MINILM))
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    # The same sentence as finelens's bench: [CLS], 1000 + (7919 i mod 29000), [SEP].
    ids = torch.tensor([[101] + [1000 + (i * 7919) % 29000 for i in range(1, a.tokens - 1)] + [102]])
    base = torch.tensor([[101] + [0] * (a.tokens - 2) + [102]])
    mask = torch.ones_like(ids)

    def forward(input_ids):
        return model(input_ids=input_ids, attention_mask=mask.expand_as(input_ids)).logits

    layer = model.bert.embeddings.word_embeddings
    gxa = LayerGradientXActivation(forward, layer)
    lig = LayerIntegratedGradients(forward, layer)
    rows = {}
    with torch.no_grad():
        rows["forward_ms"] = median_ms(a.reps, lambda: forward(ids))

    # Saliency: the layer gradient (LayerGradientXActivation without multiplying by inputs).
    grad_only = LayerGradientXActivation(forward, layer, multiply_by_inputs=False)
    rows["saliency_ms"] = median_ms(a.reps, lambda: grad_only.attribute(ids, target=1).norm(dim=-1))
    rows["gradient_x_input_ms"] = median_ms(a.reps, lambda: gxa.attribute(ids, target=1).sum(-1))
    by_batch = []
    for b in [int(x) for x in a.ig_batches.split(",")]:
        ms = median_ms(a.reps, lambda: lig.attribute(
            ids, baselines=base, target=1, n_steps=50, method="gausslegendre",
            internal_batch_size=b, return_convergence_delta=True))
        by_batch.append((b, ms))
    rows["integrated_gradients_50_by_batch"] = by_batch
    rows["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows.update(tokens=a.tokens, reps=a.reps, torch=torch.__version__, captum=captum.__version__,
                transformers=transformers.__version__)
    print(f"  captum {a.tokens} tokens: forward {rows['forward_ms']:.1f} ms, saliency {rows['saliency_ms']:.1f} ms, "
          f"gradient x input {rows['gradient_x_input_ms']:.1f} ms, "
          + ", ".join(f"IG-50 batch {b} {ms:.1f} ms" for b, ms in by_batch)
          + f", peak {rows['peak_rss_bytes'] >> 20} MiB")
    if a.out:
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
