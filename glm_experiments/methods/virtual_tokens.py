"""The plumbing of methods that add virtual tokens (P-Tuning v2, prompt tuning): position ids of the real tokens, masks widened by the prefix, forwards overridden per instance."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


# ----------------------------------------------------------------------------- prefix plumbing
def real_position_ids(
    attention_mask: Optional[torch.Tensor],
    q_len: int,
    past_real_len: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Position ids of the ``q_len`` newest *real* tokens (learned prefixes not counted).

    With a 2D padding mask (covering past + new real tokens, no prefix) positions count only the
    attended tokens, so a left-padded sample gets the same positions as when it is alone (padding
    slots get 0, as ``generate`` does). Without a mask they continue from ``past_real_len``.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= q_len:
        mask = attention_mask.to(device=device, dtype=torch.long)
        pos = mask.cumsum(-1) - 1
        pos = pos.masked_fill(mask == 0, 0)
        return pos[:, -q_len:]
    pos = torch.arange(past_real_len, past_real_len + q_len, device=device, dtype=torch.long)
    return pos.unsqueeze(0).expand(batch_size, -1)


def extend_mask_left(attention_mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Prepend ``n`` attended positions (ones) to a 2D mask; 4D masks and None pass through."""
    if attention_mask is None or attention_mask.dim() != 2 or n == 0:
        return attention_mask
    ones = torch.ones(attention_mask.shape[0], n, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


def query_shape(input_ids, inputs_embeds, method: str) -> tuple[int, int, torch.device]:
    """(batch, query length, device) of a forward call given ids or embeddings (methods adding virtual tokens)."""
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError(f"method={method}: forward needs input_ids or inputs_embeds")
    return ref.shape[0], ref.shape[1], ref.device


def split_virtual_mask(
    attention_mask: Optional[torch.Tensor], past_real: int, q_len: int, n_virtual: int, method: str
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(mask over virtual + real positions, mask over the real ones only) from a 2D padding mask given
    either way (generate() passes one without the virtual positions, a caller may include them)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask, None
    real_len = past_real + q_len
    if attention_mask.shape[1] == real_len:
        return extend_mask_left(attention_mask, n_virtual), attention_mask
    if attention_mask.shape[1] == real_len + n_virtual:
        return attention_mask, attention_mask[:, n_virtual:]
    raise ValueError(
        f"method={method}: attention_mask has {attention_mask.shape[1]} columns; expected {real_len} "
        f"(past + new tokens) or {real_len + n_virtual} (with the {n_virtual} virtual positions)"
    )


# ----------------------------------------------------------------------------- instance overrides
def override_method(model: nn.Module, name: str, impl) -> None:
    """Install ``impl(self, original, *args, **kwargs)`` as ``model.<name>`` on this instance only.

    ``original`` is whatever ``model.<name>`` was before (an earlier instance override, else the
    class's method), bound to the model being called, so ``copy.deepcopy(model)`` gives a copy
    whose override works on the copy. ``inspect.signature(model.<name>)`` stays the original's
    (``generate`` and the Trainer read it).
    """
    import inspect
    import types

    previous_key = f"_glm_experiments_previous_{name}"
    previous = model.__dict__.get(name)
    object.__setattr__(model, previous_key, previous)

    def method(self, *args, **kwargs):
        prev = self.__dict__.get(previous_key)
        original = prev if prev is not None else types.MethodType(getattr(type(self), name), self)
        return impl(self, original, *args, **kwargs)

    if previous is not None:
        params = list(inspect.signature(previous).parameters.values())
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        method.__signature__ = inspect.Signature([self_param, *params])
    else:
        method.__signature__ = inspect.signature(getattr(type(model), name))
    original_func = getattr(type(model), name)
    method.__name__ = getattr(original_func, "__name__", name)
    method.__doc__ = getattr(original_func, "__doc__", None)
    object.__setattr__(model, name, types.MethodType(method, model))
