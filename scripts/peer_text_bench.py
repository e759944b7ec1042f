#!/usr/bin/env python3
"""The peer for `finelens bench text`: fine-tuning steps of an all-MiniLM-L6-v2-shaped
`BertForSequenceClassification` in PyTorch + transformers on the same CPU.

    ~/.cache/hf-venv/bin/python scripts/peer_text_bench.py [--tokens 64] [--batch 16] [--steps 5]

Random initialisation (speed does not depend on the weights), random token ids, train mode with
dropout, cross-entropy, backward, AdamW (weight decay 0.01 without biases and LayerNorm weights),
2 threads as finelens's machine; one warm-up step, then the mean of --steps. Prints sentences/s and
the peak resident memory. Needs torch and transformers.
"""
import argparse
import resource
import time

import torch
import transformers

MINILM = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
    intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    layer_norm_eps=1e-12, num_labels=2,
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**MINILM))
    model.train()
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or "LayerNorm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith(".bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=2e-5)
    ids = torch.randint(1000, 30522, (a.batch, a.tokens))
    labels = torch.arange(a.batch) % 2

    def step():
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    s = (time.perf_counter() - start) / a.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  pytorch+transformers {a.tokens:>3} tokens × {a.batch:<3} {s:7.2f} s/step  "
          f"{a.batch / s:7.1f} sentences/s  peak {peak:.0f} MiB  (torch {torch.__version__})")


if __name__ == "__main__":
    main()
