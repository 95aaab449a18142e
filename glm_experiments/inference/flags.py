"""The command-line flags of predict, chat and web range-checked as the config is (config/schema.py): a device
that exists on this machine, token counts > 0 and within the model's positions, temperature > 0, 0 < top-p <= 1.
Each failure is a UserError (one ``error:`` line, exit 2) raised before any weight loads."""

from __future__ import annotations

from typing import Any

from glm_experiments.errors import UserError


def check_device(device: str | None, flag: str = "--device") -> None:
    """``device`` is one torch can use here (None: the default, cuda if available)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {device}: not a device; use cpu, cuda or cuda:<index>") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible"
            raise UserError(f"{flag} {device}: CUDA is not available on this machine ({build}); use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"{flag} {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return
    raise UserError(f"{flag} {device}: not available on this machine; use cpu or cuda")


def check_positive(args: Any, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def check_sampling(temperature: float | None, top_p: float | None) -> None:
    if temperature is not None and not temperature > 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def check_generation_length(model_cfg, max_new_tokens: int | None, prompt_tokens: int = 0,
                            max_length: int | None = None) -> None:
    """``prompt_tokens`` + ``max_new_tokens`` (and ``--max-length``) within the model's positions (its config alone)."""
    from glm_experiments.models.loading import max_positions

    limit, where = max_positions(model_cfg)
    if max_length is not None and max_length > limit:
        raise UserError(f"--max-length {max_length} exceeds the model's {limit} positions ({where})")
    budget = max_length if max_length is not None else limit
    # without a known prompt length, at least one position is left for the prompt
    if max_new_tokens is not None and prompt_tokens + max_new_tokens > budget - (0 if prompt_tokens else 1):
        what = f"data.max_source_length {prompt_tokens} + " if prompt_tokens else ""
        within = f"--max-length {max_length}" if max_length is not None else f"the model's {limit} positions ({where})"
        raise UserError(f"--max-new-tokens {max_new_tokens}: {what}{max_new_tokens} exceeds {within}"
                        f"{'; leave room for the prompt' if not prompt_tokens else ''}")
