"""What the toolkit knows about each model architecture, in one table keyed by Hugging Face's
`config.model_type`.

Every place that depends on the architecture reads its entry here: where Wq and Wv live
(adapters.find_sites, including GPT-2's fused q/k/v projection), which padding mask a forward gets
(tasks.base.padding_mask), which modules PEFT adapts (methods/adalora.py, the benchmark's PEFT
baseline), which config attributes are the model's dropouts (a task's `model_overrides:
{dropouts: ...}`, see `dropout_attributes`), and how the tiny random-init models are dressed
(models.tiny_tokenizer / models.load_backbone). Adding an architecture is one `Family(...)` entry
in FAMILIES; an architecture without one is refused with the list of those that have one.

Attribute names below were read from transformers' configuration and modeling files
(`models/<type>/configuration_<type>.py`, `modeling_<type>.py`).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

# A task's model_overrides key that asks for dropout by role instead of by attribute name:
# `dropouts: 0.0` sets every dropout of the family; `dropouts: {residual: 0.09, attention: 0.09,
# embedding: 0.0}` sets the named roles. No transformers config has an attribute of this name.
DROPOUTS_KEY = "dropouts"
# Roles, named after GPT-2's three dropouts (the paper's Table 9 sets Resid_pdrop, Attn_pdrop,
# Embd_pdrop) and BART's extra two (Table 11 sets its Activation and Classifier Dropout too).
DROPOUT_ROLES = ("residual", "attention", "embedding", "activation", "classifier")

PADDING_MASKS = ("4d-bool", "2d")


@dataclass(frozen=True)
class QVTarget:
    """A module holding Wq or Wv: matched by name suffix; `part` = (index, parts) when the module
    fuses several projections and Wq or Wv is the index-th of `parts` equal output-column blocks."""

    suffix: str
    proj: str                               # "q" or "v"
    part: tuple[int, int] | None = None


@dataclass(frozen=True)
class TinyRecipe:
    """How a tiny random-init model of the family is built around the committed byte-level BPE.

    special_tokens: the tokenizer's special tokens (as PreTrainedTokenizerFast keywords), chosen
      to lay sequences out as the family's real tokenizer does;
    pair_template: whether encoding adds `<s> A </s></s> B </s>` (RoBERTa and BART build pairs so);
      without it nothing is added (GPT-2, Llama, Qwen2 add no special tokens when encoding);
    token_ids: extra config ids taken from tokenizer attributes (BART starts decoding at </s>).
    """

    special_tokens: Mapping[str, str | None]
    pair_template: bool = False
    token_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    model_type: str
    qv: tuple[QVTarget, ...]
    # "4d-bool": bidirectional attention, which under SDPA gets a ready (batch, 1, 1, length) bool
    # mask (tasks.base.padding_mask says why); "2d": causal models keep the plain 2-D mask.
    padding_mask: str
    # Module-name suffixes PEFT adapts for Wq and Wv. A fused q/k/v projection is first split into
    # q, k, v child modules (fused_qkv.split_fused_qkv), so its targets name the children.
    peft_targets: tuple[str, ...]
    dropouts: Mapping[str, tuple[str, ...]]   # role -> config attributes
    tiny: TinyRecipe
    # PEFT's flag for layers storing W as (in, out): transformers' Conv1D (GPT-2).
    fan_in_fan_out: bool = False

    def __post_init__(self):
        if self.padding_mask not in PADDING_MASKS:
            raise ConfigError(f"family {self.model_type!r}: padding_mask {self.padding_mask!r} is "
                              f"not one of {list(PADDING_MASKS)}")
        unknown = sorted(set(self.dropouts) - set(DROPOUT_ROLES))
        if unknown:
            raise ConfigError(f"family {self.model_type!r}: dropout roles {unknown} are not among "
                              f"{list(DROPOUT_ROLES)}")
        if any(t.proj not in ("q", "v") for t in self.qv):
            raise ConfigError(f"family {self.model_type!r}: a q/v target's proj must be 'q' or 'v'")

    @property
    def fused_qkv(self) -> bool:
        """Wq and Wv are column blocks of one fused projection (GPT-2's c_attn)."""
        return any(t.part is not None for t in self.qv)

    @property
    def projection_modules(self) -> list[str]:
        """Names of the whole modules that hold Wq and Wv (a fused projection once), in table
        order: what PEFT adapts when it is given these names on the unsplit model."""
        return list(dict.fromkeys(t.suffix.rsplit(".", 1)[-1] for t in self.qv))

    def dropout_attributes(self, request: Any) -> tuple[dict[str, float], list[str]]:
        """Config attributes (in table order) and their values for a `dropouts` request, and a
        note for each nonzero role the family does not have (nothing can apply it).

        `request` is a number (every dropout of the family) or a mapping of role -> number. A role
        the family lacks asked at 0 needs nothing: the model has no such dropout."""
        if isinstance(request, Mapping):
            unknown = [r for r in request if r not in DROPOUT_ROLES]
            if unknown:
                raise ConfigError(f"model_overrides.{DROPOUTS_KEY}: unknown roles {unknown}; valid: "
                                  f"{list(DROPOUT_ROLES)} (or one number for every dropout)")
            order = [*self.dropouts, *(r for r in DROPOUT_ROLES if r not in self.dropouts)]
            wanted = {role: request[role] for role in order if role in request}
        else:
            wanted = {role: request for role in self.dropouts}
        attrs: dict[str, float] = {}
        origin: dict[str, str] = {}
        notes = []
        for role, value in wanted.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ConfigError(f"model_overrides.{DROPOUTS_KEY}: {role} must be a number in "
                                  f"[0, 1), got {value!r}")
            if role not in self.dropouts:
                if value != 0:
                    notes.append(f"{self.model_type} has no {role} dropout (its dropouts: "
                                 f"{', '.join(self.dropouts) or 'none'}); {DROPOUTS_KEY}.{role}="
                                 f"{value} does not apply")
                continue
            for attr in self.dropouts[role]:
                if attr in attrs and attrs[attr] != value:
                    # One attribute serves both roles (BART's `dropout`, BERT's hidden dropout).
                    raise ConfigError(
                        f"model_overrides.{DROPOUTS_KEY}: {origin[attr]}={attrs[attr]} and "
                        f"{role}={value} disagree, but {self.model_type} has one attribute for "
                        f"both ({attr})")
                attrs[attr] = value
                origin.setdefault(attr, role)
        return attrs, notes


_SENTENCE_PAIR_TOKENS = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                             cls_token="<s>", sep_token="</s>", mask_token="<mask>")
# Encoders: BertSelfAttention's query/value; the hidden dropout also covers the embeddings
# (BertEmbeddings); the classification head uses classifier_dropout (None: the hidden dropout).
_ENCODER_DROPOUTS = {"residual": ("hidden_dropout_prob",), "attention": ("attention_probs_dropout_prob",),
                     "embedding": ("hidden_dropout_prob",), "classifier": ("classifier_dropout",)}
