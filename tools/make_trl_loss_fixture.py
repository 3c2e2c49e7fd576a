#!/usr/bin/env python3
"""The GRPO policy loss and its gradient by Hugging Face TRL's own code, for tests/trl_parity.rs.

Builds one small batch (2 groups x 4 completions, ragged lengths 1..12, right-padded to [N, T] with
a completion mask; per-token log-probs of the policy, old policy and reference; advantages given
directly), then runs TRL's `GRPOTrainer._compute_loss` on it for several loss types and settings.
The trainer is a bare object (no model, no data): `object.__new__(GRPOTrainer)` with the attributes
`_compute_loss` reads, set from a real `GRPOConfig` the way `GRPOTrainer.__init__` sets them, and
`_get_per_token_logps_and_entropies` replaced by one that returns a float64 leaf tensor logp [N, T].
The loss formulas and the aggregation are TRL's; autograd gives d loss / d logp.
Writes tests/fixtures/trl_grpo_loss.json (committed): inputs, options, versions, loss, gradient, and
the clip fractions and KL that TRL logs.

Environment (developer-only, outside the repo; Python 3.11.7, Linux x86_64, CPU only):
    python3 -m venv /tmp/trlenv
    /tmp/trlenv/bin/pip install torch==2.15.0 trl==1.16.0
which resolved to transformers 5.24.0, accelerate 1.15.0, datasets 5.2.0, numpy 2.4.6 (torch from
PyPI is the CUDA build and pulls the nvidia-* wheels; everything here runs on the CPU). These pins do
not fit tools/requirements-fixtures.txt: trl pulls huggingface_hub 2.x and tokenizers 0.23.3, while
that file pins 1.33.0 and 0.23.2 (the Rust crate's version).
Run from the repository root:
    /tmp/trlenv/bin/python tools/make_trl_loss_fixture.py
then: cargo test --release --test trl_parity

Settings every case shares, each chosen so TRL computes METHOD.md §5 and nothing else:
  use_bias_correction_kl=False  TRL 1.16 defaults to True, which multiplies the k3 KL by the ratio ρ;
                                thinkshort (and METHOD.md §5) use the plain k3 term.
  importance_sampling_level="token", delta=None, no vLLM, no entropy bonus or mask, one process,
  gradient_accumulation_steps = steps_per_generation = 1 (the batch is one whole micro-batch, so
  TRL's accumulation normalizers are 1 and dapo's num_items_in_batch is this batch's token count).
"""

import json
import math
import os
import platform
import sys
import warnings
from collections import defaultdict

import torch
import trl
from accelerate import Accelerator
from trl import GRPOConfig, GRPOTrainer

MAX_COMPLETION_LENGTH = 12  # the generation cap; dr_grpo divides by it
LENS = [12, 3, 7, 1, 5, 12, 2, 9]  # 2 groups x 4 completions; the two of length 12 hit the cap
TRUNCATED = [n == MAX_COMPLETION_LENGTH for n in LENS]
ADVANTAGES = [1.2, -0.8, 0.5, -0.9, -1.3, 0.7, 1.5, -0.9]
# log(πθ / πold), cycled over the tokens: beyond ln 0.8 ≈ -0.223 and ln 1.2 ≈ 0.182 (or ln 1.28 ≈
# 0.247) on both sides, never within 0.025 of a bound (where the gradient has a kink); 0.21 is clipped
# by ε_high = 0.2 but not by 0.28, and -0.27 by ε_low = 0.2 but not by 0.28, so swapped or ignored
# ε_low / ε_high show.
LOG_RATIOS = [-0.5, -0.1, 0.0, 0.05, 0.3, 0.6, -0.35, 0.12, -0.27, 0.21]
PAD_LOGP = -7.0  # finite values at padded positions: they must not reach the loss
SYM = dict(epsilon=0.2, epsilon_high=0.2)
ASYM = dict(epsilon=0.2, epsilon_high=0.28)

# thinkshort's Aggregation for each TRL loss type:
#   grpo    -> SeqMeanTokenMean
#   dr_grpo -> SeqMeanTokenSumNorm { max_len: MAX_COMPLETION_LENGTH }
#   bnpo    -> TokenMean (divides by mask.sum() of the local batch)
#   dapo    -> TokenMean (divides by num_items_in_batch / num_processes; one process, one micro-batch)
CASES = [
    dict(loss_type=t, beta=beta, mask_truncated_completions=mask, **eps)
    for t in ["grpo", "dr_grpo", "bnpo", "dapo"]
    for beta, mask, eps in [(0.0, False, SYM), (0.04, False, ASYM), (0.04, True, ASYM)]
]


def make_batch():
    """Per-token values back to back (completion i owns the next LENS[i]), as thinkshort takes them."""
    gen = torch.Generator().manual_seed(20260)
    n = sum(LENS)
    logp = -0.1 - 3.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    log_ratio = torch.tensor([LOG_RATIOS[t % len(LOG_RATIOS)] for t in range(n)], dtype=torch.float64)
    ref = logp + 0.8 * (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5)
    return logp, logp - log_ratio, ref


def check_clip_regions(log_ratio, eps_low, eps_high):
    """Every branch of min(ρA, clip(ρ)A) occurs: both bounds, with positive and negative advantages."""
    adv = torch.repeat_interleave(torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(LENS))
    low, high = log_ratio < math.log(1 - eps_low), log_ratio > math.log(1 + eps_high)
    for region in [low & (adv > 0), low & (adv < 0), high & (adv > 0), high & (adv < 0)]:
        assert region.any(), "the batch misses a clip region"


