"""P-Tuning v2 with ChatGLM's ``PrefixEncoder`` semantics, on any decoder-only HF model.

``pre_seq_len`` learned prefix tokens give every layer ``pre_seq_len`` extra key/value pairs:

* without ``prefix_projection``: ``Embedding(pre_seq_len, num_layers * 2 * kv_heads * head_dim)``;
* with it: ``Embedding(pre_seq_len, kv_dim) -> Linear(kv_dim, prefix_hidden_size) -> Tanh ->
  Linear(prefix_hidden_size, num_layers * 2 * kv_dim)`` (kv_dim = kv_heads * head_dim; ChatGLM-6B's
  layout. ChatGLM2's own checkpoints embed into the full ``num_layers * 2 * kv_dim`` instead: the
  encoder supports both; models/thudm_prefix.py converts whichever a checkpoint has).

The output is viewed as ``(batch, pre_seq_len, num_layers * 2, kv_heads, head_dim)``, dropout is
applied, and layer ``i`` gets key = slot ``2i`` and value = slot ``2i + 1`` (exactly THUDM's
``permute([2, 1, 0, 3, 4]).split(2)``), shaped ``(batch, kv_heads, pre_seq_len, head_dim)``.

How it is wired (no change to the model class):

* the encoder is registered as the submodule ``model.prefix_encoder`` (so optimizers, ``.to()``,
  DeepSpeed see it); every base parameter is frozen;
* ``model.forward`` is wrapped on the instance: it builds the prefix, passes it as the past key
  values, prepends ``pre_seq_len`` ones to a 2D attention mask, and passes explicit position ids
  that count only the real tokens (positions start at 0 for the first real token, as in ChatGLM2;
  left padding is skipped as ``generate`` does). ``model(...)`` and ``model.generate(...)`` both
  go through it;
* training and plain forwards use :class:`PrefixKVCache`, a cache whose ``update()`` returns
  ``cat([prefix, new])`` and stores nothing. Being stateless, it gives the same result when a
  gradient-checkpointed layer is recomputed in the backward pass, so P-Tuning v2 works with
  ``model.gradient_checkpointing_enable()`` (the decoder layers are told they may keep this cache
  under checkpointing). PEFT's PrefixTuning refuses that combination;
* generation (``use_cache``, eval mode, or a cache handed in by ``generate``) uses an ordinary
  ``DynamicCache`` pre-filled with the prefix, so decoding is incremental and beam search works.

Only the encoder is saved: ``prefix_encoder.safetensors`` + ``method.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.utils import ModelOutput

from glm_experiments.compat import CACHE, pop_cache
from glm_experiments.config.ranges import AT_LEAST_1, PROBABILITY, ranged
from glm_experiments.config.schema import MethodConfig
from glm_experiments.errors import SettingError
from glm_experiments.methods.artifacts import cfg_get, check_settings, load_safetensors, read_method_json
from glm_experiments.methods.artifacts import save_safetensors, write_method_json
from glm_experiments.methods.parameters import freeze_all, input_embeddings, model_dims
from glm_experiments.methods.record import Method, register
from glm_experiments.methods.virtual_tokens import override_method, query_shape, real_position_ids, split_virtual_mask
from glm_experiments.models.family import architecture_of


@dataclass
class PtuningMethodConfig(MethodConfig):
    pre_seq_len: int = ranged(16, **AT_LEAST_1)
    prefix_projection: bool = False
    prefix_hidden_size: int = ranged(512, **AT_LEAST_1)
    prefix_dropout: float = ranged(0.1, **PROBABILITY)
    # start from this prefix encoder (ours, ptuning/main.py's, or PEFT PREFIX_TUNING: converted on the fly)
    init_from: Optional[str] = None


log = logging.getLogger(__name__)

NAME = "ptuning"
DEFAULTS = PtuningMethodConfig()  # the schema owns every default
ENCODER_ATTR = "prefix_encoder"
WEIGHTS_FILE = "prefix_encoder.safetensors"
THUDM_PREFIX = "transformer.prefix_encoder."


# --------------------------------------------------------------------------- encoder
class PrefixEncoder(nn.Module):
    """ChatGLM's PrefixEncoder: prefix token ids -> per-layer (key, value) prefixes."""

    def __init__(
        self,
        pre_seq_len: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        prefix_projection: bool = False,
        prefix_hidden_size: int = 512,
        prefix_dropout: float = 0.1,
        embedding_dim: int | None = None,
    ):
        super().__init__()
        if pre_seq_len <= 0:
            raise SettingError(f"method=ptuning: pre_seq_len must be > 0, got {pre_seq_len}")
        self.pre_seq_len = int(pre_seq_len)
        self.num_layers = int(num_layers)
        self.kv_heads = int(kv_heads)
        self.head_dim = int(head_dim)
        self.prefix_projection = bool(prefix_projection)
        kv_dim = self.kv_heads * self.head_dim
        out_dim = self.num_layers * 2 * kv_dim
        self.out_dim = out_dim
        if self.prefix_projection:
            self.prefix_hidden_size = int(prefix_hidden_size)
            self.embedding_dim = int(embedding_dim or kv_dim)
            self.embedding = nn.Embedding(self.pre_seq_len, self.embedding_dim)
            self.trans = nn.Sequential(
                nn.Linear(self.embedding_dim, self.prefix_hidden_size),
                nn.Tanh(),
                nn.Linear(self.prefix_hidden_size, out_dim),
            )
        else:
            if embedding_dim not in (None, out_dim):
                raise SettingError(
                    f"method=ptuning: without prefix_projection the embedding width must be "
                    f"num_layers*2*kv_heads*head_dim = {out_dim}, got {embedding_dim}"
                )
            self.prefix_hidden_size = None
            self.embedding_dim = out_dim
            self.embedding = nn.Embedding(self.pre_seq_len, out_dim)
            self.trans = None
        self.dropout = nn.Dropout(float(prefix_dropout))
        self.register_buffer("prefix_tokens", torch.arange(self.pre_seq_len), persistent=False)

    def settings(self) -> dict[str, Any]:
        return {
            "pre_seq_len": self.pre_seq_len,
            "prefix_projection": self.prefix_projection,
            "prefix_hidden_size": self.prefix_hidden_size,
            "prefix_dropout": self.dropout.p,
            "embedding_dim": self.embedding_dim,
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
        }

    def forward(self, batch_size: int, dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer keys and values, each ``(batch, kv_heads, pre_seq_len, head_dim)``."""
        tokens = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1)
        x = self.embedding(tokens)
        if self.trans is not None:
            x = self.trans(x)
        if dtype is not None:
            x = x.to(dtype)
        x = x.view(batch_size, self.pre_seq_len, self.num_layers * 2, self.kv_heads, self.head_dim)
        x = self.dropout(x)
        x = x.permute(2, 0, 3, 1, 4)  # (2L, b, kv_heads, P, head_dim)
        keys = [x[2 * i] for i in range(self.num_layers)]
        values = [x[2 * i + 1] for i in range(self.num_layers)]
        return keys, values


# --------------------------------------------------------------------------- stateless cache
class _PrefixLayer(DynamicLayer):
    """Holds one layer's prefix; ``update`` returns ``cat([prefix, new])`` and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class PrefixKVCache(Cache):
    """A read-only cache holding only the learned prefix (training / plain forward).

    Its ``get_seq_length()`` is ``pre_seq_len`` for every call, so the causal mask is built with the
    query offset by the prefix; nothing is written, so recomputing a checkpointed layer is exact.
    It cannot be continued: the wrapped forward treats one handed back to it as "no cache".
    """

    stateless = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__(layers=[_PrefixLayer(k, v) for k, v in zip(keys, values)])
        self.prefix_len = keys[0].shape[-2]


def _new_dynamic_cache(config) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except Exception:  # a config without per-layer info: plain lazily-grown cache
        return DynamicCache()


def _fill(cache: Cache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Cache:
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache


# --------------------------------------------------------------------------- wiring
def _encoder(model: nn.Module) -> PrefixEncoder:
    enc = getattr(model, ENCODER_ATTR, None)
    if not isinstance(enc, PrefixEncoder):
        raise ValueError(f"method=ptuning has not been applied to this {type(model).__name__}")
    return enc


def _allow_cache_under_checkpointing(model: nn.Module) -> None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            # instance attribute: only this model's layers keep the (read-only) prefix cache
            module._can_checkpoint_with_cache = True


def _check_reentrant(model: nn.Module) -> None:
    func = getattr(model, "_gradient_checkpointing_func", None)
    if func is None:
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                func = module._gradient_checkpointing_func
                break
    if func is not None and getattr(func, "keywords", {}).get("use_reentrant", False) and model.training:
        raise SettingError(
            "method=ptuning: reentrant gradient checkpointing (use_reentrant=True) cannot pass gradients to "
            "the prefix (it travels as a keyword argument); enable it with the default "
            "gradient_checkpointing_kwargs={'use_reentrant': False}"
        )


def _forward(model: nn.Module, orig, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
             labels=None, use_cache=None, **kwargs: Any):
    """The model's forward with the prefix's keys/values in front of the real tokens' in every layer's cache."""
    past_key_values: Cache | None = pop_cache(kwargs)
    enc = _encoder(model)
    batch, q_len, device = query_shape(input_ids, inputs_embeds, NAME)
    dtype = input_embeddings(model).weight.dtype
    prefix_len = enc.pre_seq_len

    if getattr(past_key_values, "stateless", False):
        past_key_values = None  # a PrefixKVCache handed back: it holds no tokens
    stateless = False
    if past_key_values is None:
        keys, values = enc(batch, dtype=dtype)
        if use_cache and not model.training:
            past_key_values = _fill(_new_dynamic_cache(model.config), keys, values)
        else:
            past_key_values = PrefixKVCache(keys, values)
            stateless = True
        past_real = 0
    else:
        seen = past_key_values.get_seq_length()
        if seen == 0:  # the empty cache generate() creates: pre-fill the prefix
            keys, values = enc(batch, dtype=dtype)
            _fill(past_key_values, keys, values)
            past_real = 0
        else:
            past_real = seen - prefix_len
            if past_real < 0:
                raise ValueError(
                    f"method=ptuning: the cache holds {seen} positions, fewer than pre_seq_len={prefix_len}"
                )
    if stateless and model.training:
        _check_reentrant(model)

    attention_mask, mask_real = split_virtual_mask(attention_mask, past_real, q_len, prefix_len, NAME)
    if position_ids is None:
        position_ids = _position_ids(model, input_ids, mask_real, q_len, past_real, batch, device)

    out = orig(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
               inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, **{CACHE: past_key_values}, **kwargs)
    if stateless and isinstance(out, ModelOutput) and CACHE in out:
        out[CACHE] = None
    return out


def _position_ids(model, input_ids, mask_real, q_len, past_real, batch, device) -> torch.Tensor:
    # a class whose positions are not "count the attended tokens" declares how (Architecture.prefix_position_ids);
    # called on a first pass only
    special = architecture_of(model).prefix_position_ids
    if special is not None:
        if past_real:
            raise ValueError(
                f"method=ptuning: {type(model).__name__} needs explicit position_ids once tokens are cached "
                "(generate() passes them)"
            )
        if input_ids is None:
            raise ValueError(f"method=ptuning: {type(model).__name__} computes positions from input_ids")
        return special(model, input_ids, mask_real)
    return real_position_ids(mask_real, q_len, past_real, batch, device)


class _RealLengthView:
    """A cache seen without its prefix: ``get_seq_length()`` counts real tokens only."""

    def __init__(self, cache: Cache, prefix_len: int):
        self._cache, self._prefix_len = cache, prefix_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self._cache.get_seq_length(layer_idx) - self._prefix_len, 0)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


def _install_prepare_inputs(model: nn.Module) -> None:
    """Models with their own ``prepare_inputs_for_generation`` slice the new tokens by the cache length:
    show them a cache that does not count the prefix (GenerationMixin's own does not need this)."""
    from transformers import GenerationMixin

    own = getattr(type(model), "prepare_inputs_for_generation", None)
    if own is None or own is GenerationMixin.prepare_inputs_for_generation:
        return
    override_method(model, "prepare_inputs_for_generation", _prepare_inputs_for_generation)


def _prepare_inputs_for_generation(model, orig, input_ids, **kwargs):
    past_key_values = pop_cache(kwargs)
    if past_key_values is None or getattr(past_key_values, "stateless", False):
        return orig(input_ids, **{CACHE: past_key_values}, **kwargs)
    view = _RealLengthView(past_key_values, _encoder(model).pre_seq_len)
    inputs = orig(input_ids, **{CACHE: view}, **kwargs)
    return {k: (past_key_values if v is view else v) for k, v in inputs.items()}


# --------------------------------------------------------------------------- method API
def apply(model: nn.Module, cfg: Any, tokenizer: Any = None, *, embedding_dim: int | None = None) -> nn.Module:
    """Freeze ``model`` and give it a trainable prefix encoder (see the module docstring)."""
    if isinstance(getattr(model, ENCODER_ATTR, None), nn.Module):
        raise ValueError(f"method=ptuning is already applied to this {type(model).__name__}")
    num_layers, kv_heads, head_dim = model_dims(model)
    enc = PrefixEncoder(
        pre_seq_len=int(cfg_get(cfg, "pre_seq_len", DEFAULTS.pre_seq_len)),
        num_layers=num_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        prefix_projection=bool(cfg_get(cfg, "prefix_projection", DEFAULTS.prefix_projection)),
        prefix_hidden_size=int(cfg_get(cfg, "prefix_hidden_size", DEFAULTS.prefix_hidden_size) or DEFAULTS.prefix_hidden_size),
        prefix_dropout=float(cfg_get(cfg, "prefix_dropout", DEFAULTS.prefix_dropout)),
        embedding_dim=embedding_dim,
    )
    freeze_all(model)
    enc.to(input_embeddings(model).weight.device)  # kept in fp32 whatever the base dtype
    enc.train(model.training)
    model.add_module(ENCODER_ATTR, enc)
    _allow_cache_under_checkpointing(model)
    override_method(model, "forward", _forward)
    _install_prepare_inputs(model)
    return model


def save(model: nn.Module, out_dir: Path, cfg: Any = None) -> None:
    enc = _encoder(model)
    out_dir = Path(out_dir)
    save_safetensors(enc.state_dict(), out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    write_method_json(out_dir, NAME, enc.settings())


def load(model: nn.Module, in_dir: Path, cfg: Any = None) -> nn.Module:
    in_dir = Path(in_dir)
    saved = read_method_json(in_dir, NAME)["settings"]
    keys = ["pre_seq_len", "prefix_projection"]
    if saved.get("prefix_projection"):
        keys.append("prefix_hidden_size")
    check_settings(NAME, saved, cfg, keys, where=str(in_dir))
    _check_model_dims(model, saved, str(in_dir))
    settings = dict(saved)
    if cfg is not None and cfg_get(cfg, "prefix_dropout") is not None:
        settings["prefix_dropout"] = cfg_get(cfg, "prefix_dropout")
    apply(model, settings, embedding_dim=saved.get("embedding_dim"))
    _encoder(model).load_state_dict(load_safetensors(in_dir / WEIGHTS_FILE), strict=True)
    return model


def _check_model_dims(model: nn.Module, saved: dict, where: str) -> None:
    num_layers, kv_heads, head_dim = model_dims(model)
    have = {"num_layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim}
    diffs = [f"{k}: model {v}, checkpoint {saved[k]}" for k, v in have.items() if k in saved and saved[k] != v]
    if diffs:
        raise SettingError(f"method=ptuning: the prefix in {where} was trained for another model shape (" + "; ".join(diffs) + ")")


METHOD = register(
    Method(
        NAME, PtuningMethodConfig, apply, save, load,
        not_mergeable_because="P-Tuning v2 learns prefix key/values that every layer attends to as extra memory; they are "
        "inputs, not a change to any weight, so no plain checkpoint computes the same function",
        packable=False,  # one prefix per row: packed samples would share it
    )
)