_ENCODER_QV = (QVTarget("attention.self.query", "q"), QVTarget("attention.self.value", "v"))
# Decoder-only models with separate q_proj / v_proj and only an attention-probability dropout.
_DECODER_QV = (QVTarget("self_attn.q_proj", "q"), QVTarget("self_attn.v_proj", "v"))

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the table; a second entry for one model_type is an error."""
    if family.model_type in FAMILIES:
        raise ConfigError(f"model family {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


register(Family(
    "roberta", _ENCODER_QV, "4d-bool", peft_targets=("query", "value"), dropouts=_ENCODER_DROPOUTS,
    tiny=TinyRecipe(_SENTENCE_PAIR_TOKENS, pair_template=True)))
# The committed BPE has no [CLS]/[SEP]: a tiny BERT is laid out as RoBERTa (<s> A </s></s> B </s>).
register(Family(
    "bert", _ENCODER_QV, "4d-bool", peft_targets=("query", "value"), dropouts=_ENCODER_DROPOUTS,
    tiny=TinyRecipe(_SENTENCE_PAIR_TOKENS, pair_template=True)))
register(Family(
    # GPT-2 fuses q, k, v into one Conv1D of 3 x hidden output columns: q first, v last.
    "gpt2", (QVTarget("attn.c_attn", "q", (0, 3)), QVTarget("attn.c_attn", "v", (2, 3))), "2d",
    peft_targets=("c_attn.q", "c_attn.v"),
    # resid_pdrop: attention output and MLP output; embd_pdrop: after token + position embeddings.
    # (summary_first_dropout belongs to the double-heads model's summary head, not used here.)
    dropouts={"residual": ("resid_pdrop",), "attention": ("attn_pdrop",),
              "embedding": ("embd_pdrop",)},
    tiny=TinyRecipe(dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>",
                         pad_token="<pad>")),
    fan_in_fan_out=True))
register(Family(
    "llama", _DECODER_QV, "2d", peft_targets=("q_proj", "v_proj"),
    dropouts={"attention": ("attention_dropout",)},
    # As SmolLM2's tokenizer: nothing added when encoding, one end token (the committed BPE has
    # <|endoftext|> where SmolLM2-Instruct has <|im_start|> / <|im_end|>).
    tiny=TinyRecipe(dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>",
                         pad_token="<pad>"))))
register(Family(
    "qwen2", _DECODER_QV, "2d", peft_targets=("q_proj", "v_proj"),
    dropouts={"attention": ("attention_dropout",)},
    # Qwen2Tokenizer's defaults: no bos token, <|endoftext|> as end, padding and unknown token.
    tiny=TinyRecipe(dict(bos_token=None, eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>"))))
register(Family(
    # Encoder self-, decoder self- and cross-attention (the paper's Sec. 5: all three).
    "bart", (QVTarget("self_attn.q_proj", "q"), QVTarget("self_attn.v_proj", "v"),
             QVTarget("encoder_attn.q_proj", "q"), QVTarget("encoder_attn.v_proj", "v")),
    # The encoder is bidirectional; the decoder gets no padding mask (tasks/xsum.py).
    "4d-bool", peft_targets=("q_proj", "v_proj"),
    # `dropout`: embeddings and every residual branch; classifier_dropout: the classification head.
    dropouts={"residual": ("dropout",), "attention": ("attention_dropout",), "embedding": ("dropout",),
              "activation": ("activation_dropout",), "classifier": ("classifier_dropout",)},
    tiny=TinyRecipe(_SENTENCE_PAIR_TOKENS, pair_template=True,
                    token_ids={"decoder_start_token_id": "eos_token_id"})))


def family_spec(model_or_type: Any) -> Family:
    """The table entry of a model, a config or a model_type string; ConfigError naming the
    supported families when there is none."""
    model_type = model_or_type
    if not isinstance(model_or_type, str):
        config = getattr(model_or_type, "config", model_or_type)
        model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not a supported model family; supported: "
                          f"{sorted(FAMILIES)} (deltalora_repro/families.py)")
    return FAMILIES[model_type]


def no_dropout(model_type: str) -> dict[str, float]:
    """Config keyword arguments that turn every dropout of the family off."""
    attrs, _ = family_spec(model_type).dropout_attributes(0.0)
    return attrs
