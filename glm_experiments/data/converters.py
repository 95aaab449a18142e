"""One record of each data format -> its messages (see formats.py for the formats and ChatGLM3's tool-call
conventions); a bad record raises :class:`BadRecord` with the reason, which formats.py prefixes with file:line."""

from __future__ import annotations

import ast
import json
from typing import Any

# ChatGLM3 finetune_demo/preprocess_utils.py
TOOL_DEFINITION_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"
FUNCTION_CALL_NAME = "tool_call"
FUNCTION_CALL_PREFIX = "```python\n"
FUNCTION_CALL_POSTFIX = "\n```"

CONVERSATION_ROLES = ("system", "user", "assistant", "tool", "observation")


class BadRecord(Exception):
    """One record's problem (becomes ``path:line: reason``)."""


# ----------------------------------------------------------------------------- converters
def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _columns(record: dict) -> str:
    return ", ".join(record) if record else "none"


def check_unicode(record: Any) -> None:
    """A ``\\ud83d`` escape without its pair parses as JSON but is not text: the tokenizer would fail later."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRecord(f"lone surrogate {err.object[err.start]!r} (a \\u escape without its pair): not valid Unicode text") from None


def _require_object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise BadRecord(f"record is a JSON {_type_name(record)}, expected an object")
    return record


def _string_column(record: dict, column: str) -> str:
    if column not in record:
        raise BadRecord(f"missing column {column!r} (columns: {_columns(record)})")
    value = record[column]
    if not isinstance(value, str):
        raise BadRecord(f"column {column!r} is not a string (got {_type_name(value)})")
    return value


def _history_messages(record: dict, column: str) -> list[dict]:
    if column not in record:
        raise BadRecord(f"missing column {column!r} (columns: {_columns(record)})")
    history = record[column]
    if history is None:
        return []
    if not isinstance(history, list):
        raise BadRecord(f"column {column!r} is not a list of [query, response] pairs (got {_type_name(history)})")
    messages = []
    for i, pair in enumerate(history):
        where = f"{column}[{i}]"
        if not isinstance(pair, (list, tuple)):
            raise BadRecord(f"{where} is not a [query, response] pair (got {_type_name(pair)})")
        if len(pair) == 1:
            raise BadRecord(f"{where} has a query but no response: two user turns in a row")
        if len(pair) != 2:
            raise BadRecord(f"{where} has {len(pair)} items, expected [query, response]")
        query, response = pair
        for name, value in (("query", query), ("response", response)):
            if not isinstance(value, str):
                raise BadRecord(f"{where} {name} is not a string (got {_type_name(value)})")
        if not query.strip():
            raise BadRecord(f"{where}: empty prompt")
        if not response.strip():
            raise BadRecord(f"{where} has an empty response: two user turns in a row")
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return messages


def _convert_adgen(record: Any, cfg) -> tuple[list[dict], None]:
    record = _require_object(record)
    prompt = _string_column(record, cfg.prompt_column)
    response = _string_column(record, cfg.response_column)
    history_column = getattr(cfg, "history_column", None)
    messages = _history_messages(record, history_column) if history_column else []
    if not prompt.strip():
        raise BadRecord(f"empty prompt (column {cfg.prompt_column!r})")
    if not response.strip():
        raise BadRecord(f"empty response (column {cfg.response_column!r})")
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], None


def _convert_instruction(record: Any, cfg) -> tuple[list[dict], None]:
    record = _require_object(record)
    instruction = _string_column(record, "instruction")
    if record.get("input") is None:
        user_input = ""
    elif isinstance(record["input"], str):
        user_input = record["input"]
    else:
        raise BadRecord(f"column 'input' is not a string (got {_type_name(record['input'])})")
    output = _string_column(record, "output")
    history_column = getattr(cfg, "history_column", None)
    messages = _history_messages(record, history_column) if history_column else []
    prompt = f"{instruction}\n{user_input}" if user_input else instruction
    if not prompt.strip():
        raise BadRecord("empty prompt (columns 'instruction' and 'input')")
    if not output.strip():
        raise BadRecord("empty response (column 'output')")
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], None


def format_tool_call(parameters: dict) -> str:
    """``tool_call(key='value', ...)`` in a Python code block, as ChatGLM3 writes (and is trained on)."""
    keywords = [ast.keyword(arg=str(k), value=ast.Constant(v)) for k, v in parameters.items()]
    call = ast.Call(func=ast.Name(id=FUNCTION_CALL_NAME), args=[], keywords=keywords)
    return FUNCTION_CALL_PREFIX + ast.unparse(call) + FUNCTION_CALL_POSTFIX


def _loss_flag(message: dict, index: int) -> dict:
    if "loss" not in message:
        return {}
    if not isinstance(message["loss"], bool):
        raise BadRecord(f"message {index}: 'loss' must be true or false (got {_type_name(message['loss'])})")
    return {"loss": message["loss"]}


def _convert_conversations(record: Any, cfg) -> tuple[list[dict], list | None]:
    record = _require_object(record)
    if "conversations" not in record:
        raise BadRecord(f"missing column 'conversations' (columns: {_columns(record)})")
    conversation = record["conversations"]
    if not isinstance(conversation, list):
        raise BadRecord(f"column 'conversations' is not a list of messages (got {_type_name(conversation)})")
    if not conversation:
        raise BadRecord("empty conversation")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRecord(f"column 'tools' is not a list (got {_type_name(tools)})")

    messages: list[dict] = []
    pending_tool = None  # index of a tool call still waiting for its observation message
    seen_user = False
    for i, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise BadRecord(f"message {i} is a JSON {_type_name(message)}, expected an object")
        role = message.get("role")
        if role not in CONVERSATION_ROLES:
            raise BadRecord(f"message {i}: unknown role {role!r} (known: {', '.join(CONVERSATION_ROLES)})")
        if pending_tool is not None and role != "observation":
            raise BadRecord(f"message {pending_tool}: tool call has no observation (next is {role!r})")
        loss = _loss_flag(message, i)
        if role == "tool":
            name = message.get("name")
            if not isinstance(name, str) or not name.strip():
                raise BadRecord(f"message {i}: tool message needs a 'name' string (got {_type_name(name)})")
            parameters = message.get("parameters")
            if not isinstance(parameters, dict):
                raise BadRecord(f"message {i}: tool message needs 'parameters' as an object (got {_type_name(parameters)})")
            if not seen_user:
                raise BadRecord(f"message {i}: tool call before any user message")
            messages.append({"role": "assistant", "metadata": name, "content": format_tool_call(parameters), **loss})
            if "observation" in message:
                observation = message["observation"]
                if not isinstance(observation, str):
                    observation = json.dumps(observation, ensure_ascii=False)
                messages.append({"role": "observation", "content": observation, "loss": False})
            else:
                pending_tool = i
            continue
        content = message.get("content")
        if "content" not in message:
            raise BadRecord(f"message {i} ({role}): missing 'content' (keys: {_columns(message)})")
        if not isinstance(content, str):
            raise BadRecord(f"message {i} ({role}): content is not a string (got {_type_name(content)})")
        metadata = message.get("metadata")
        if metadata is not None and not isinstance(metadata, str):
            raise BadRecord(f"message {i} ({role}): metadata is not a string (got {_type_name(metadata)})")
        previous = messages[-1]["role"] if messages else None
        if role == "system":
            if messages:
                raise BadRecord(f"message {i}: system message not first (only one, at the start, is allowed)")
        elif role == "user":
            if not content.strip():
                raise BadRecord(f"message {i}: empty prompt (user content)")
            if previous == "user":
                raise BadRecord(f"message {i}: two user turns in a row")
            seen_user = True
        elif role == "assistant":
            if not seen_user:
                raise BadRecord(f"message {i}: assistant message before any user message")
        elif role == "observation":
            if pending_tool is None and not (messages and messages[-1]["role"] == "assistant" and messages[-1].get("metadata")):
                raise BadRecord(f"message {i}: observation without a tool call before it")
            pending_tool = None
        out = {"role": role, "content": content}
        if metadata:
            if role == "assistant":  # a function call: its arguments must parse, or the model learns broken calls
                _check_call_arguments(content, i, metadata)
            out["metadata"] = metadata
        messages.append({**out, **loss})
    if pending_tool is not None:
        raise BadRecord(f"message {pending_tool}: tool call has no observation")
    last = messages[-1]
    if last["role"] != "assistant" or last.get("metadata"):
        raise BadRecord(f"conversation must end with an assistant reply (ends with {last['role']!r}"
                   + (" tool call)" if last.get("metadata") else ")"))
    if not last["content"].strip():
        raise BadRecord(f"message {len(conversation) - 1}: empty response (final assistant content)")

    if tools is not None:
        dumped = json.dumps(tools, ensure_ascii=False)
        if messages[0]["role"] == "system":
            system = messages[0]
            messages[0] = {**system, "content": f"{system['content']}\n{dumped}" if system["content"] else dumped}
        else:
            messages.insert(0, {"role": "system", "content": TOOL_DEFINITION_PREFIX + dumped})
    return messages, tools


def _check_call_arguments(content: str, index: int, name: str) -> None:
    """GLM-4 writes a call's arguments as JSON, ChatGLM3 as ``tool_call(key=literal, ...)`` in a Python block."""
    text = content.strip()
    if text.startswith(FUNCTION_CALL_PREFIX + FUNCTION_CALL_NAME + "("):
        code = text[len(FUNCTION_CALL_PREFIX):].removesuffix(FUNCTION_CALL_POSTFIX.strip()).strip()
        try:
            call = ast.parse(code, mode="eval").body
            for keyword in call.keywords:
                ast.literal_eval(keyword.value)
            if call.args:
                raise ValueError("positional arguments")
        except (SyntaxError, ValueError, AttributeError) as err:
            raise BadRecord(f"message {index}: the call of {name!r} is not tool_call(key=literal, ...) ({type(err).__name__})") from None
        return
    if text.startswith("```"):
        return  # other code (ChatGLM3's code interpreter): not a call with arguments
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord(f"message {index}: the arguments of the call of {name!r} are not JSON ({err.msg}, column {err.colno})") from None


CONVERTERS = {
    "adgen": _convert_adgen,
    "conversations": _convert_conversations,
    "instruction": _convert_instruction,
}


