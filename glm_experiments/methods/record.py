"""The contract every fine-tuning method declares (the `Method` record) and the registry of methods.

A method is one module ``glm_experiments.methods.<name>`` that ends with ``register(Method(...))``: the
record below says everything the rest of the project may ask of it. Every ability is a field with a
default, so a caller asks the record (``method.packable``, ``method.merge(model)``) and never probes a module
with ``hasattr`` or keeps a list of method names. The functions a module hands over:

    apply(model, cfg, tokenizer=None) -> model
        Make ``model`` trainable the method's way (freeze the base, add adapters / prefixes / soft
        prompts). ``cfg`` is the method config (``conf/method/<name>.yaml``; attribute access).
    save(model, out_dir: Path, cfg) -> None
        Write only the trainable part, plus ``method.json`` = {"method": name, "settings": {...}}.
    load(model, in_dir: Path, cfg=None) -> model
        Re-apply the method to a fresh base model and load the saved weights. With a ``cfg``,
        settings that change the saved tensors' meaning (pre_seq_len, r, ...) must equal the saved
        ones, otherwise a ValueError names both values. Without one, the saved settings are used.

Adding a method = its module (with its schema, registered here) + ``conf/method/<name>.yaml``; nothing else.

The code is generic over "a decoder-only ``PreTrainedModel`` whose config has num_hidden_layers,
num_key_value_heads and head_dim" (native ``GlmForCausalLM``, and any class with the same shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from torch import nn

from glm_experiments.errors import UserError


def _no_quantization(cfg: Any) -> None:
    return None


def _always_available() -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    """What one fine-tuning method is and can do; see the module docstring."""

    name: str
    schema: type  # its config dataclass; stored in Hydra's ConfigStore as method/base_<name>
    apply: Callable[..., nn.Module]
    save: Callable[..., None]
    load: Callable[..., nn.Module]
    # model (loaded by ``load`` onto an unquantised base) -> a plain model computing the same; None: not mergeable
    merge_into_base: Optional[Callable[[nn.Module], nn.Module]] = None
    not_mergeable_because: str = ""
    # train.packing=true puts several samples in one row: fine unless the method adds per-row virtual tokens
    packable: bool = True
    # cfg -> the quantization_config the base must be loaded with (QLoRA), or None
    quantization_config: Callable[[Any], Any] = _no_quantization
    # raises a UserError at once when this machine cannot run the method (QLoRA without CUDA)
    check_available: Callable[[], None] = _always_available
    # save() writes the whole model (full fine-tuning): under ZeRO-3 it is gathered as a full state dict
    saves_whole_model: bool = False

    def merge(self, model: nn.Module) -> nn.Module:
        if self.merge_into_base is None:
            raise UserError(f"method={self.name} cannot be merged into plain weights: {self.not_mergeable_because}")
        return self.merge_into_base(model)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known to ``get_method`` and its schema known to Hydra (``base_<name>`` in group method)."""
    from hydra.core.config_store import ConfigStore

    REGISTRY[method.name] = method
    ConfigStore.instance().store(group="method", name=f"base_{method.name}", node=method.schema)
    return method


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper (LoRA, DoRA, QLoRA) adapts, or ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model
