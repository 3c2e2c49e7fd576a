#!/usr/bin/env python3
"""Build tiny random HF models and reference outputs for thinkshort's CPU tests.

Run once by a developer; the output under tests/fixtures/ is committed. CI never runs this.

Regenerate (from the repository root; the venv lives OUTSIDE the repo):

    python3 -m venv /work/pyenv
    /work/pyenv/bin/pip install --upgrade pip
    /work/pyenv/bin/pip install -r tools/requirements-fixtures.txt
    /work/pyenv/bin/python tools/make_fixtures.py \
        --gsm8k /work/shared/data/gsm8k/train.jsonl --out tests/fixtures

(torch from PyPI on Linux is the CUDA build: it refuses to import without the nvidia-* wheels,
so the requirements file pulls them too, ~5 GB; everything here runs on the CPU.)

What it writes, one folder per model under --out (existing folders are replaced):

    qwen2_tied/         qwen2, f32, tied embeddings, GQA 4:2, qkv bias, classic `rope_theta`,
                        chat template inside tokenizer_config.json, eos [<|im_end|>, <|endoftext|>]
    llama_untied_bf16/  llama, bf16, untied, GQA 4:1, head_dim 16, llama3 rope scaling written with
                        the classic `rope_theta` + `rope_scaling` keys (theta 5e5, factor 8, low 1,
                        high 4, original_max_position_embeddings 64: at head_dim 16 this leaves pair 0
                        unscaled, smooths pair 1 and divides pairs 2..7 by 8, i.e. every branch),
                        chat template in chat_template.jinja (uses bos_token; the file ends in a
                        newline, dropped by Jinja (keep_trailing_newline=False)), bos = eos = pad = <|endoftext|>
    qwen2_sharded_f16/  qwen2, f16, untied, MHA (4 KV heads), two safetensors shards + index,
                        config in the newer `rope_parameters` style (no top-level rope_theta)
    qwen3_qknorm/       qwen3, f32, tied, GQA 4:2, head_dim 32 (q is 128 wide, the hidden size 64),
                        RMSNorm on each head of q and k before the rotation, attention_bias (the
                        q and k biases added before the norms, as released Qwen3 models have none
                        this is the one path that could differ); a chat
                        template with the Jinja constructs of Qwen3's, rendered with earlier replies

`--only NAME...` builds just those folders (each depends on its own seed only, so the others stay
as committed).

Each folder: config.json, weights, tokenizer.json, tokenizer_config.json, generation_config.json,
(chat_template.jinja), expected.json. The reference numbers in expected.json are computed from the
model loaded BACK from its folder as written (dtype float32 so bf16/f16 weights upcast exactly,
eager attention, eval mode).

expected.json schema (the Rust tests read it):
  transformers_version, torch_version,
  logprob_cases  [{prompt_ids, completion_ids, logprobs}]     logprobs[i] = log p(c[i] | prompt + c[:i])
  text_cases     [{prompt, completion, prompt_ids, completion_ids, logprobs}]
  greedy_cases   [{prompt_ids, max_new_tokens, output_ids, min_margin}]   output = new tokens only,
                 ending in the EOS token when generation stopped there
  chat           {messages, rendered, messages_with_system, rendered_with_system}
  eos_token_ids  [...]
  encode_cases   [{text, ids}]                                 ids = encode(text, add_special_tokens=False)

The tokenizer is a 512-token byte-level BPE (3 specials <|endoftext|>=0, <|im_start|>=1,
<|im_end|>=2, the 256 byte symbols, 253 merges) trained here on GSM8K train (questions + answers, file
order); reruns give byte-identical files. Its pipeline is Qwen2.5's (NFC normalizer, Split on the
Qwen2 regex, ByteLevel(add_prefix_space=False, use_regex=False), ByteLevel decoder), because
transformers 5 loads every model_type "qwen2" tokenizer as Qwen2Tokenizer, which rebuilds exactly
that pipeline whatever tokenizer.json says. <think>/<answer> tags are ordinary text, not added tokens.
Every id list is also checked against the plain `tokenizers` library reading tokenizer.json.
"""

import argparse
import json
import math
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

VOCAB_SIZE = 512
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

