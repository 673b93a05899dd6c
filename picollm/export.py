"""A run's weights outside its checkpoints: the run's own ``model.safetensors``, written at
the end of training (``export_weights`` / ``load_weights``), and a Hugging Face model
folder that loads with no custom code:

    python -m picollm.export run_dir=runs/cpu out=hf/cpu [checkpoint=STEP|PATH]

Our llama arch is exactly Qwen3 (QK-norm on) or Llama (QK-norm off), and our gpt2 arch is
HF GPT-2, so export is renaming (and splitting fused) tensors; nothing is approximated.
The tokenizer becomes a byte-level BPE ``tokenizer.json`` rebuilt from the tiktoken ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import tiktoken
import torch

from picollm import cli
from picollm.model import GPT, GPTConfig
from picollm.files import atomic_path, pid_alive, write_atomic
from picollm.saved_run import RunError, load_run
from picollm.tokenizer import _parts


class ExportError(RuntimeError):
    """A run that cannot be exported as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- run_dir/model.safetensors

def export_weights(model: GPT, run_dir: Path) -> None:
    """The final model as safetensors plus its JSON config: loadable with ``load_weights``
    and no optimizer state."""
    from safetensors.torch import save_model

    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_model(model, str(tmp))  # handles gpt2's tied embedding/head
    write_atomic(run_dir / "model_config.json", json.dumps(model.config_dict(), indent=2))


def load_weights(run_dir: Union[str, Path], device="cpu") -> GPT:
    """The model ``export_weights`` wrote into ``run_dir``, on ``device``."""
    from safetensors.torch import load_model

    cfg = GPTConfig(**json.loads((Path(run_dir) / "model_config.json").read_text()))
    model = GPT(cfg)
    load_model(model, str(Path(run_dir) / "model.safetensors"), device=str(device))
    return model.to(device)


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

