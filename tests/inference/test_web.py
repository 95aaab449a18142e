"""The web page (python -m glm_experiments.web) in a real browser: Debian's headless Chromium driven by playwright
(the system browser, nothing downloaded), against two tiny LoRA runs of one sweep.

What is checked is what a person sees and what is written: chat replies grow on the page while they are generated
and equal the model's own greedy reply (history and system prompt in the run's template); a blind session of 4
prompts writes 4 verdicts whose left/right runs are the runs that wrote the replies shown there; the human_eval
MLflow run holds the tally; a server killed with SIGKILL and started again resumes at prompt 5.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.helpers.common import checkout_env, run_cli
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
QUERY = "类型#裙*颜色#黑色"


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason is None and executable is None:
        reason = "no chromium executable on PATH or at /usr/bin/chromium (apt-get install -y chromium)"
    if reason:
        print(f"\nbrowser tests skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny LoRA runs of one sweep on conversations_demo (3 steps at two learning rates: they write different
    replies) tracked in a temporary store: (run dirs, tracking URI)."""
    tmp = tmp_path_factory.mktemp("web")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [
        "method=lora",
        "data=conversations_demo",  # the conversations format: Compare can take history_demo's long chats
        "train.max_steps=3",
        "train.per_device_train_batch_size=4",
        "train.learning_rate=5e-3,3e-2",
        "train.logging_steps=1",
        "data.max_train_samples=16",
        "eval.max_samples=2",
        "eval.max_new_tokens=8",
        "eval.before_training=false",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment_name=web",
        f"hydra.sweep.dir={tmp / 'sweep'}",
    ]
    result = run_cli(["--multirun", *overrides], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp / "sweep").glob("*/result.json"))
    assert len(runs) == 2, runs
    return runs, uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def greedy_reply(loaded, ids: list[int], max_new_tokens: int) -> str:
    """The reply by plain ``model.generate`` (not the page's streaming code): what the page must show."""
    out = loaded.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=loaded.template.stop_ids(loaded.tokenizer),
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return loaded.template.clean_response(loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


# ------------------------------------------------------------------------------------------------ chat
RECORD_BOT_TEXT = """() => {
  window.__seen = [];
  const box = document.querySelector('#chat-box');
  new MutationObserver(() => {
    const bots = box.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    const seen = window.__seen;
    if (text && (!seen.length || seen[seen.length - 1].text !== text)) seen.push({text, t: performance.now()});
  }).observe(box, {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.browser
def test_chat_streams_in_the_run_template(browser, sweep, tmp_path):  # browser first: a skip trains nothing
    from playwright.sync_api import expect

    from glm_experiments.web import parse_args
    from glm_experiments.inference.web_page import build_page, serve
    from glm_experiments.inference.engines import find_engines, load_engines

    runs, _ = sweep
    engines = find_engines(parse_args(["--run", str(runs[0]), "--run", str(runs[1])]))
    load_engines(engines, "cpu", say=lambda _: None)
    loaded = engines[0].loaded
    template, tokenizer = loaded.template, loaded.tokenizer
    system = "你是一个广告文案助手"
    turn1 = [{"role": "user", "content": QUERY}]
    expected1 = greedy_reply(loaded, template.prompt(tokenizer, turn1), 24)
    turn2 = turn1 + [{"role": "assistant", "content": expected1}, {"role": "user", "content": "再写一句"}]
    expected2 = greedy_reply(loaded, template.prompt(tokenizer, turn2), 24)
    with_system = [{"role": "system", "content": system}] + turn1
    expected3 = greedy_reply(loaded, template.prompt(tokenizer, with_system), 24)
    assert len(tokenizer.encode(expected1, add_special_tokens=False)) > 8, "long enough to need the 24-token setting"

    # a 6B model takes tens of ms per token; the tiny one takes ~1 ms, too fast to see anything arrive in pieces
    embedding = loaded.model.get_input_embeddings()
    slow = embedding.register_forward_hook(lambda *_: time.sleep(0.03))
    page = build_page(engines, None)
    url = serve(page, "127.0.0.1", free_port(), block=False, say=lambda _: None)
    try:
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.goto(url)
        tab.get_by_text("generation settings").click()
        max_new = tab.locator("#chat-max-new input[type=number]")
        max_new.fill("24")
        max_new.press("Tab")
        # the slider took it (its range input follows the number box): a message sent earlier would get 8 tokens
        expect(tab.locator("#chat-max-new input[type=range]")).to_have_value("24")
        tab.evaluate(RECORD_BOT_TEXT)

        def send(text: str, turns: int) -> str:
            tab.fill("#chat-input textarea", text)
            tab.keyboard.press("Enter")
            tab.wait_for_function(
                f"document.querySelector('#chat-note').innerText.includes('{turns} turn(s)')", timeout=60_000
            )
            return tab.locator('#chat-box [data-testid="bot"]').last.inner_text().strip()

        assert send(QUERY, 1) == expected1
        seen = tab.evaluate("window.__seen")
        texts = [s["text"] for s in seen]
        assert len(texts) >= 4, f"the reply arrived in {len(texts)} piece(s): {texts}"
        assert texts[-1] == expected1
        for shorter, longer in itertools.pairwise(texts):
            assert longer.startswith(shorter) and len(longer) > len(shorter), texts
        assert seen[-1]["t"] - seen[0]["t"] > 100, "pieces spread over the generation, not one burst at the end"

        # turn 2 sees turn 1 (the run's template renders the history)
        assert send("再写一句", 2) == expected2
        note = tab.inner_text("#chat-note")
        assert f"{len(template.prompt(tokenizer, turn2))} prompt tokens" in note
        # Clear, then a system prompt: the template's system turn comes first
        tab.click("#chat-clear")
        tab.fill("#chat-system textarea", system)
        assert send(QUERY, 1) == expected3
        assert f"{len(template.prompt(tokenizer, with_system))} prompt tokens" in tab.inner_text("#chat-note")
        tab.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

        # temperature and top-p only matter when sampling: inactive under greedy decoding
        sliders = [tab.locator(f"#chat-{name} input[type=range]") for name in ("temperature", "top-p")]
        assert tab.locator("#chat-greedy input").is_checked()
        for slider in sliders:
            expect(slider).to_be_disabled()
        tab.locator("#chat-greedy input").uncheck()
        for slider in sliders:
            expect(slider).to_be_enabled()
        tab.locator("#chat-greedy input").check()
        expect(sliders[0]).to_be_disabled()

        # another run: the conversation is cleared, and the page says so
        tab.click("#chat-run input")
        tab.get_by_role("option", name=engines[1].label).click()
        expect(tab.locator("#chat-note")).to_contain_text("was cleared")
        assert engines[1].label in tab.inner_text("#chat-note") and "1 turn(s)" in tab.inner_text("#chat-note")
        expect(tab.locator('#chat-box [data-testid="bot"]')).to_have_count(0)
    finally:
        page.close()
        slow.remove()


# ------------------------------------------------------------------------------------------------ compare
def start_server(args: list[str], cwd: Path, log: Path, timeout: float = 300) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "glm_experiments.web", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=checkout_env({**os.environ, "PYTHONUNBUFFERED": "1"}),
        )
    deadline = time.monotonic() + timeout
    while "serving on" not in log.read_text():
        if proc.poll() is not None:
            raise AssertionError(f"the server ended (rc {proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def seed_with_both_layouts(prompts: int) -> int:
    """A seed whose first ``prompts`` prompts put each run on the left at least once (as the session draws them)."""
    for seed in range(100):
        if len({random.Random(f"{seed}:{p}").random() < 0.5 for p in range(prompts)}) == 2:
            return seed
    raise AssertionError("no such seed")


def verdicts(path: Path) -> list[dict]:
    return [row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if row["type"] == "verdict"]


HISTORY_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "history_demo" / "dev.json"


def session_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.browser
def test_blind_comparison_records_unblinded_verdicts_and_resumes_after_a_kill(browser, sweep, tmp_path):
    """Long conversations (history_demo) judged blind: the question in view, the history folded away; two votes
    0.05 s apart make one verdict and the page goes on; a comment typed after a vote joins the verdict; a kill
    and a restart resume at prompt 5; the finished page shows the tally and nothing to type into."""
    from playwright.sync_api import expect

    from glm_experiments.data.dataset import eval_prompts
    from glm_experiments.data.formats import load_samples
    from glm_experiments.inference.run_loading import load_run
    from glm_experiments.study.human_eval import ABSession, wilson_interval

    runs, uri = sweep
    max_new = 16
    seed = seed_with_both_layouts(4)
    # what each run writes for the first 5 prompts, by plain generate
    loaded = {side: load_run(run, device="cpu") for side, run in zip("ab", runs)}
    samples, _ = load_samples(HISTORY_PROMPTS, loaded["a"].cfg.data)
    samples = samples[:5]
    expected = {}
    for side, run in loaded.items():
        ids, _, references = eval_prompts(samples, run.tokenizer, run.template, run.cfg.data)
        expected[side] = [greedy_reply(run, prompt, max_new) for prompt in ids]
    assert expected["a"] != expected["b"], "the two runs must write different replies for the test to tell them apart"
    questions = [sample.messages[-2]["content"] for sample in samples]
    assert len({len(sample.messages) for sample in samples}) > 1 and len(samples[0].messages) > 20

    port = free_port()
    args = ["--run", str(runs[0]), "--run", str(runs[1]), "--input", str(HISTORY_PROMPTS), "--max-prompts", "5",
            "--max-new-tokens", str(max_new), "--port", str(port), "--seed", str(seed)]
    server = start_server(args, tmp_path, tmp_path / "server1.log")
    tab = browser.new_page(viewport={"width": 1280, "height": 1100})
    page_url, requests = f"http://127.0.0.1:{port}/", []
    tab.on("request", lambda request: requests.append(request.url))
    session_dir = runs[0].parent / "human_eval"  # beside the runs: in the sweep's folder

    def on_screen(position: int) -> tuple[str, str]:
        """Prompt ``position`` is shown with both replies and votes on: the question first, in full, the
        history folded, the reference hidden; (left reply, right reply)."""
        expect(tab.locator("#cmp-vote-left")).to_be_enabled(timeout=120_000)
        assert f"Prompt {position + 1} of 5" in tab.inner_text("#cmp-progress")
        box = tab.locator("#cmp-prompt textarea")
        expect(box).to_have_value(questions[position])
        assert box.evaluate("e => e.scrollHeight <= e.clientHeight + 1"), "the question fits its box: no scrolling"
        earlier = [m for m in samples[position].messages[:-2] if m["role"] == "user"]
        expect(tab.locator("#cmp-history")).to_contain_text(f"history ({len(earlier)} turns)")
        assert not tab.locator("#cmp-history-text").is_visible(), "the history is folded until asked for"
        assert not tab.locator("#cmp-reference").is_visible(), "the reference stays hidden until the vote"
        return tab.input_value("#cmp-left textarea"), tab.input_value("#cmp-right textarea")

    def check_verdict(row: dict, position: int, choice: str, left: str, right: str) -> None:
        assert row["position"] == position and row["choice"] == choice
        # unblinding: the run recorded on each side is the run whose reply was shown there
        assert expected[row["left"]][position] == left and expected[row["right"]][position] == right
        assert row["replies"][row["left"]] == left and row["replies"][row["right"]] == right
        assert row["winner"] == {"left": row["left"], "right": row["right"]}.get(choice)
        if row["winner"]:
            assert (row["winner_run_id"]
                    == json.loads((runs["ab".index(row["winner"])] / "result.json").read_text())["run_id"])
        assert row["reference"] == references[position] and row["settings"] == {"max_new_tokens": max_new}

    try:
        tab.goto(page_url)
        tab.get_by_role("tab", name="Compare (blind)").click()

        # prompt 1: the history on demand; then "a" and, 0.05 s later, "b": one verdict (A better), Next works
        left, right = on_screen(0)
        tab.locator("#cmp-history").get_by_text("history (").click()
        expect(tab.locator("#cmp-history-text textarea")).to_have_value(
            re.compile(re.escape(samples[0].messages[1]["content"])))
        tab.keyboard.press("a")
        time.sleep(0.05)
        tab.keyboard.press("b")
        expect(tab.locator("#cmp-status")).to_contain_text("verdict 1 of 5", timeout=60_000)
        expect(tab.locator("#cmp-reference textarea")).to_have_value(references[0])
        expect(tab.locator("#cmp-next")).to_be_enabled()
        [path] = session_dir.glob("*.jsonl")
        rows = verdicts(path)
        assert len(rows) == 1, rows
        check_verdict(rows[0], 0, "left", left, right)
        # a comment typed after the vote is added to that verdict (Enter)
        expect(tab.locator("#cmp-comment")).to_contain_text("added to it")
        tab.fill("#cmp-comment textarea", "A keeps the colour")
        tab.locator("#cmp-comment textarea").press("Enter")
        expect(tab.locator("#cmp-status")).to_contain_text("comment added", timeout=60_000)
        assert [line["comment"] for line in session_lines(path) if line["type"] == "comment"] == ["A keeps the colour"]
        tab.click("#cmp-next")

        # prompt 2: the next prompt's own content; B better, then a second vote forced past the disabled buttons
        # (as a press racing the first would reach the server): that prompt's verdict is shown, Next works
        left, right = on_screen(1)
        assert (left, right) != (rows[0]["replies"][rows[0]["left"]], rows[0]["replies"][rows[0]["right"]])
        tab.click("#cmp-vote-right")
        tab.evaluate("() => { const b = document.getElementById('cmp-vote-tie'); b.disabled = false; b.click(); }")
        expect(tab.locator("#cmp-status")).to_contain_text("already has a verdict (B better)", timeout=60_000)
        expect(tab.locator("#cmp-next")).to_be_enabled()
        expect(tab.locator("#cmp-reference textarea")).to_have_value(references[1])
        assert "Prompt 2 of 5" in tab.inner_text("#cmp-progress")
        rows = verdicts(path)
        assert len(rows) == 2
        check_verdict(rows[1], 1, "right", left, right)
        tab.keyboard.press("n")

        # prompts 3 and 4: tie by key; both bad by button with a comment typed before the vote
        left, right = on_screen(2)
        tab.keyboard.press("t")
        expect(tab.locator("#cmp-status")).to_contain_text("verdict 3 of 5", timeout=60_000)
        check_verdict(verdicts(path)[-1], 2, "tie", left, right)
        tab.click("#cmp-next")
        left, right = on_screen(3)
        tab.fill("#cmp-comment textarea", "both repeat the tags")
        tab.click("#cmp-vote-bad")
        expect(tab.locator("#cmp-status")).to_contain_text("verdict 4 of 5", timeout=60_000)
        rows = verdicts(path)
        check_verdict(rows[-1], 3, "both_bad", left, right)
        assert rows[3]["comment"] == "both repeat the tags"
        assert {r["left"] for r in rows} == {"a", "b"}, "the seed put each run on the left at least once"
        tab.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    finally:
        server.send_signal(signal.SIGKILL)  # as a crash would: no chance to write anything more
        server.wait(timeout=60)

    # the session as read back: 4 verdicts, the later comment joined to the first
    session = ABSession.read(path)
    assert len(session.verdicts) == 4 and session.verdicts[0]["comment"] == "A keeps the colour"
    # the human_eval MLflow run holds the 4 verdicts, linked to both runs
    run_id = [line for line in session_lines(path) if line["type"] == "mlflow"][-1]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    human = client.get_run(run_id)
    ids = [json.loads((run / "result.json").read_text())["run_id"] for run in runs]
    assert (human.data.tags["human_eval.run_a"], human.data.tags["human_eval.run_b"]) == tuple(ids)
    assert human.info.experiment_id == client.get_run(ids[0]).info.experiment_id
    assert human.data.tags["human_eval.comments"] == "2"
    wins_a = sum(r["winner"] == "a" for r in rows)
    wins_b = sum(r["winner"] == "b" for r in rows)
    assert wins_a + wins_b == 2
    metrics = human.data.metrics
    assert metrics["n"] == 4 and metrics["ties"] == 1 and metrics["both_bad"] == 1
    assert metrics["win_rate_a"] == pytest.approx(wins_a / 2)
    assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(wilson_interval(wins_a, 2))

    # started again after the kill: prompt 5, same session file and MLflow run
    server = start_server(args, tmp_path, tmp_path / "server2.log")
    try:
        assert "resuming at prompt 5" in (tmp_path / "server2.log").read_text()
        tab.reload()
        tab.get_by_role("tab", name="Compare (blind)").click()
        left, _ = on_screen(4)
        assert "(4 judged)" in tab.inner_text("#cmp-progress")
        tab.keyboard.press("b")
        expect(tab.locator("#cmp-status")).to_contain_text("verdict 5 of 5", timeout=60_000)
        row = verdicts(path)[-1]
        assert row["position"] == 4 and expected[row["left"]][4] == left and row["winner"] == row["right"]
        assert len(verdicts(path)) == 5
        human = client.get_run(run_id)
        assert human.data.metrics["n"] == 5 and human.data.tags["human_eval.progress"] == "5 of 5"
        assert human.info.status == "FINISHED", "every prompt judged"
        # the end: the runs are named with their tally; no empty boxes, nothing to type into or press
        tab.keyboard.press("n")
        expect(tab.locator("#cmp-status")).to_contain_text("All prompts judged", timeout=60_000)
        wins_a += row["winner"] == "a"
        wins_b += row["winner"] == "b"
        summary = tab.inner_text("#cmp-status")
        label_a, label_b = session.header["run_a"]["label"], session.header["run_b"]["label"]
        assert f"{label_a} {wins_a}, {label_b} {wins_b}, ties 1, both bad 1" in summary
        for hidden in ("#cmp-prompt", "#cmp-left", "#cmp-right", "#cmp-comment", "#cmp-vote-left", "#cmp-next"):
            expect(tab.locator(hidden)).to_be_hidden()
        tab.screenshot(path=str(tmp_path / "compare_done.png"), full_page=True)
        assert not [url for url in requests if not url.startswith(page_url)], "everything is served by the page"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def test_web_errors_are_one_line(sweep, tmp_path, capsys, monkeypatch):
    from glm_experiments.web import main

    runs, _ = sweep
    monkeypatch.chdir(tmp_path)

    def error_line(*args: str) -> str:
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    assert "run not found" in error_line("--run", str(tmp_path / "nowhere"))
    assert "is given twice" in error_line("--run", str(runs[0]), "--run", str(runs[0]))
    assert "data file not found: missing.json" in error_line(
        "--run", str(runs[0]), "--run", str(runs[1]), "--input", "missing.json"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"--port {port}: cannot serve there" in error_line("--run", str(runs[0]), "--port", str(port))
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "examples:" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.jsonl")), "a refused start leaves no session file"