def padded(flat):
    """[sum(LENS)] -> [N, T] right-padded with PAD_LOGP, and the completion mask [N, T] (int64 as in TRL)."""
    n, t = len(LENS), max(LENS)
    out = torch.full((n, t), PAD_LOGP, dtype=torch.float64)
    mask = torch.zeros((n, t), dtype=torch.int64)
    at = 0
    for i, length in enumerate(LENS):
        out[i, :length] = flat[at : at + length]
        mask[i, :length] = 1
        at += length
    return out, mask


def bare_trainer(args, accelerator):
    """A GRPOTrainer holding only what _compute_loss reads, set as GRPOTrainer.__init__ sets it."""
    trainer = object.__new__(GRPOTrainer)
    trainer.args = args
    trainer.accelerator = accelerator
    trainer.model = torch.nn.Module()  # only .training is read: True selects the "train" branch
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.max_completion_length = args.max_completion_length
    trainer.use_vllm = args.use_vllm
    trainer.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    trainer.loss_type = args.loss_type
    trainer.aux_loss_enabled = False  # no MoE router
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.mask_truncated_completions = args.mask_truncated_completions
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.beta = args.beta
    return trainer


def trl_loss(case, flat_logp, flat_old, flat_ref):
    """TRL's loss, d loss / d logπθ (flat, thinkshort's layout) and logged statistics for one case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' gradient_checkpointing rename
        args = GRPOConfig(
            output_dir="/tmp/trl_loss_fixture",
            report_to=[],
            use_cpu=True,
            max_completion_length=MAX_COMPLETION_LENGTH,
            use_bias_correction_kl=False,
            **case,
        )
    assert (args.importance_sampling_level, args.delta, args.entropy_coef) == ("token", None, 0.0)
    assert args.gradient_accumulation_steps == args.steps_per_generation == 1
    # Created after GRPOConfig, whose set-up resets accelerate's shared state.
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    trainer = bare_trainer(args, accelerator)

    logp, completion_mask = padded(flat_logp)  # [N, T] each
    logp.requires_grad_(True)
    old, _ = padded(flat_old)
    ref, _ = padded(flat_ref)
    # TRL's input side of mask_truncated_completions (GRPOTrainer._generate_and_score_completions):
    #   completion_mask = completion_mask * (~is_truncated).unsqueeze(1).int()
    #   num_items_in_batch = accelerator.gather(loss_mask.sum()).sum()
    # is_truncated there means "the last id is neither EOS nor pad"; here it is TRUNCATED directly.
    mask = completion_mask
    if args.mask_truncated_completions:
        mask = mask * (~torch.tensor(TRUNCATED)).unsqueeze(1).int()
    n = len(LENS)
    inputs = {
        "prompt_ids": torch.zeros((n, 1), dtype=torch.int64),  # [N, 1]: unused, logp is injected
        "prompt_mask": torch.ones((n, 1), dtype=torch.int64),
        "completion_ids": torch.zeros_like(mask),  # [N, T]: only its width is read
        "completion_mask": mask,  # [N, T]
        "advantages": torch.tensor(ADVANTAGES, dtype=torch.float64),  # [N]
        "old_per_token_logps": old,  # [N, T]
        "ref_per_token_logps": ref,  # [N, T]
        "num_items_in_batch": accelerator.gather(mask.sum()).sum(),
    }
    entropies = torch.zeros_like(logp)  # [N, T]: only logged (entropy bonus is off)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropies, None)

    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grad = logp.grad  # [N, T]
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    padding = completion_mask == 0
    assert (grad[padding] == 0).all(), "padding got a gradient"
    out = dict(loss=loss.item(), grad=grad[~padding].tolist())  # row-major: completions back to back
    # TRL's logged statistics, means over the tokens in the (masked) completion mask.
    metrics = trainer._metrics["train"]
    out["clip_ratio_low"] = metrics["clip_ratio/low_mean"][0]
    out["clip_ratio_high"] = metrics["clip_ratio/high_mean"][0]
    if args.beta != 0.0:  # TRL computes the KL only then
        out["kl"] = metrics["kl"][0]
    return out


def main():
    torch.set_num_threads(1)
    logp, old, ref = make_batch()
    for eps in [SYM, ASYM]:
        check_clip_regions(logp - old, eps["epsilon"], eps["epsilon_high"])
    cases = []
    for case in CASES:
        out = trl_loss(case, logp, old, ref)
        cases.append(dict(case, **out))
        print(f"{case}: loss {out['loss']:.12f}")

    fixture = {
        "generator": "tools/make_trl_loss_fixture.py",
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "trl_function": "trl.GRPOTrainer._compute_loss",
        "shared_options": {
            "use_bias_correction_kl": False,
            "importance_sampling_level": "token",
            "num_processes": 1,
            "gradient_accumulation_steps": 1,
            "steps_per_generation": 1,
        },
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "lens": LENS,
        "truncated": TRUNCATED,
        "advantages": ADVANTAGES,
        "logp": logp.tolist(),
        "old_logp": old.tolist(),
        "ref_logp": ref.tolist(),
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "trl_grpo_loss.json")
    with open(path, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(path)} ({len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
