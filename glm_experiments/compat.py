"""One place for a transformers rename our code must follow in both directions.

transformers 5.24 renamed the KV-cache argument of ``forward`` / ``prepare_inputs_for_generation`` and
the output field ``past_key_values`` to ``cache`` (the old name is deprecated until 5.40): ``generate``
now passes ``cache=`` and reads ``outputs["cache"]``. The forward wrappers of ``ptuning`` and
``prompt_tuning`` and the ChatGLM-6B model accept either name and pass on the one the installed
version uses, so the project runs on 5.0-5.23 and on 5.24+.
"""

from __future__ import annotations

import dataclasses

from transformers.modeling_outputs import CausalLMOutputWithPast

#: the name of the KV cache in forward kwargs and model outputs, in the installed transformers
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def pop_cache(kwargs: dict, given=None):
    """The cache a caller passed under either name (``given``: an explicit parameter); both names are removed."""
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        if given is None:
            given = value
    return given


def silence_known_renames() -> None:
    """transformers 5 deprecated ``*gradient_checkpointing*`` for ``*activation_checkpointing*``; our code uses the
    new names, but peft still calls ``is_gradient_checkpointing`` on every ``get_peft_model`` (a FutureWarning per
    run, nothing for a user to do): filter exactly those messages, nothing else."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",
                            category=FutureWarning)
