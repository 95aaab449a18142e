"""Chatting with a loaded run: generation settings, the history fitted to the model's positions, replies streamed as they are generated, the terminal loop (shared by ``chat`` and the web page)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from glm_experiments.errors import UserError

COMMANDS = "/reset clears the history, /exit ends"


def chat_generation_kwargs(eval_cfg, tokenizer, template, max_new_tokens: int | None = None, sample: bool = False,
                           temperature: float | None = None, top_p: float | None = None) -> dict:
    """The run's ``eval`` generation settings with a chat's overrides (one reply at a time: no beams)."""
    from omegaconf import OmegaConf

    from glm_experiments.recipe.evaluation import generation_kwargs

    cfg = OmegaConf.create(OmegaConf.to_container(eval_cfg, resolve=True))
    if max_new_tokens:
        cfg.max_new_tokens = max_new_tokens
    cfg.num_beams = 1
    cfg.do_sample = bool(sample)
    if temperature is not None:
        cfg.temperature = temperature
    if top_p is not None:
        cfg.top_p = top_p
    return generation_kwargs(cfg, tokenizer, template)


def model_max_length(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", 2048))


def fit_prompt(template, tokenizer, system: str | None, history: list[dict], query: str,
               budget: int) -> tuple[list[int], list[dict], int]:
    """Prompt ids for ``query`` after ``history`` within ``budget`` tokens: (ids, the history kept, turns dropped).
    The oldest turns go first; a query too long on its own keeps its end (and the template's head)."""
    dropped = 0
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = template.prompt(tokenizer, messages + [{"role": "user", "content": query}])
        if len(ids) <= budget or not history:
            break
        history = history[2:]  # one user + one assistant message
        dropped += 1
    if len(ids) > budget:
        head = template.prefix(tokenizer)
        ids = ids[: len(head)] + ids[len(ids) - (budget - len(head)):]
    return ids, history, dropped


def visible_reply(template, text: str) -> str | None:
    """The part of a partial reply to show: after the metadata line for ChatGLM3-style templates."""
    if not template.reply_starts_with_metadata_line:
        return text.lstrip()
    if "\n" not in text:
        return None
    return text.split("\n", 1)[1].lstrip()


def stream_reply(model, tokenizer, template, ids: list[int], gen_kwargs: dict, tentative: bool = False) -> Iterator[str]:
    """Generate the reply to prompt ``ids``, yielding the visible reply so far each time it changes; the last value
    yielded is the final reply (``template.clean_response``). Closing the generator early stops the generation.

    A ChatGLM3-style reply is shown from its second line (the first is metadata). ``tentative`` (for a page that
    can redraw, not a terminal): until that line ends, show the text as it comes, since a model that writes no
    metadata line would otherwise show nothing until it ends."""
    import torch
    from transformers import (
        StoppingCriteria,
        StoppingCriteriaList,
        TextIteratorStreamer,
    )

    stop = threading.Event()

    class _Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                model.generate(**inputs, **gen_kwargs, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Stopped()]))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text, shown = "", ""
    try:
        for piece in streamer:
            text += piece
            visible = visible_reply(template, text)
            if visible is None and tentative:
                visible = text.strip()
            if visible is not None and visible != shown:
                shown = visible
                yield shown
    finally:  # also when the consumer stops early (a closed page): the model stops at its next token
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    yield template.clean_response(text)


class ChatSession:
    """The history and one reply at a time; printing goes through ``console``."""

    def __init__(self, loaded, args, console):
        self.model, self.tokenizer, self.template = loaded.model, loaded.tokenizer, loaded.template
        self.console, self.stream = console, not args.no_stream
        self.gen_kwargs = chat_generation_kwargs(loaded.cfg.eval, self.tokenizer, self.template, args.max_new_tokens,
                                                 args.sample, args.temperature, args.top_p)
        self.max_length = args.max_length or model_max_length(self.model)
        self.system = args.system
        if self.system and not self.template.has_system_role:
            raise UserError(f"--system: the {self.template.name} template has no system role (ChatGLM3 / GLM-4 have one)")
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, query: str) -> str:
        budget = self.max_length - self.gen_kwargs["max_new_tokens"]
        ids, self.history, dropped = fit_prompt(self.template, self.tokenizer, self.system, self.history, query, budget)
        if dropped:
            self.console.print(f"[dim](history too long for {self.max_length} tokens: dropped the oldest {dropped} turn(s))[/dim]")
        self.console.print("[bold green]assistant>[/bold green] ", end="")
        shown = ""
        for text in stream_reply(self.model, self.tokenizer, self.template, ids, self.gen_kwargs):
            # the final reply (last) is cleaned: print only what extends the text shown so far
            if self.stream and text.startswith(shown) and len(text) > len(shown):
                self.console.print(text[len(shown):], end="", markup=False, highlight=False, soft_wrap=True)
                shown = text
        final = text
        if not self.stream:
            self.console.print(final, end="", markup=False, highlight=False, soft_wrap=True)
        self.console.print()
        self.history += [{"role": "user", "content": query}, {"role": "assistant", "content": final}]
        self.console.print(f"[dim]({len(ids)} prompt tokens, {len(self.history) // 2} turn(s) in history)[/dim]")
        return final


def chat_loop(session: ChatSession, console, read=None) -> int:
    read = read or (lambda: console.input("[bold cyan]you>[/bold cyan] "))
    turns = 0
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        query = line.strip()
        if not query:
            continue
        if query.lower() in ("/exit", "/quit"):
            break
        if query.lower() == "/reset":
            session.reset()
            console.print("[dim](history cleared)[/dim]")
            continue
        if query.startswith("/"):
            console.print(f"[yellow]unknown command {query.split()[0]}: {COMMANDS}[/yellow]")
            continue
        session.reply(query)
        turns += 1
    console.print("bye")
    return turns


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
