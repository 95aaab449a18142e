"""Data readers and validation (glm_experiments/data/formats.py) and the shipped demo sets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from glm_experiments.data.formats import (
    TOOL_DEFINITION_PREFIX,
    DataError,
    LoadReport,
    format_tool_call,
    load_samples,
)

ROOT = Path(__file__).resolve().parents[2]


def cfg(fmt: str, **overrides) -> SimpleNamespace:
    base = dict(format=fmt, prompt_column="content", response_column="summary", history_column=None, on_error="raise")
    return SimpleNamespace(**{**base, **overrides})


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def write_array(path: Path, records: list) -> Path:
    """Pretty-printed array: each element spans several lines, so element start lines are non-trivial."""
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def element_lines(path: Path) -> list[int]:
    # json.dumps(indent=2): every top-level element starts with "  {" on its own line
    return [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.startswith("  {")]


def errors_of(path: Path, config) -> list[str]:
    with pytest.raises(DataError) as info:
        load_samples(path, config)
    return info.value.errors


# ---------------------------------------------------------------------------------- adgen
ADGEN = [
    {"content": "类型#上衣*颜色#白色", "summary": "白色上衣。", "history": [["你好", "你好！"], ["在吗", "在的"]]},
    {"content": "类型#裙", "summary": "一条裙子。", "history": []},
]


@pytest.mark.parametrize("writer", [write_lines, write_array])
def test_adgen_reads_exact_messages(tmp_path, writer):
    path = writer(tmp_path / "a.json", ADGEN)
    samples, report = load_samples(path, cfg("adgen"))
    assert [s.messages for s in samples] == [
        [{"role": "user", "content": "类型#上衣*颜色#白色"}, {"role": "assistant", "content": "白色上衣。"}],
        [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "一条裙子。"}],
    ]
    assert all(s.tools is None for s in samples)
    lines = [1, 2] if writer is write_lines else element_lines(path)
    assert [s.source for s in samples] == [f"{path}:{n}" for n in lines]
    assert (report.records, report.skipped, report.errors, report.loaded) == (2, 0, [], 2)
    assert samples[0].response == "白色上衣。" and samples[0].prompt_messages == samples[0].messages[:1]


def test_adgen_history_and_custom_columns(tmp_path):
    records = [{"q": "第三问", "a": "第三答", "h": [["第一问", "第一答"], ["第二问", "第二答"]]}]
    path = write_lines(tmp_path / "a.jsonl", records)
    samples, _ = load_samples(path, cfg("adgen", prompt_column="q", response_column="a", history_column="h"))
    assert samples[0].messages == [
        {"role": "user", "content": "第一问"}, {"role": "assistant", "content": "第一答"},
        {"role": "user", "content": "第二问"}, {"role": "assistant", "content": "第二答"},
        {"role": "user", "content": "第三问"}, {"role": "assistant", "content": "第三答"},
    ]


def test_adgen_bad_records_each_reported_with_line(tmp_path):
    path = write_lines(tmp_path / "bad.json", [
        {"content": "ok", "summary": "ok", "history": []},                 # 1 fine
        '{"content": "x", "summary": "y"',                                 # 2 malformed JSON
        {"content": "x", "title": "t", "history": []},                      # 3 missing summary
        {"content": 5, "summary": "y", "history": []},                      # 4 non-string content
        {"content": "x", "summary": "  ", "history": []},                   # 5 empty response
        {"content": "", "summary": "y", "history": []},                     # 6 empty prompt
        {"content": "x", "summary": "y", "history": [["q1"]]},              # 7 two user turns in a row
        {"content": "x", "summary": "y", "history": [["q1", ""]]},          # 8 two user turns in a row
        {"content": "x", "summary": "y", "history": "q1"},                  # 9 history not a list
        ["content", "summary"],                                             # 10 not an object
    ])
    errors = errors_of(path, cfg("adgen", history_column="history"))
    p = str(path)
    assert len(errors) == 9
    assert errors[0] == f"{p}:2: malformed JSON: Expecting ',' delimiter (column 32)"
    assert errors[1] == f"{p}:3: missing column 'summary' (columns: content, title, history)"
    assert errors[2] == f"{p}:4: column 'content' is not a string (got int)"
    assert errors[3] == f"{p}:5: empty response (column 'summary')"
    assert errors[4] == f"{p}:6: empty prompt (column 'content')"
    assert errors[5] == f"{p}:7: history[0] has a query but no response: two user turns in a row"
    assert errors[6] == f"{p}:8: history[0] has an empty response: two user turns in a row"
    assert errors[7] == f"{p}:9: column 'history' is not a list of [query, response] pairs (got string)"
    assert errors[8] == f"{p}:10: record is a JSON list, expected an object"


def test_raise_message_lists_every_error_capped_at_20(tmp_path):
    path = write_lines(tmp_path / "many.json", [{"content": "x"}] * 25 + [{"content": "x", "summary": "y"}])
    with pytest.raises(DataError) as info:
        load_samples(path, cfg("adgen"))
    message = str(info.value)
    assert len(info.value.errors) == 25
    assert message.startswith(f"25 bad record(s) of 26 in {path}")
    assert f"{path}:20: missing column 'summary' (columns: content)" in message
    assert f"{path}:21:" not in message
    assert message.rstrip().endswith("... and 5 more")


def test_skip_mode_drops_and_counts(tmp_path, caplog):
    path = write_lines(tmp_path / "mixed.json", [
        {"content": "a", "summary": "b"},
        "not json",
        {"content": "a"},
        {"content": "c", "summary": "d"},
    ])
    samples, report = load_samples(path, cfg("adgen", on_error="skip"))
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:4"]
    assert isinstance(report, LoadReport)
    assert (report.records, report.skipped, report.loaded) == (4, 2, 2)
    assert [e.split(": ", 1)[0] for e in report.errors] == [f"{path}:2", f"{path}:3"]
    assert "skipping 2 bad record(s)" in caplog.text
    assert "2 bad records skipped" in report.summary()


def test_skip_mode_with_nothing_left_raises(tmp_path):
    path = write_lines(tmp_path / "allbad.json", [{"content": "a"}, {"content": "b"}])
    with pytest.raises(DataError, match="no usable records .*all 2 records are bad"):
        load_samples(path, cfg("adgen", on_error="skip"))


# ---------------------------------------------------------------------------- instruction
@pytest.mark.parametrize("writer", [write_lines, write_array])
def test_instruction_reads_exact_messages(tmp_path, writer):
    records = [
        {"instruction": "抽取三元组。文本：", "input": "张三出生于北京。", "output": "张三_出生地_北京"},
        {"instruction": "讲个笑话", "input": "", "output": "好的。"},
        {"instruction": "讲个笑话", "output": "好的。"},
    ]
    path = writer(tmp_path / "i.json", records)
    samples, report = load_samples(path, cfg("instruction"))
    assert [s.messages for s in samples] == [
        [{"role": "user", "content": "抽取三元组。文本：\n张三出生于北京。"}, {"role": "assistant", "content": "张三_出生地_北京"}],
        [{"role": "user", "content": "讲个笑话"}, {"role": "assistant", "content": "好的。"}],
        [{"role": "user", "content": "讲个笑话"}, {"role": "assistant", "content": "好的。"}],
    ]
    assert report.records == 3


def test_instruction_bad_records(tmp_path):
    records = [
        {"instruction": "i", "input": "x", "output": ""},
        {"instruction": "", "input": "", "output": "o"},
        {"instruction": "i", "input": ["x"], "output": "o"},
        {"instruction": "i", "input": "x"},
    ]
    path = write_array(tmp_path / "i.json", records)
    lines = element_lines(path)
    p = str(path)
    assert errors_of(path, cfg("instruction")) == [
        f"{p}:{lines[0]}: empty response (column 'output')",
        f"{p}:{lines[1]}: empty prompt (columns 'instruction' and 'input')",
        f"{p}:{lines[2]}: column 'input' is not a string (got list)",
        f"{p}:{lines[3]}: missing column 'output' (columns: instruction, input)",
    ]


# -------------------------------------------------------------------------- conversations
TOOLS = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": "城市"}}]
CONVERSATION_WITH_TOOL = {
    "tools": TOOLS,
    "conversations": [
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": "我来查一下。", "loss": False},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京", "days": 1}, "observation": {"天气": "晴"}},
        {"role": "assistant", "content": "北京今天晴。"},
    ],
}


@pytest.mark.parametrize("writer", [write_lines, write_array])
def test_conversations_read_exact_messages(tmp_path, writer):
    plain = {"conversations": [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "再见"},
        {"role": "assistant", "content": "再见！", "loss": True},
    ]}
    path = writer(tmp_path / "c.json", [plain, CONVERSATION_WITH_TOOL])
    samples, report = load_samples(path, cfg("conversations"))
    assert samples[0].messages == [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "再见"},
        {"role": "assistant", "content": "再见！", "loss": True},
    ]
    assert samples[0].tools is None
    assert samples[1].tools == TOOLS
    assert samples[1].messages == [
        {"role": "system", "content": TOOL_DEFINITION_PREFIX + json.dumps(TOOLS, ensure_ascii=False)},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": "我来查一下。", "loss": False},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京', days=1)\n```"},
        {"role": "observation", "content": '{"天气": "晴"}', "loss": False},
        {"role": "assistant", "content": "北京今天晴。"},
    ]
    assert report.records == 2


def test_tools_go_into_an_existing_system_message_and_observation_may_be_a_message(tmp_path):
    record = {"tools": TOOLS, "conversations": [
        {"role": "system", "content": "你是天气助手。"},
        {"role": "user", "content": "上海呢？"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "上海"}, "loss": False},
        {"role": "observation", "content": "多云"},
        {"role": "assistant", "content": "上海多云。"},
    ]}
    samples, _ = load_samples(write_lines(tmp_path / "c.json", [record]), cfg("conversations"))
    assert samples[0].messages == [
        {"role": "system", "content": "你是天气助手。\n" + json.dumps(TOOLS, ensure_ascii=False)},
        {"role": "user", "content": "上海呢？"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='上海')\n```", "loss": False},
        {"role": "observation", "content": "多云"},
        {"role": "assistant", "content": "上海多云。"},
    ]


def test_format_tool_call_matches_chatglm3():
    assert format_tool_call({"symbol": "10111", "n": 3, "flag": True}) == (
        "```python\ntool_call(symbol='10111', n=3, flag=True)\n```"
    )


def test_conversations_bad_records(tmp_path):
    def conv(*messages, **extra):
        return {"conversations": list(messages), **extra}

    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}
    records = [
        conv(a, u, a),                                                     # 1 assistant first
        conv(u, u, a),                                                     # 2 two user turns
        conv(u, {"role": "system", "content": "s"}, a),                    # 3 system not first
        conv(u, {"role": "bot", "content": "r"}),                          # 4 unknown role
        conv(u, {"role": "assistant", "content": ["r"]}),                  # 5 non-string content
        conv(u, {"role": "assistant", "content": " "}),                    # 6 empty response
        conv({"role": "user", "content": ""}, a),                          # 7 empty prompt
        conv(u, a, u),                                                     # 8 ends with user
        {"messages": [u, a]},                                              # 9 missing column
        conv(u, {"role": "tool", "name": "f", "parameters": {}}, a),       # 10 tool without observation
        conv(u, {"role": "observation", "content": "o"}, a),               # 11 observation without call
        conv(u, a, tools={"name": "f"}),                                   # 12 tools not a list
        conv(u, {"role": "tool", "name": "f", "parameters": "x=1", "observation": 1}, a),  # 13 bad parameters
        conv(u, {"role": "assistant", "content": "r", "loss": "no"}),      # 14 bad loss flag
        conv(u, {"role": "assistant"}),                                    # 15 missing content
        conv(u, a),                                                        # 16 fine
    ]
    path = write_lines(tmp_path / "c.json", records)
    errors = errors_of(path, cfg("conversations"))
    p = str(path)
    assert errors == [
        f"{p}:1: message 0: assistant message before any user message",
        f"{p}:2: message 1: two user turns in a row",
        f"{p}:3: message 1: system message not first (only one, at the start, is allowed)",
        f"{p}:4: message 1: unknown role 'bot' (known: system, user, assistant, tool, observation)",
        f"{p}:5: message 1 (assistant): content is not a string (got list)",
        f"{p}:6: message 1: empty response (final assistant content)",
        f"{p}:7: message 0: empty prompt (user content)",
        f"{p}:8: conversation must end with an assistant reply (ends with 'user')",
        f"{p}:9: missing column 'conversations' (columns: messages)",
        f"{p}:10: message 1: tool call has no observation (next is 'assistant')",
        f"{p}:11: message 1: observation without a tool call before it",
        f"{p}:12: column 'tools' is not a list (got object)",
        f"{p}:13: message 1: tool message needs 'parameters' as an object (got string)",
        f"{p}:14: message 1: 'loss' must be true or false (got string)",
        f"{p}:15: message 1 (assistant): missing 'content' (keys: role)",
    ]


# ---------------------------------------------------------------------------- file level
def test_array_line_numbers_and_malformed_array(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"content": "a", "summary": "b"},\n\n  {"content": "c",\n   "summary": "d"}\n]\n', encoding="utf-8")
    samples, _ = load_samples(path, cfg("adgen"))
    assert [s.source for s in samples] == [f"{path}:2", f"{path}:4"]

    path.write_text('[\n  {"content": "a", "summary": "b"},\n  {"content": "c" "summary": "d"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_samples(path, cfg("adgen", on_error="skip"))  # the rest of an array cannot be located: always fatal
    assert info.value.errors == [f"{path}:3: malformed JSON: Expecting ',' delimiter (column 19)"]
    assert str(info.value).startswith(f"cannot read {path}")

    path.write_text('[\n  {"content": "a", "summary": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="not closed"):
        load_samples(path, cfg("adgen"))


def test_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data file not found: nope/train\.json \(cwd "):
        load_samples("nope/train.json", cfg("adgen"))
    with pytest.raises(DataError, match="data file not found: /nonexistent/x.json"):
        load_samples("/nonexistent/x.json", cfg("adgen"))


def test_relative_path_falls_back_to_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the project root: found through the project root
    samples, report = load_samples("data/spo_demo/dev.json", cfg("instruction"))
    assert report.records == len(samples) == 100
    assert samples[0].source == "data/spo_demo/dev.json:2"


def test_unknown_format_and_on_error(tmp_path):
    path = write_lines(tmp_path / "a.json", [{"content": "a", "summary": "b"}])
    with pytest.raises(DataError, match="unknown data format 'alpaca'"):
        load_samples(path, cfg("alpaca"))
    with pytest.raises(DataError, match="unknown data.on_error 'ignore'"):
        load_samples(path, cfg("adgen", on_error="ignore"))


def test_accepts_the_structured_data_config(tmp_path):
    from omegaconf import OmegaConf

    from glm_experiments.config.schema import DataConfig

    data_cfg = OmegaConf.structured(DataConfig(name="x", format="adgen", train_file="a.json"))
    samples, _ = load_samples(write_lines(tmp_path / "a.json", [{"content": "a", "summary": "b"}]), data_cfg)
    assert len(samples) == 1


# ------------------------------------------------------------------------------ demo sets
DEMO_SETS = {"adgen_demo": "adgen", "conversations_demo": "conversations", "spo_demo": "instruction",
             "history_demo": "conversations"}


@pytest.mark.parametrize("name", sorted(DEMO_SETS))
def test_shipped_demo_sets_load_cleanly(name):
    for split in ("train", "dev"):
        samples, report = load_samples(ROOT / "data" / name / f"{split}.json", cfg(DEMO_SETS[name]))
        assert report.errors == [] and report.skipped == 0 and len(samples) == report.records > 0


def test_demo_sets_have_the_promised_content():
    conv, _ = load_samples(ROOT / "data/conversations_demo/train.json", cfg("conversations"))
    assert 900 <= len(conv) <= 1100
    assert sum(s.tools is not None for s in conv) >= 100
    assert any(m.get("metadata") for s in conv for m in s.messages)
    assert any(m["role"] == "observation" for s in conv for m in s.messages)
    assert sum(s.messages[0]["role"] == "system" for s in conv) >= 100
    assert sum(sum(m["role"] == "user" for m in s.messages) > 1 for s in conv) >= 100
    spo, _ = load_samples(ROOT / "data/spo_demo/train.json", cfg("instruction"))
    relations = {line.split("_")[1] for s in spo for line in s.response.splitlines()}
    assert {"出生地", "创始人", "总部"} <= relations
    assert all(len(line.split("_")) == 3 for s in spo for line in s.response.splitlines())
    for split in ("train", "dev"):  # small
        for name in ("conversations_demo", "spo_demo"):
            assert (ROOT / "data" / name / f"{split}.json").stat().st_size < 700_000


def test_demo_generator_reproduces_shipped_files(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    for name in DEMO_SETS:
        for split in ("train", "dev"):
            shipped = (ROOT / "data" / name / f"{split}.json").read_bytes()
            assert (tmp_path / name / f"{split}.json").read_bytes() == shipped, f"{name}/{split}.json differs"
