#!/usr/bin/env python3
"""Parameter gradients of a fixed GRPO loss, by PyTorch autograd, for thinkshort's backward test.

Run once by a developer after tools/make_fixtures.py (same venv); the output is committed:

    /work/pyenv/bin/python tools/make_grad_fixture.py --fixtures tests/fixtures

For each of tests/fixtures/{qwen2_tied, llama_untied_bf16, qwen3_qknorm} it writes
  grad_case.json       sequences, temperature, loss settings, old/ref log-probs, advantages, and
                       transformers' log-probs and loss
  grads.safetensors    d(loss)/d(param) for every parameter, float32, HF tensor names
                       (tied models: the embedding's gradient includes the LM head's)

The loss is METHOD.md §5 with seq-mean-token-mean aggregation:
  rho = exp(logp - old);  L_t = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)
                                + beta (exp(ref - logp) - (ref - logp) - 1)
  loss = mean over sequences of (mean over that sequence's completion tokens of L_t)
where logp = log_softmax(logits / tau)[token]. old and ref are logp (detached) plus fixed offsets,
so some ratios fall outside the clip range on both sides.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

TAU = 0.8
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.05
ADVANTAGES = [1.2, -0.7, 0.3, -1.1]
# (prompt length, completion length) of each sequence
SHAPES = [(5, 7), (12, 3), (1, 9), (8, 6)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures")
    args = ap.parse_args()
    torch.manual_seed(1234)
    torch.set_num_threads(1)
    # one random stream over the models in this order: a model added later goes last
    for name in ["qwen2_tied", "llama_untied_bf16", "qwen3_qknorm"]:
        folder = os.path.join(args.fixtures, name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        model.train(False)
        vocab = model.config.vocab_size
        seqs = [
            (torch.randint(3, vocab, (p,)).tolist(), torch.randint(3, vocab, (c,)).tolist())
            for p, c in SHAPES
        ]
        n_tokens = sum(c for _, c in SHAPES)
        old_offset = (torch.rand(n_tokens) - 0.5) * 0.8  # ratios exp(-offset) in ~[0.67, 1.49]
        ref_offset = (torch.rand(n_tokens) - 0.5) * 0.6

        model.zero_grad()
        logps, losses, at = [], [], 0
        for (prompt, completion), adv in zip(seqs, ADVANTAGES):
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0].float() / TAU  # [T, V]
            rows = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]
            logp = torch.log_softmax(rows, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            old = logp.detach() + old_offset[at : at + len(completion)]
            ref = logp.detach() + ref_offset[at : at + len(completion)]
            at += len(completion)
            rho = torch.exp(logp - old)
            surrogate = torch.minimum(rho * adv, torch.clamp(rho, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            losses.append((-surrogate + BETA * kl).mean())
            logps.append((logp.detach(), old, ref))
        loss = torch.stack(losses).mean()
        loss.backward()

        grads = {n: p.grad.detach().float().contiguous() for n, p in model.named_parameters()}
        if model.config.tie_word_embeddings:
            grads.pop("lm_head.weight", None)  # same tensor as the embedding
        save_file(grads, os.path.join(folder, "grads.safetensors"))
        case = {
            "temperature": TAU,
            "eps_low": EPS_LOW,
            "eps_high": EPS_HIGH,
            "beta": BETA,
            "aggregation": "seq-mean-token-mean",
            "sequences": [{"prompt_ids": p, "completion_ids": c} for p, c in seqs],
            "advantages": ADVANTAGES,
            "logp": [x for lp, _, _ in logps for x in lp.tolist()],
            "old_logp": [x for _, o, _ in logps for x in o.tolist()],
            "ref_logp": [x for _, _, r in logps for x in r.tolist()],
            "loss": loss.item(),
        }
        with open(os.path.join(folder, "grad_case.json"), "w") as f:
            json.dump(case, f, indent=1)
        print(f"{name}: loss {loss.item():.6f}, {len(grads)} gradient tensors")


if __name__ == "__main__":
    main()