# Qwen2.5-like ChatML template (default system prompt when none is given).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Llama-3-like template (bos first, header then blank line, trimmed content, no default system),
# spelled with this tokenizer's special tokens.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '<|im_end|>\\n\\n' + message['content'] | trim + '<|endoftext|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant<|im_end|>\\n\\n' }}"
    "{%- endif %}\n"
)

# Written for the qwen3 fixture: the Jinja constructs of Qwen3's own template (a namespace set in
# a loop over the reversed messages, `messages[::-1]`, loop.index0, string methods startswith /
# endswith / split / lstrip / rstrip / strip, `in`, `is defined` and `is false` on a variable the
# caller may not pass), so the Rust renderer (minijinja + pycompat) is checked on them.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if ns.last_query == -1 and message.role == 'user' and not (message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.last_query = (messages|length - 1) - loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

R1_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think></think> and <answer></answer> "
    "tags, respectively, i.e., <think>reasoning process here</think> <answer>answer here</answer>. "
    "IMPORTANT: You should use exactly {budget} tokens in your response. User: {question} Assistant:"
)


# ----------------------------------------------------------------------------------------------
# tokenizer


def load_gsm8k(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_tokenizer(rows):
    # Same pipeline as Qwen2.5's tokenizer.json (NFC, Qwen2 split regex, ByteLevel without regex).
    # transformers 5 forces its Qwen2Tokenizer class on every model_type "qwen2" checkpoint and that
    # class REBUILDS normalizer/pre-tokenizer this way, ignoring tokenizer.json's; with a plain
    # ByteLevel(use_regex=True) pre-tokenizer HF and the tokenizers library would then disagree
    # (e.g. " 48": GPT-2 regex keeps digit runs together, Qwen2's splits single digits).
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # fixed data order (file order) -> deterministic merges
    tok.train_from_iterator([r["question"] + "\n" + r["answer"] for r in rows], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    for s in ["<think>", "</think>", "<answer>", "</answer>"]:
        assert tok.token_to_id(s) is None, s  # ordinary BPE text, not added tokens
    return tok


def tokenizer_config(eos, pad, bos, chat_template=None):
    """Classic (transformers 4.x / Qwen2.5-style) tokenizer_config.json, portable across versions."""
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": bos,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": 512,
        "pad_token": pad,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


# ----------------------------------------------------------------------------------------------
# models


def randomize_(model, gen):
    """Larger-than-default random init; non-zero biases; RMSNorm weights ~ 1 + 0.1 N(0,1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def dump_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def to_classic_rope(cfg):
    """rope_parameters -> classic rope_theta (+ rope_scaling for non-default types)."""
    rp = cfg.pop("rope_parameters", None)
    assert rp is not None or "rope_theta" in cfg, cfg
    if rp is not None:
        rp = dict(rp)
        cfg["rope_theta"] = float(rp.pop("rope_theta"))
        if rp.get("rope_type", "default") == "default" and set(rp) <= {"rope_type"}:
            cfg.pop("rope_scaling", None)
        else:
            cfg["rope_scaling"] = rp
    return cfg


def to_new_rope(cfg):
    """classic rope_theta/rope_scaling -> rope_parameters."""
    if "rope_parameters" not in cfg:
        rp = {"rope_type": "default"}
        if cfg.get("rope_scaling"):
            rp.update(cfg["rope_scaling"])
        rp["rope_theta"] = float(cfg["rope_theta"])
        cfg["rope_parameters"] = rp
    cfg.pop("rope_theta", None)
    cfg.pop("rope_scaling", None)
    return cfg


def llama3_inv_freq(theta, head_dim, factor, low, high, old_ctx):
    """Independent (float64) reimplementation of the llama3 rope scaling, to pick the constants."""
    inv = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    out, kinds = [], []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < old_ctx / high:
            out.append(f); kinds.append("high")
        elif wl > old_ctx / low:
            out.append(f / factor); kinds.append("low")
        else:
            s = (old_ctx / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f); kinds.append("mid")
    return inv, out, kinds


def write_sharded(folder, n_shards=2):
    """Re-split model.safetensors into n_shards files + model.safetensors.index.json (HF layout)."""
    single = folder / "model.safetensors"
    sd = load_file(str(single))
    names = sorted(sd)
    # split by bytes as evenly as possible, keeping each tensor whole
    total = sum(sd[n].numel() * sd[n].element_size() for n in names)
    shards, cur, acc = [[] for _ in range(n_shards)], 0, 0
    for n in names:
        size = sd[n].numel() * sd[n].element_size()
        if cur < n_shards - 1 and acc >= total * (cur + 1) / n_shards:
            cur += 1
        shards[cur].append(n)
        acc += size
    assert all(shards), shards
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: sd[n].contiguous() for n in group}, str(folder / fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
    n_params = sum(sd[n].numel() for n in names)
    dump_json(folder / "model.safetensors.index.json",
              {"metadata": {"total_parameters": n_params, "total_size": total},
               "weight_map": dict(sorted(weight_map.items()))})
    single.unlink()


# ----------------------------------------------------------------------------------------------
# references


@torch.no_grad()
def seq_logprobs(model, prompt_ids, completion_ids):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    p = len(prompt_ids)
    return [float(lp[p - 1 + i, t]) for i, t in enumerate(completion_ids)]


@torch.no_grad()
def greedy(model, prompt_ids, max_new_tokens, eos_ids, pad_id):
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id,
        return_dict_in_generate=True, output_logits=True,
        temperature=None, top_p=None, top_k=None,
    )
    new = out.sequences[0, len(prompt_ids):].tolist()
    margins = []
    for step_logits in out.logits:
        top2 = torch.topk(step_logits[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    assert len(margins) == len(new)
    # cross-check against a plain full-sequence forward (no KV cache)
    seq = list(prompt_ids)
    for t in new:
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        assert int(torch.argmax(logits)) == t
        seq.append(t)
    return new, min(margins)


@torch.no_grad()
def check_batch_consistency(model, prompts, pad_id):
    """Left-padded batch (explicit position_ids) must match the individual runs."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, n - len(p):] = torch.tensor(p)
        mask[b, n - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    for b, p in enumerate(prompts):
        single = model(input_ids=torch.tensor([p])).logits[0].float()
        got = batch[b, n - len(p):]
        err = float((got - single).abs().max())
        assert err < 1e-4, f"batch vs single mismatch {err}"


# ----------------------------------------------------------------------------------------------


def build_fixture(name, spec, tok_path, rows, out_root, gen):
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    # --- model + config ---
    model = spec["model_cls"](spec["config"])
    randomize_(model, gen)
    if spec.get("boost_eos_row"):
        # untied only: scale the lm_head rows of the EOS tokens so greedy decoding stops sometimes
        with torch.no_grad():
            for e in spec["eos_ids"]:
                model.lm_head.weight[e] *= spec["boost_eos_row"]
    model = model.to(spec["dtype"])
    model.save_pretrained(folder)  # single file (fixtures are tiny)
    assert (folder / "model.safetensors").exists()
    if spec.get("shards"):
        write_sharded(folder, spec["shards"])

    cfg_path = folder / "config.json"
    cfg = load_json(cfg_path)
    written_rope = {k: cfg[k] for k in ("rope_theta", "rope_scaling", "rope_parameters") if k in cfg}
    cfg = spec["rope_style"](cfg)
    dump_json(cfg_path, cfg)

    # --- tokenizer files ---
    shutil.copyfile(tok_path, folder / "tokenizer.json")
    tcfg = tokenizer_config(spec["eos_token"], spec["pad_token"], spec["bos_token"],
                            spec["chat_template"] if spec["template_in_config"] else None)
    dump_json(folder / "tokenizer_config.json", tcfg)
    if not spec["template_in_config"]:
        with open(folder / "chat_template.jinja", "w", encoding="utf-8") as f:
            f.write(spec["chat_template"])
    gcfg = GenerationConfig(bos_token_id=spec["bos_id"], eos_token_id=spec["gen_eos"],
                            pad_token_id=spec["pad_id"])
    gcfg.save_pretrained(folder)

    # --- load everything back, as written ---
    lcfg = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    gen_loaded = GenerationConfig.from_pretrained(folder)
    eos_ids = gen_loaded.eos_token_id if isinstance(gen_loaded.eos_token_id, list) else [gen_loaded.eos_token_id]
    assert eos_ids == spec["eos_ids"], (eos_ids, spec["eos_ids"])
    assert tok.eos_token_id == spec["eos_ids"][0]
    pad_id = spec["pad_id"]

    # the bf16/f16 checkpoint must upcast exactly: weights on disk == loaded f32 weights
    disk = {}
    for f in sorted(folder.glob("*.safetensors")):
        disk.update(load_file(str(f)))
    for k, v in disk.items():
        assert v.dtype == spec["dtype"], (k, v.dtype)
        assert torch.equal(v.float(), model.state_dict()[k]), k
    if spec["config"].tie_word_embeddings:
        assert "lm_head.weight" not in disk
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in disk

    # the rope the loaded model really uses must be the one intended
    rope = model.model.rotary_emb
    if spec.get("expect_inv_freq") is not None:
        assert torch.allclose(rope.inv_freq.double(), torch.tensor(spec["expect_inv_freq"], dtype=torch.float64),
                              rtol=1e-6), (rope.inv_freq, spec["expect_inv_freq"])
    assert rope.attention_scaling == 1.0

    def enc(text):
        a = tok.encode(text, add_special_tokens=False)
        b = raw.encode(text, add_special_tokens=False).ids
        assert a == b, (text, a, b)
        return a

    # --- logprob cases (random ids) ---
    rng = np.random.default_rng(spec["seed"])
    logprob_cases = []
    for p_len, c_len in [(1, 1), (1, 30), (40, 30), (17, 5), (6, 12), (33, 1)]:
        p = rng.integers(0, VOCAB_SIZE, p_len).tolist()
        c = rng.integers(0, VOCAB_SIZE, c_len).tolist()
        logprob_cases.append({"prompt_ids": p, "completion_ids": c, "logprobs": seq_logprobs(model, p, c)})

    # --- text cases (GSM8K-like) ---
    text_cases = []
    # two GSM8K rows (from a per-fixture offset) whose R1-prompt + answer fits in 400 tokens
    picked = []
    for r in rows[spec["text_rows"][0]:]:
        if len(raw.encode(R1_PROMPT.format(budget=64, question=r["question"]) + " " + r["answer"]).ids) <= 400:
            picked.append(r)
        if len(picked) == 2:
            break
    r0, r1 = picked
    pairs = [
        ("Question: " + r0["question"] + "\nAnswer:", " " + r0["answer"]),
        (R1_PROMPT.format(budget=64, question=r1["question"]),
         " <think>" + r1["answer"].split("####")[0].strip() + "</think> <answer>"
         + r1["answer"].split("####")[1].strip() + "</answer>"),
        ("What is 7*8?", " 7*8 = 56\n#### 56"),
    ]
    for prompt, completion in pairs:
        pi, ci = enc(prompt), enc(completion)
        assert len(pi) + len(ci) <= lcfg.max_position_embeddings
        text_cases.append({"prompt": prompt, "completion": completion, "prompt_ids": pi,
                           "completion_ids": ci, "logprobs": seq_logprobs(model, pi, ci)})

    # --- greedy cases: pick prompts with a safe argmax margin at every step ---
    # want >= 3 cases that run to the cap and (when one can be found) 1 that stops at EOS
    greedy_cases, stopped_at_eos, capped = [], 0, 0
    budgets = [20, 32, 40]
    tries = 0
    while (capped < 3 or stopped_at_eos < 1) and tries < 600:
        tries += 1
        n_new = budgets[tries % len(budgets)]
        if tries % 2:
            r = rows[int(rng.integers(0, len(rows)))]
            words = r["question"].split()
            p = enc(" ".join(words[: int(rng.integers(1, min(12, len(words)) + 1))]))[:40]
        else:
            p = rng.integers(3, VOCAB_SIZE, int(rng.integers(1, 41))).tolist()
        out, margin = greedy(model, p, n_new, eos_ids, pad_id)
        if margin < 1e-3:
            continue
        hit_eos = out[-1] in eos_ids
        assert all(t not in eos_ids for t in out[:-1])
        assert hit_eos or len(out) == n_new
        if hit_eos and (stopped_at_eos >= 1 or len(out) < 4):
            continue
        if not hit_eos and capped >= 3:
            continue
        stopped_at_eos += hit_eos
        capped += not hit_eos
        greedy_cases.append({"prompt_ids": p, "max_new_tokens": n_new, "output_ids": out,
                             "min_margin": margin})
    assert capped >= 3, (name, capped)

    # --- batch consistency (assert only) ---
    check_batch_consistency(model, [logprob_cases[2]["prompt_ids"], logprob_cases[3]["prompt_ids"]], pad_id)

    # --- chat ---
    messages = [{"role": "user", "content": "What is 2+3?"}]
    messages_sys = [{"role": "system", "content": "Think step by step."}] + messages
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rendered_sys = tok.apply_chat_template(messages_sys, tokenize=False, add_generation_prompt=True)
    chat = {"messages": messages, "rendered": rendered,
            "messages_with_system": messages_sys, "rendered_with_system": rendered_sys}
    if spec.get("chat_with_replies"):
        # earlier turns: a reply with its reasoning (dropped before the last user turn) and one after
        replies = messages_sys + [
            {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\n5"},
            {"role": "user", "content": "And 5+5?"},
            {"role": "assistant", "content": "<think>\nadd 5\n</think>\n\n10"},
        ]
        chat["messages_with_replies"] = replies
        chat["rendered_with_replies"] = tok.apply_chat_template(replies, tokenize=False,
                                                                add_generation_prompt=True)

    # --- encode cases ---
    texts = [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
        "  leading spaces, tabs\tand\n\nblank lines\n",
        "<think>12 + 30 = 42</think> <answer>42</answer>",
        "unicode: café, naïve, 日本語, emoji 🙂, €3.50 — done",
        "NFC folds this: cafe\u0301 != caf\u00e9 only before normalization",
        "digits 0123456789 and 3.14159 and 1,000,000",
        "end of turn<|im_end|>\n<|im_start|>assistant\nok<|endoftext|>",
        "",
    ]
    encode_cases = [{"text": t, "ids": enc(t)} for t in texts]
    for c in encode_cases:  # byte-level: decode(encode(x)) == x
        assert tok.decode(c["ids"], skip_special_tokens=False) == unicodedata.normalize("NFC", c["text"]), c

    expected = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "logprob_cases": logprob_cases,
        "text_cases": text_cases,
        "greedy_cases": greedy_cases,
        "chat": chat,
        "eos_token_ids": eos_ids,
        "encode_cases": encode_cases,
    }
    dump_json(folder / "expected.json", expected)

    for f in folder.iterdir():
        os.chmod(f, 0o644)  # save_file/save_pretrained may create 0600 files
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 1_000_000, (name, size)
    print(f"{name}: {size} bytes; HF tokenizer class {type(tok).__name__}; rope keys written by transformers: {written_rope}; "
          f"eos {eos_ids}; greedy outputs {[len(g['output_ids']) for g in greedy_cases]} "
          f"(eos stops {stopped_at_eos}, tries {tries}), min margins "
          f"{[round(g['min_margin'], 4) for g in greedy_cases]}")
    return expected


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gsm8k", default="/work/shared/data/gsm8k/train.jsonl")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="build only these fixtures (each folder's numbers depend on its own seed only)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order -> reproducible reference numbers
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)

    rows = load_gsm8k(args.gsm8k)
    tok = train_tokenizer(rows)
    tmp_tok = out_root / ".tokenizer.json.tmp"
    tok.save(str(tmp_tok))
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    EOT, IM_START, IM_END = ids["<|endoftext|>"], ids["<|im_start|>"], ids["<|im_end|>"]

    # llama3 rope: pick constants so that, at head_dim 16, some frequencies are untouched, some
    # divided by `factor` and some smoothly interpolated (every branch of the formula is hit).
    l3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    base_inv, l3_inv, kinds = llama3_inv_freq(500000.0, 16, l3["factor"], l3["low_freq_factor"],
                                              l3["high_freq_factor"], l3["original_max_position_embeddings"])
    changed = [abs(a - b) > 1e-12 * a for a, b in zip(base_inv, l3_inv)]
    assert any(changed) and not all(changed), changed
    assert set(kinds) == {"high", "mid", "low"}, kinds
    print("llama3 inv_freq branches per pair:", kinds)

    specs = {
        "qwen2_tied": dict(
            model_cls=Qwen2ForCausalLM,
            config=Qwen2Config(
                vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
                bos_token_id=None, eos_token_id=IM_END, pad_token_id=EOT, use_sliding_window=False),
            dtype=torch.float32, rope_style=to_classic_rope, shards=None,
            eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
            bos_id=None, pad_id=EOT, gen_eos=[IM_END, EOT], eos_ids=[IM_END, EOT],
            chat_template=QWEN_CHAT_TEMPLATE, template_in_config=True,
            expect_inv_freq=[1.0 / 10000.0 ** (2 * i / 16) for i in range(8)],
            seed=1, text_rows=(0,)),
        "llama_untied_bf16": dict(
            model_cls=LlamaForCausalLM,
            config=LlamaConfig(
                vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
                attention_bias=False, mlp_bias=False,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **l3},
                bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT),
            dtype=torch.bfloat16, rope_style=to_classic_rope, shards=None,
            eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>",
            bos_id=EOT, pad_id=EOT, gen_eos=EOT, eos_ids=[EOT],
            chat_template=LLAMA_CHAT_TEMPLATE, template_in_config=False,
            expect_inv_freq=l3_inv, seed=2, text_rows=(100,)),
        "qwen2_sharded_f16": dict(
            model_cls=Qwen2ForCausalLM,
            config=Qwen2Config(
                vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
                max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
                bos_token_id=None, eos_token_id=IM_END, pad_token_id=EOT, use_sliding_window=False),
            dtype=torch.float16, rope_style=to_new_rope, shards=2,
            eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
            bos_id=None, pad_id=EOT, gen_eos=[IM_END, EOT], eos_ids=[IM_END, EOT],
            chat_template=QWEN_CHAT_TEMPLATE, template_in_config=True,
            expect_inv_freq=[1.0 / 1000000.0 ** (2 * i / 16) for i in range(8)],
            seed=3, text_rows=(200,)),
        "qwen3_qknorm": dict(
            model_cls=Qwen3ForCausalLM,
            config=Qwen3Config(
                vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
                rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=True,
                initializer_range=0.2, attention_bias=True, bos_token_id=None, eos_token_id=IM_END,
                pad_token_id=EOT, use_sliding_window=False),
            dtype=torch.float32, rope_style=to_classic_rope, shards=None,
            eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
            bos_id=None, pad_id=EOT, gen_eos=[IM_END, EOT], eos_ids=[IM_END, EOT],
            chat_template=QWEN3_STYLE_CHAT_TEMPLATE, template_in_config=True, chat_with_replies=True,
            expect_inv_freq=[1.0 / 1000000.0 ** (2 * i / 32) for i in range(16)],
            seed=4, text_rows=(300,)),
    }
    unknown = set(args.only or []) - set(specs)
    assert not unknown, f"unknown fixtures {unknown}; known: {list(specs)}"

    for name, spec in specs.items():
        if args.only and name not in args.only:
            continue
        gen = torch.Generator().manual_seed(spec["seed"])
        build_fixture(name, spec, tmp_tok, rows, out_root, gen)
    tmp_tok.unlink()

    if args.only:
        return 0
    # final checks on the config styles as written
    c1 = load_json(out_root / "qwen2_tied" / "config.json")
    c2 = load_json(out_root / "llama_untied_bf16" / "config.json")
    c3 = load_json(out_root / "qwen2_sharded_f16" / "config.json")
    assert "rope_theta" in c1 and "rope_parameters" not in c1 and "rope_scaling" not in c1
    assert c2["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in c2
    assert "rope_theta" not in c3 and "rope_scaling" not in c3
    assert c3["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000000.0}
    total = sum(f.stat().st_size for f in out_root.rglob("*") if f.is_file())
    print(f"total fixtures size: {total} bytes")
    assert total < 3_000_000


if __name__ == "__main__":
    sys.exit(main())
