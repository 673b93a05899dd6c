"""Export a run as a Hugging Face model folder that loads with no custom code.

    python -m picollm.export run_dir=runs/cpu out=hf/cpu [checkpoint=STEP|PATH]

Our llama arch is exactly Qwen3 (QK-norm on) or Llama (QK-norm off), and our gpt2 arch is
HF GPT-2, so export is renaming (and splitting fused) tensors; nothing is approximated.
The tokenizer becomes a byte-level BPE ``tokenizer.json`` rebuilt from the tiktoken ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import tiktoken
import torch

from picollm.model import GPT, GPTConfig
from picollm.runs import RunError, boolean, load_run, parse_args
from picollm.tokenizer import _parts


class ExportError(RuntimeError):
    """A run that cannot be exported as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- config.json

def hf_config(cfg: GPTConfig, bos_id: int) -> dict:
    """config.json for the HF class that computes exactly what ``GPT(cfg)`` computes."""
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": bos_id, "eos_token_id": bos_id,
              "torch_dtype": "float32", "use_cache": True, "initializer_range": 0.02}
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_positions": cfg.seq_len,
                "n_inner": cfg.hidden, "activation_function": "gelu_new",  # = tanh-approximated GELU
                "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "tie_word_embeddings": True}
    if cfg.arch != "llama":
        raise ExportError(f"model.arch={cfg.arch!r} has no Hugging Face equivalent; export a llama or gpt2 run.")
    qwen3 = cfg.qk_norm  # Llama has no QK-norm; Qwen3 is Llama plus per-head QK RMSNorm
    out = {"architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
           "model_type": "qwen3" if qwen3 else "llama", **common,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
           # transformers 5 reads rope_parameters, 4.x reads rope_theta: write both.
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
           "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False}
    if qwen3:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        out.update(mlp_bias=False, pretraining_tp=1)
    return out


# ----------------------------------------------------------------------------- weights

def _llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    cfg, sd = model.cfg, model.state_dict()
    d, h = cfg.d_model, cfg.hidden
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].split(d, dim=0)  # fused along the output dim: q, k, v
        gate, up = sd[src + "mlp.up.weight"].split(h, dim=0)  # chunk(2): gate first, then up
        out.update({
            dst + "input_layernorm.weight": sd[src + "norm1.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "norm2.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "attn.proj.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": sd[src + "mlp.down.weight"],
        })
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = sd[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = sd[src + "attn.k_norm.weight"]
    return out


def _gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    cfg, sd = model.cfg, model.state_dict()
    # lm_head is tied to wte, so it is not stored (HF re-ties it on load).
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": sd["norm_f.bias"]}
    pairs = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
    for i in range(cfg.n_layer):
        for ours, theirs in pairs.items():
            src, dst = f"blocks.{i}.{ours}.", f"transformer.h.{i}.{theirs}."
            weight = sd[src + "weight"]
            # HF GPT-2 uses Conv1D, which stores linear weights as (in, out): transpose ours.
            out[dst + "weight"] = weight if theirs.startswith("ln_") else weight.t()
            out[dst + "bias"] = sd[src + "bias"]
    return out


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF parameter names, as contiguous fp32 CPU tensors (safetensors needs both)."""
    tensors = _gpt2_tensors(model) if model.cfg.arch == "gpt2" else _llama_tensors(model)
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in tensors.items()}


# ----------------------------------------------------------------------------- tokenizer

def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer(enc: tiktoken.Encoding):
    """A ``tokenizers.Tokenizer`` that splits and merges exactly as ``enc`` does (ordinary text)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pattern, ranks, specials = _parts(enc)
    chars = _byte_chars()
    text = lambda token: "".join(chars[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; listing every
    # split of each token in rank order gives HF's BPE the same priorities.
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        merges += [(text(token[:i]), text(token[i:])) for i in range(1, len(token))
                   if token[:i] in ranks and token[i:] in ranks]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for name, idx in sorted(specials.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if tok.token_to_id(name) != idx:
            raise ExportError(f"special token {name} would get id {tok.token_to_id(name)} instead of {idx}; "
                              "this tokenizer's ids are not contiguous, so export with tokenizer=false.")
    return tok


def write_tokenizer(enc: tiktoken.Encoding, bos_id: int, out: Path) -> None:
    bos = enc.decode_single_token_bytes(bos_id).decode("utf-8")
    hf_tokenizer(enc).save(str(out / "tokenizer.json"))
    # PreTrainedTokenizerFast: take tokenizer.json as is, so no model-specific class re-derives the split regex.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": bos,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": bos}, indent=2) + "\n")


# ----------------------------------------------------------------------------- the folder

def export_run(run_dir: Union[str, Path], out: Union[str, Path], checkpoint: Optional[str] = None,
               tokenizer: bool = True) -> Path:
    """Write the run's checkpoint as an HF folder at ``out``; returns ``out``."""
    from safetensors.torch import save_file

    run = load_run(run_dir, checkpoint)
    cfg = run.model.cfg
    config = hf_config(cfg, run.bos_id)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / "config.json").is_file():
        raise ExportError(f"out={out} exists and is not an exported model folder; pick an empty or new directory.")
    # Build everything in a sibling temp folder and swap it in, so a failure leaves no half export.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(hf_state_dict(run.model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": run.bos_id, "eos_token_id": run.bos_id, "max_length": cfg.seq_len}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer:
            write_tokenizer(run.tokenizer, run.bos_id, tmp)
        source = {"run_dir": str(run.run_dir.resolve()), "checkpoint": str(run.path), "step": run.step,
                  "tokenizer": run.tokenizer_ref, "picollm_model": run.model.config_dict()}
        (tmp / "picollm_export.json").write_text(json.dumps(source, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


USAGE = """usage: python -m picollm.export run_dir=DIR out=DIR [checkpoint=STEP|PATH] [tokenizer=true|false]
Writes a Hugging Face model folder (model.safetensors, config.json, generation_config.json, tokenizer.json)
that transformers.AutoModelForCausalLM / AutoTokenizer load with no custom code."""


def main(argv: Optional[list] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv,
                      {"run_dir": str, "out": str, "checkpoint": str, "tokenizer": boolean}, USAGE,
                      required=("run_dir", "out"))
    try:
        out = export_run(args["run_dir"], args["out"], args.get("checkpoint"), args.get("tokenizer", True))
    except ImportError as err:
        raise SystemExit(f"error: export needs safetensors and tokenizers ({err}); pip install 'transformers'.")
    except (RunError, ExportError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out} ({config['architectures'][0]})")
    if not args.get("tokenizer", True):
        print("tokenizer not exported (tokenizer=false): AutoTokenizer will not load this folder.")


if __name__ == "__main__":
    main()