def _true_vocab_rows(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict with the embedding and head cut to the tokenizer's vocabulary: the
    padding rows are a training-speed detail that HF's vocab_size must not include."""
    sd, vocab = model.state_dict(), model.cfg.vocab_size
    for name in ("embed.weight", "lm_head.weight"):
        sd[name] = sd[name][:vocab]
    return sd


def _llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    cfg, sd = model.cfg, _true_vocab_rows(model)
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
    cfg, sd = model.cfg, _true_vocab_rows(model)
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


def with_bos(tok, bos: str, bos_id: int):
    """Make ``tok(text)`` start with BOS, as every training document does ([BOS] + tokens), so
    transformers pipelines and lm-eval score contexts the model saw in training.
    ``add_special_tokens=False`` still gives the bare tokens."""
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tok


def write_tokenizer(enc: tiktoken.Encoding, bos_id: int, out: Path) -> list[str]:
    """tokenizer.json and its configs in ``out``; returns the names written."""
    bos = enc.decode_single_token_bytes(bos_id).decode("utf-8")
    with_bos(hf_tokenizer(enc), bos, bos_id).save(str(out / "tokenizer.json"))
    # PreTrainedTokenizerFast: take tokenizer.json as is, so no model-specific class re-derives the split regex.
    # The post-processor in tokenizer.json is what adds BOS; add_bos_token states the same, and
    # passing add_bos_token= to from_pretrained (lm-eval's flag) rebuilds it with one BOS or none.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": bos,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": bos}, indent=2) + "\n")
    return list(TOKENIZER_FILES)


# ----------------------------------------------------------------------------- the folder
# An export folder is shared with the user (lm_eval writes its results into it), so picollm
# only ever replaces or removes the files its marker says it wrote; anything else survives.

MARKER = "picollm_export.json"  # the source run, and the list of files this export wrote
MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
STAGING_PREFIX = ".picollm-export-"  # + pid: each writer builds its files in its own folder inside out


def planned_files(tokenizer: bool) -> list[str]:
    return list(MODEL_FILES) + (list(TOKENIZER_FILES) if tokenizer else []) + [MARKER]


def owned_files(out: Path) -> Optional[set[str]]:
    """Names of the files an earlier export wrote in ``out``, or None if picollm did not mark it.
    Markers from before the file list existed own the fixed set those versions wrote."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = marker.get("files", planned_files(True)) if isinstance(marker, dict) else None
    plain = lambda name: isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
    if not isinstance(files, list) or not all(map(plain, files)):
        return None  # a marker that names paths outside the folder is not one picollm wrote
    return set(files) | {MARKER}


def check_out(out: Path, tokenizer: bool) -> set[str]:
    """Refuse an ``out`` picollm may not write into; returns the files it may replace there."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"out={out} is a file, not a folder; pick an empty or new directory for out=.")
    if not out.exists() or not any(not p.name.startswith(STAGING_PREFIX) for p in out.iterdir()):
        return set()
    owned = owned_files(out)
    if owned is None:
        raise ExportError(f"out={out} is not empty and is not a picollm export (it has no {MARKER}), "
                          "so nothing in it was touched; pick an empty or new directory for out=.")
    clash = [name for name in planned_files(tokenizer) if (out / name).exists() and
             (name not in owned or not (out / name).is_file())]
    if clash:
        raise ExportError(f"out={out} holds a {clash[0]} that picollm.export did not write, so nothing in it "
                          f"was touched; move that file away or pick an empty or new directory for out=.")
    return owned


def remove_stale_staging(out: Path) -> None:
    """Staging folders of exports that were killed before they could clean up."""
    for path in out.glob(STAGING_PREFIX + "*"):
        pid = path.name[len(STAGING_PREFIX):]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def install(staging: Path, out: Path, source: dict, written: list[str], owned: set[str]) -> None:
    """Move the staged files into ``out`` (each rename atomic), then remove the files the previous
    export wrote and this one did not. The marker is replaced first by one owning old and new
    files, so an interrupted install still leaves every picollm file listed for the next export."""
    def put_marker(files: list[str]) -> None:
        write_atomic(out / MARKER, json.dumps({**source, "files": files}, indent=2) + "\n")

    put_marker(sorted(owned | set(written) | {MARKER}))
    for name in written:
        os.replace(staging / name, out / name)
    for name in sorted(owned - set(written) - {MARKER}):
        (out / name).unlink(missing_ok=True)
    put_marker(sorted(written + [MARKER]))


def export_run(run_dir: Union[str, Path], out: Union[str, Path], checkpoint: Optional[str] = None,
               tokenizer: bool = True) -> Path:
    """Write the run's checkpoint as an HF folder at ``out``; returns ``out``. Only an empty
    folder or an earlier picollm export is written to, and only picollm's own files change."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    owned = check_out(out, tokenizer)  # before loading anything: a refusal is instant
    run = load_run(run_dir, checkpoint)
    cfg = run.model.cfg
    config = hf_config(cfg, run.bos_id)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file(hf_state_dict(run.model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": run.bos_id, "eos_token_id": run.bos_id, "max_length": cfg.seq_len}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        written = list(MODEL_FILES) + (write_tokenizer(run.tokenizer, run.bos_id, staging) if tokenizer else [])
        source = {"run_dir": str(run.run_dir.resolve()), "checkpoint": str(run.path), "step": run.step,
                  "tokenizer": run.tokenizer_ref, "picollm_model": run.model.config_dict()}
        install(staging, out, source, written, owned)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed export into a new folder leaves no empty folder behind
    return out


USAGE = """usage: python -m picollm.export run_dir=DIR out=DIR [checkpoint=STEP|PATH] [tokenizer=true|false]
Writes a Hugging Face model folder (model.safetensors, config.json, generation_config.json, tokenizer.json)
that transformers.AutoModelForCausalLM / AutoTokenizer load with no custom code."""


@dataclass
class ExportArgs:
    run_dir: str = cli.required("the run to export")
    out: str = cli.required("the folder to write (created if needed)")
    checkpoint: Optional[str] = cli.setting(None, "a step number or a checkpoint path", shown="the newest valid one")
    tokenizer: bool = cli.setting(True, "also write tokenizer.json and its configs")


def main(argv: Optional[list] = None) -> None:
    args = cli.parse(argv, "export", USAGE, ExportArgs)
    try:
        out = export_run(args.run_dir, args.out, args.checkpoint, args.tokenizer)
    except ImportError as err:
        raise SystemExit(f"error: export needs safetensors and tokenizers ({err}); pip install 'transformers'.")
    except (RunError, ExportError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out} ({config['architectures'][0]})")
    if not args.tokenizer:
        print("tokenizer not exported (tokenizer=false): AutoTokenizer will not load this folder.")


if __name__ == "__main__":
    main()
