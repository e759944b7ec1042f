#!/usr/bin/env python3
"""Captum's token attributions on all-MiniLM-L6-v2, for finelens's text attribution parity test.

    ~/.cache/peer-venv/bin/python scripts/text_attrib_reference.py .cache/models/all-minilm-l6-v2

writes fixtures/text/captum-attributions.json: for a few sentences, with the
`BertForSequenceClassification` head and the deterministic classifier weights of
scripts/text_parity.py, the predicted class, the logits and per token
- integrated gradients: Captum's LayerIntegratedGradients on bert.embeddings.word_embeddings,
  Gauss-Legendre 50 steps, the `pad` baseline ([CLS] [PAD] ... [SEP]), summed over the hidden
  units, with Captum's convergence delta;
- saliency: the L2 norm over hidden units of the logit's gradient with respect to the word
  embeddings;
- gradient x input: that gradient times the word embeddings, summed over hidden units.
Needs torch, transformers, tokenizers and captum; finelens's test needs only the JSON.
"""
import json
import sys
from pathlib import Path

import captum
import tokenizers
import torch
import transformers
from captum.attr import LayerIntegratedGradients

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_parity import CLASSES, classifier_weights  # noqa: E402

SENTENCES = [
    "A gripping, beautifully acted drama that stays with you.",
    "Dull, predictable and far too long.",
    "The soundtrack is the only thing worth remembering about this mess of a sequel.",
]


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/models/all-minilm-l6-v2")
    torch.set_num_threads(2)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    pad = tok.token_to_id("[PAD]")
    model = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=CLASSES)
    model.eval()
    w, b = classifier_weights(384)
    with torch.no_grad():
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(b)
    cases = []
    for text in SENTENCES:
        enc = tok.encode(text)
        ids = torch.tensor([enc.ids])
        types = torch.zeros_like(ids)
        mask = torch.ones_like(ids)
        base = torch.tensor([[i if w is None else pad for i, w in zip(enc.ids, enc.word_ids)]])

        def forward(input_ids):
            n = input_ids.shape[0]
            return model(
                input_ids=input_ids,
                token_type_ids=types.expand(n, -1),
                attention_mask=mask.expand(n, -1),
            ).logits

        logits = forward(ids)[0]
        target = int(logits.argmax())
        lig = LayerIntegratedGradients(forward, model.bert.embeddings.word_embeddings)
        attr, delta = lig.attribute(
            ids,
            baselines=base,
            target=target,
            n_steps=50,
            method="gausslegendre",
            return_convergence_delta=True,
        )
        emb = model.bert.embeddings.word_embeddings(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, token_type_ids=types, attention_mask=mask).logits
        (grad,) = torch.autograd.grad(out[0, target], emb)
        cases.append(
            {
                "text": text,
                "ids": enc.ids,
                "target": target,
                "logits": logits.tolist(),
                "integrated_gradients": attr.sum(-1)[0].tolist(),
                "integrated_gradients_delta": float(delta[0]),
                "saliency": grad.norm(dim=-1)[0].tolist(),
                "gradient_x_input": (grad * emb).sum(-1)[0].tolist(),
            }
        )
    out = Path(__file__).resolve().parent.parent / "fixtures" / "text" / "captum-attributions.json"
    out.write_text(
        json.dumps(
            {
                "captum_version": captum.__version__,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "classes": CLASSES,
                "cases": cases,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
