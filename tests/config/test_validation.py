"""Bad input of every kind ends in one ``error:`` line naming the setting (or file:line), exit code 2, before
anything trains -- and, where it can be known early, before any weight loads (issue 12, items 2, 4, 6, 7)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from glm_experiments.errors import EXIT_BAD_INPUT, UserError, cli_main
from glm_experiments.recipe.train import preflight
from tests.helpers.common import checkout_env, compose, run_cli

HAS_CUDA = torch.cuda.is_available()
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
TINY = "model.tiny.max_position_embeddings"

# (overrides, the exact message): every numeric knob of the schema, and the rules that tie settings together
BAD_SETTINGS = [
    (["train.max_steps=-5"], "train.max_steps=-5: must be >= 1"),
    (["train.max_steps=0"], "train.max_steps=0: must be >= 1"),
    (["train.max_steps=-1"], "train.max_steps=-1: must be >= 1"),  # no epoch mode: length is in steps only
    (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size=0: must be >= 1"),
    (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps=0: must be >= 1"),
    (["train.learning_rate=-1"], "train.learning_rate=-1.0: must be a finite number > 0"),
    (["train.learning_rate=0"], "train.learning_rate=0.0: must be a finite number > 0"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio=1.5: must be a finite number in [0, 1]"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1: must be a finite number >= 0"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm=-1.0: must be 0 (no clipping) or a finite number > 0"),
    (["train.logging_steps=0"], "train.logging_steps=0: must be >= 1"),
    (["train.eval_steps=-1"], "train.eval_steps=-1: must be 0 (only before and after training) or >= 1"),
    (["train.save_steps=-1"], "train.save_steps=-1: must be 0 (no checkpoints) or >= 1"),
    (["train.save_total_limit=-1"], "train.save_total_limit=-1: must be 0 (keep all) or >= 1"),
    (["train.loss_chunk_size=-8"], "train.loss_chunk_size=-8: must be 0 (off) or >= 1"),
    (["train.dataloader_num_workers=-1"], "train.dataloader_num_workers=-1: must be >= 0"),
    (["train.precision=fp8"], "train.precision=fp8: expected one of auto, float32, bfloat16, float16"),
    (["data.max_source_length=0"], "data.max_source_length=0: must be >= 1"),
    (["data.max_target_length=-1"], "data.max_target_length=-1: must be >= 1"),
    (["data.max_train_samples=0"], "data.max_train_samples=0: must be >= 1"),
    (["data.max_source_length=4096"],
     f"data.max_source_length 4096 + data.max_target_length 96 = 4192 exceeds the model's 2048 positions ({TINY})"),
    (["eval.max_new_tokens=2000"],
     f"data.max_source_length 64 + eval.max_new_tokens 2000 = 2064 exceeds the model's 2048 positions ({TINY})"),
    (["method=prompt_tuning", "data.max_source_length=1940"],  # virtual tokens take positions too
     "data.max_source_length 1940 + data.max_target_length 96 + method.num_virtual_tokens 16 = 2052 exceeds the "
     f"model's 2048 positions ({TINY})"),
    (["model.tiny.max_position_embeddings=100"],
     f"data.max_source_length 64 + data.max_target_length 96 = 160 exceeds the model's 100 positions ({TINY})"),
    (["eval.max_samples=0"], "eval.max_samples=0: must be >= 1"),
    (["eval.batch_size=0"], "eval.batch_size=0: must be >= 1"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens=0: must be >= 1"),
    (["eval.num_beams=0"], "eval.num_beams=0: must be >= 1"),
    (["eval.temperature=0"], "eval.temperature=0.0: must be a finite number > 0"),
    (["eval.top_p=1.5"], "eval.top_p=1.5: must be a finite number in (0, 1]"),
    (["method.r=0"], "method.r=0: must be >= 1"),
    (["method.alpha=0"], "method.alpha=0: must be > 0"),
    (["method.dropout=1.0"], "method.dropout=1.0: must be a finite number in [0, 1)"),
    (["method.dropout=-0.1"], "method.dropout=-0.1: must be a finite number in [0, 1)"),
    (["method.bias=some"], "method.bias=some: expected one of none, all, lora_only"),
    (["method=qlora", "method.r=0"], "method.r=0: must be >= 1"),
    (["model.quantization=3bit"], "model.quantization=3bit: expected one of 4bit, 8bit"),
    (["model.quant_type=int4"], "model.quant_type=int4: expected one of nf4, fp4"),
    (["method=ptuning", "method.pre_seq_len=0"], "method.pre_seq_len=0: must be >= 1"),
    (["method=ptuning", "method.prefix_hidden_size=0"], "method.prefix_hidden_size=0: must be >= 1"),
    (["method=ptuning", "method.prefix_dropout=1"], "method.prefix_dropout=1.0: must be a finite number in [0, 1)"),
    (["method=prompt_tuning", "method.num_virtual_tokens=0"], "method.num_virtual_tokens=0: must be >= 1"),
    (["method=freeze", "method.num_last_layers=0"], "method.num_last_layers=0: must be >= 1"),
    (["model.tiny.hidden_size=0"], "model.tiny.hidden_size=0: must be >= 1"),
    (["model.tiny.pretrain_lr=0"], "model.tiny.pretrain_lr=0.0: must be a finite number > 0"),
    (["model.tiny.num_key_value_heads=3"],
     "model.tiny.num_attention_heads=4 must be a multiple of model.tiny.num_key_value_heads=3"),
    (["launcher.nproc_per_node=0"], "launcher.nproc_per_node=0: must be >= 1"),
    (["launcher.nnodes=0"], "launcher.nnodes=0: must be >= 1"),
    (["launcher.node_rank=-1"], "launcher.node_rank=-1: must be >= 0"),
    (["launcher.master_port=70000"], "launcher.master_port=70000: must be 0 (a free port) or in [1, 65535]"),
    (["seed=-1"], "seed=-1: must be in [0, 4294967295]"),
    (["model=chatglm3", "model.path=null"], "model=chatglm3 needs model.path=<checkpoint directory>; got None"),
    (["model.family=gpt"], "model.family='gpt': expected one of chatglm, chatglm2, chatglm3, glm4, hf, tiny"),
]


def _preflight_error(overrides: list[str], tmp_path: Path) -> str:
    with pytest.raises(UserError) as info:
        preflight(compose([*overrides, f"output_dir={tmp_path / 'out'}"]))
    return str(info.value)


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_before_anything_loads(overrides, message, tmp_path):
    assert _preflight_error(overrides, tmp_path) == message


def test_scheduler_names_are_checked(tmp_path):
    message = _preflight_error(["train.lr_scheduler_type=cosin"], tmp_path)
    assert message.startswith("train.lr_scheduler_type=cosin: expected one of linear, cosine, ")


@pytest.mark.parametrize("method", ["lora", "freeze", "ptuning", "prompt_tuning", "full"])
def test_every_method_default_passes(method, tmp_path):
    preflight(compose([f"method={method}", f"output_dir={tmp_path / 'out'}"]))  # no false alarm on the defaults


def test_boundaries_are_allowed(tmp_path):
    preflight(compose(["train.max_steps=1", "train.warmup_ratio=0", "train.warmup_ratio=1", "method.dropout=0",
                       "train.max_grad_norm=0", "train.save_steps=0", "eval.top_p=1", "eval.max_samples=null",
                       "data.max_source_length=1024", "data.max_target_length=1024", "eval.max_new_tokens=1024",
                       f"output_dir={tmp_path / 'out'}"]))


def test_every_experiment_composes_and_passes_on_the_tiny_model(tmp_path):
    for name in ("source_length_ablation", "method_comparison", "lora_rank_sweep"):
        preflight(compose([f"experiment={name}", f"output_dir={tmp_path / 'out'}"]))
    preflight(compose(["experiment=source_length_ablation", "lengths=src1024_tgt256", f"output_dir={tmp_path / 'out'}"]))


def test_full_fine_tuning_on_a_quantized_base_is_a_user_error(tmp_path):
    assert _preflight_error(["method=full", "model.quantization=4bit"], tmp_path).startswith(
        "method=full cannot train on a quantized base (model.quantization=4bit): full fine-tuning trains every base "
        "weight")


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_missing_deepspeed_is_refused_before_launch(tmp_path):
    assert _preflight_error(["deepspeed=zero2"], tmp_path) == (
        "deepspeed=zero2 needs the deepspeed package, which is not installed (pip install -e '.[deepspeed]'), "
        "or use deepspeed=none")


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError) as info:
        preflight(compose([f"output_dir={tmp_path / 'afile' / 'run'}"]))
    assert str(info.value) == f"output_dir={tmp_path / 'afile' / 'run'}: cannot be created, {tmp_path / 'afile'} is a file"


# ------------------------------------------------------------------------------------------ one wrapper
def test_cli_main_sorts_errors(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def raising(exc):
        @cli_main
        def main(argv):
            raise exc
        return main

    assert raising(UserError("bad value"))([]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: bad value\n"
    assert raising(PermissionError(13, "Permission denied", "/x/y"))([]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: /x/y: Permission denied\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        raising(KeyError("k"))([])
    with pytest.raises(UserError):  # --debug: the traceback of a user error too
        raising(UserError("bad value"))(["--debug"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError):
        raising(UserError("bad value"))([])


def test_compare_with_a_corrupt_mlflow_db(tmp_path, capsys):
    from glm_experiments.compare import main

    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    assert main(["--tracking-uri", f"sqlite:///{db}", "--experiment", "x"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (f"error: tracking.tracking_uri=sqlite:///{db}: {db} is not an SQLite database "
                                       "(damaged, or another file); move it, pass another path, or use tracking=none\n")


# ---------------------------------------------------------------------------------------- data files
def _data_cfg(fmt: str = "adgen"):
    return OmegaConf.merge(compose(["output_dir=/tmp/x"]).data, {"format": fmt})


def test_directory_and_foreign_types_are_named(tmp_path):
    from glm_experiments.data.formats import DataError, load_samples

    with pytest.raises(DataError) as info:
        load_samples(tmp_path, _data_cfg(), setting="data.train_file")
    assert str(info.value) == f"data.train_file={tmp_path}: is a directory, expected a data file (JSON lines or a JSON array)"
    for suffix in (".csv", ".parquet"):
        path = tmp_path / f"train{suffix}"
        path.write_text("content,summary\na,b\n")
        with pytest.raises(DataError) as info:
            load_samples(path, _data_cfg(), setting="data.dev_file")
        assert str(info.value) == (f"data.dev_file={path}: unknown data file type '{suffix}' "
                                   "(expected JSON lines or a JSON array: .json, .jsonl, .jsonlines, .ndjson)")


def test_lone_surrogate_is_a_file_line_error(tmp_path):
    from glm_experiments.data.formats import DataError, load_samples

    path = tmp_path / "train.json"
    path.write_text('{"content": "ok", "summary": "fine"}\n{"content": "bad \\ud83d", "summary": "x"}\n')
    with pytest.raises(DataError) as info:
        load_samples(path, _data_cfg())
    assert info.value.errors == [f"{path}:2: lone surrogate '\\ud83d' (a \\u escape without its pair): not valid Unicode text"]


def test_call_arguments_must_parse(tmp_path):
    from glm_experiments.data.formats import DataError, load_samples

    def record(content):
        return json.dumps({"conversations": [{"role": "user", "content": "weather?"},
                                             {"role": "assistant", "metadata": "get_weather", "content": content},
                                             {"role": "observation", "content": "sunny"},
                                             {"role": "assistant", "content": "It is sunny."}]}, ensure_ascii=False)

    good = ['{"city": "北京"}', "```python\ntool_call(city='北京', days=1)\n```"]
    bad = ['{"city": 北京}', "```python\ntool_call(city=北京)\n```"]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(record(c) for c in good + bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_samples(path, _data_cfg("conversations"))
    assert info.value.errors == [
        f"{path}:3: message 1: the arguments of the call of 'get_weather' are not JSON (Expecting value, column 10)",
        f"{path}:4: message 1: the call of 'get_weather' is not tool_call(key=literal, ...) (ValueError)",
    ]


# ------------------------------------------------------------------------------ native checkpoints
@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    """The tiny model's cached checkpoint: a native (transformers-format) directory with its tokenizer."""
    from glm_experiments.models.tiny.build import ensure_tiny_checkpoint

    tiny = OmegaConf.to_object(compose(["output_dir=/tmp/x"]).model.tiny)
    return ensure_tiny_checkpoint(tiny)


def _copy(native_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "native"
    shutil.copytree(native_dir, dst)
    return dst


def test_native_checkpoint_missing_a_tensor_is_refused(native_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from glm_experiments.models.thudm import CheckpointError, load_checkpoint

    d = _copy(native_dir, tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(d, "hf", torch.float32)
    assert str(info.value) == (f"{d}: the weights do not fit the model in config.json (missing keys: "
                               "model.layers.1.mlp.down_proj.weight; unexpected keys: model.layers.9.extra.weight)")


def test_native_checkpoint_lists_the_first_keys_and_the_count(native_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from glm_experiments.models.thudm import CheckpointError, load_checkpoint

    d = _copy(native_dir, tmp_path)
    state = load_file(d / "model.safetensors")
    gone = sorted(k for k in state if k.startswith("model.layers.0."))
    save_file({k: v for k, v in state.items() if k not in gone}, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(d, "hf", torch.float32)
    assert f"(missing keys: {', '.join(gone[:3])}, ... ({len(gone)} in all))" in str(info.value)


# ------------------------------------------------------------------------------ through the real CLI
def _fail(args: list[str], tmp_path: Path, message: str, *, exact: bool = True) -> str:
    """Run the CLI with bad input: exit 2, the last stderr line is the one error, no traceback, nothing trained."""
    run_dir = tmp_path / "run"
    result = run_cli([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == EXIT_BAD_INPUT, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    stderr = "\n" + result.stderr
    error = stderr[stderr.rindex("\nerror: ") + 1:].strip()  # the last thing printed
    assert (error == f"error: {message}") if exact else error.startswith(f"error: {message}"), error
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "adapter").exists()
    assert not (run_dir / "result.json").exists()
    return result.stderr


@pytest.mark.slow
def test_cli_bad_setting(tmp_path):
    _fail(["train.max_steps=-5", "tracking=none"], tmp_path, "train.max_steps=-5: must be >= 1")


@pytest.mark.slow
def test_cli_unknown_group_option(tmp_path):
    """Hydra would list every option with the schema nodes base_* among them; one line names the real ones."""
    _fail(["method=lorra"], tmp_path,
          "method=lorra: no such option (conf/method/ has dora, freeze, full, lora, prompt_tuning, ptuning, qlora)")
    _fail(["--multirun", "lengths=src512_tgt128,src2048"], tmp_path,
          "lengths=src2048: no such option (conf/lengths/ has src1024_tgt256, src1024_tgt256_bs1, src512_tgt128, "
          "src512_tgt128_bs2)")


def test_group_choices_leave_hydra_syntax_alone():
    from glm_experiments.config.hydra_checks import check_group_choices

    conf = Path(__file__).resolve().parents[2] / "conf"
    check_group_choices(["method=lora", "+experiment=source_length_ablation", "method=choice(lora,freeze)",
                         "hydra/launcher=anything", "method.r=8", "~debug", "data=null", "--cfg", "job"], conf)


@pytest.mark.slow
def test_cli_debug_shows_the_traceback(tmp_path):
    result = run_cli(["--debug", "train.max_steps=-5", "tracking=none", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode not in (0, EXIT_BAD_INPUT) and "Traceback" in result.stderr
    assert "UserError: train.max_steps=-5: must be >= 1" in result.stderr


@pytest.mark.slow
def test_cli_lengths_beyond_a_native_models_positions(native_dir, tmp_path):
    # read from config.json before any weight: the weights here are not even readable
    d = _copy(native_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"\0" * 100)
    _fail(["model.family=hf", "model.template=chatglm3", f"model.path={d}", "data.max_source_length=2000", "tracking=none"], tmp_path,
          f"data.max_source_length 2000 + data.max_target_length 96 = 2096 exceeds the model's 2048 positions "
          f"(max_position_embeddings in {d / 'config.json'})")


@pytest.mark.slow
def test_cli_corrupt_config_json(native_dir, tmp_path):
    d = _copy(native_dir, tmp_path)
    (d / "config.json").write_text('{"model_type": "glm",')
    _fail(["model.family=hf", "model.template=chatglm3", f"model.path={d}", "tracking=none"], tmp_path, f"{d / 'config.json'}: invalid JSON (",
          exact=False)


@pytest.mark.slow
def test_cli_truncated_weights(native_dir, tmp_path):
    d = _copy(native_dir, tmp_path)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fail(["model.family=hf", "model.template=chatglm3", f"model.path={d}", "tracking=none"], tmp_path,
          f"{d}: cannot read its weights (SafetensorError: ", exact=False)


@pytest.mark.slow
def test_cli_missing_tokenizer(native_dir, tmp_path):
    d = _copy(native_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    (d / "model.safetensors").write_bytes(b"\0" * 100)  # found before the weights are read
    _fail(["model.family=hf", "model.template=chatglm3", f"model.path={d}", "tracking=none"], tmp_path,
          f"{d}: cannot load its tokenizer (Couldn't instantiate the backend tokenizer from one of:)")


@pytest.mark.slow
def test_cli_damaged_tokenizer_file(native_dir, tmp_path):
    d = _copy(native_dir, tmp_path)
    tokenizer = d / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[: tokenizer.stat().st_size // 2])  # a copy cut short
    _fail(["model.family=hf", "model.template=chatglm3", f"model.path={d}", "tracking=none"], tmp_path,
          f"{tokenizer}: not valid JSON (", exact=False)


@pytest.mark.slow
def test_cli_data_is_validated_before_the_model_loads(native_dir, tmp_path):
    # a broken record and unreadable weights: the data error comes first (the model is never loaded)
    d = _copy(native_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"\0" * 100)
    data = tmp_path / "train.json"
    data.write_text('{"content": "a", "summary": "b"}\n{"content": "\\udc00", "summary": "b"}\n')
    _fail(["model.family=hf", "model.template=chatglm3", f"model.path={d}", f"data.train_file={data}", "tracking=none"], tmp_path,
          f"1 bad record(s) of 2 in {data} (format adgen; data.on_error=skip drops them):\n"
          f"  {data}:2: lone surrogate '\\udc00' (a \\u escape without its pair): not valid Unicode text")


@pytest.mark.slow
def test_cli_data_file_is_a_directory(tmp_path):
    _fail([f"data.train_file={tmp_path}", "tracking=none"], tmp_path,
          f"data.train_file={tmp_path}: is a directory, expected a data file (JSON lines or a JSON array)")


@pytest.mark.slow
def test_cli_corrupt_mlflow_db(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    _fail([f"tracking.tracking_uri=sqlite:///{db}"], tmp_path,
          f"tracking.tracking_uri=sqlite:///{db}: {db} is not an SQLite database (damaged, or another file); "
          "move it, pass another path, or use tracking=none")


@pytest.mark.slow
def test_cli_run_dir_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("")
    result = run_cli(["tracking=none", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"], tmp_path)
    assert result.returncode == EXIT_BAD_INPUT and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: hydra.run.dir={tmp_path / 'afile' / 'run'}: cannot be created, {tmp_path / 'afile'} is a file")


@pytest.mark.slow
@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_cli_missing_deepspeed_fails_before_any_worker(tmp_path):
    stderr = _fail(["deepspeed=zero2", "tracking=none"], tmp_path,
                   "deepspeed=zero2 needs the deepspeed package, which is not installed (pip install -e "
                   "'.[deepspeed]'), or use deepspeed=none")
    assert "launching" not in stderr and "rank" not in stderr


@pytest.mark.slow
def test_cli_full_on_a_quantized_base(tmp_path):
    _fail(["method=full", "model.quantization=8bit", "tracking=none"], tmp_path,
          "method=full cannot train on a quantized base (model.quantization=8bit)", exact=False)


# ------------------------------------------------------------------------------------------ rendezvous
def test_single_node_rendezvous_is_loopback_only(tmp_path):
    from glm_experiments.scale.launcher import torchrun_command

    one = torchrun_command(compose(["launcher.nproc_per_node=2", "launcher.master_addr=10.0.0.5"]).launcher, Path("c.yaml"))
    assert one[1:3] == ["-m", "glm_experiments.scale.torchrun_loopback"] and "--master_addr=127.0.0.1" in one
    two = torchrun_command(compose(["launcher.nnodes=2", "launcher.master_addr=10.0.0.5"]).launcher, Path("c.yaml"))
    assert two[1:3] == ["-m", "torch.distributed.run"] and "--master_addr=10.0.0.5" in two


LISTENERS = r'''
import os, sys
port = int(os.environ["MASTER_PORT"])
found = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # LISTEN
            found.append(address)
print("LISTEN", ",".join(found))
'''


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_torchrun_store_listens_on_loopback_only(tmp_path):
    import subprocess
    import sys

    from glm_experiments.scale.launcher import free_port

    (tmp_path / "listeners.py").write_text(LISTENERS)
    result = subprocess.run([sys.executable, "-m", "glm_experiments.scale.torchrun_loopback", "--nproc_per_node=1",
                             "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}", "listeners.py"],
                            cwd=tmp_path, env=checkout_env(dict(os.environ)), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    listening = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("LISTEN ")]
    assert listening == ["0100007F"], result.stdout  # 127.0.0.1, and no 0.0.0.0 / :: listener


def test_an_optimising_sweeper_needs_an_objective_the_trials_compute():
    """hparams_search=optuna needs its extra; the check reads only hydra.sweeper.direction, set here by hand."""
    from glm_experiments.compose import compose as compose_config
    from glm_experiments.config.hydra_checks import check_objective

    def composed(*overrides: str):
        cfg = compose_config(list(overrides), return_hydra_config=True)
        OmegaConf.update(cfg, "hydra.sweeper.direction", "maximize", force_add=True)
        return cfg

    check_objective(composed())  # rouge-l on the demo data
    check_objective(compose_config(["optimize_metric=banana"], return_hydra_config=True))  # a sweeper that does not optimise
    with pytest.raises(UserError) as bad:
        check_objective(composed("optimize_metric=rouge-l", "data=spo_demo"))
    assert str(bad.value) == ("optimize_metric=rouge-l: the search's trials do not compute it (with data=spo_demo they "
                              "compute triple_f1); the sweeper would get None")
    with pytest.raises(UserError) as none:
        check_objective(composed("data.dev_file=null"))
    assert "data.dev_file is null: they compute no metric" in str(none.value)
