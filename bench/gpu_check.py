"""GPU check (issue 19): one command that trains the 6B shapes for real on a CUDA GPU and writes what it measured.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/log     # on the GPU machine
    python bench/gpu_check.py --device cpu --layers 1 --tiny --out /tmp/gc            # CPU dry run (tests)

Writes ``gpu_check.json`` (rewritten after every case: nothing is lost if the command is killed) and
``gpu_check.md`` (a Markdown table, the traced figure beside each measured one) into ``--out`` (default $OUT).
Nothing else goes into the out dir (the device tool returns at most 8 files): the CLI run lives in a temp dir.

Start: modules the check needs and the GPU machine lacks (hydra-core, omegaconf, antlr4, datasets + pyarrow,
bitsandbytes) are installed from the carried wheels (scripts/fetch_gpu_wheels.sh -> gpu_wheels/) with
``pip install --no-index --find-links gpu_wheels --no-deps --target <tmp>/.../site-packages`` (a ``site-packages``
path: dill, under ``datasets``' fingerprinting, pickles modules from any other path by value and fails).

Cases, in this order (models: random weights built directly on the device in bf16, ``GlmForCausalLM`` with
ChatGLM3-6B's sizes; ChatGLM2-6B has the same shape; settings composed from the project's conf/experiment files):
  * LoRA r8 and P-Tuning v2 (pre_seq_len 128), 28 layers, the ChatGLM3 demo's bs 4 x 256+512, plain and with
    gradient checkpointing + ``train.loss_chunk_size=256`` (= experiment=chatglm3_{lora,ptuning}_lowmem);
  * QLoRA r8 nf4 through real bitsandbytes (``from_pretrained`` with the method's quantization_config), 28
    layers, bs 1 x 1024 (= experiment=chatglm2_qlora_lowmem), with and without the two options;
  * LoRA r32, 28 layers, LLaMA-Factory's bs 4 x 1024 tokens (512+512), plain and with checkpointing
    (LLaMA-Factory's default): samples/s against its 21.67 (A100);
  * full fine-tuning of a 4-layer shortened model (checkpointing + chunked CE);
  * the project's CLI end to end (``python -m glm_experiments``, a GPU-sized tiny GLM, a few hundred steps,
    tracking=none): bf16, ``perf/cuda_max_allocated_mib``, batched generation before/after, checkpoints;
  * ``pytest -m gpu tests/test_gpu.py``.

Each train case: ``warmup`` steps, then ``steps`` timed ones (bf16 autocast, AdamW over the trainable
parameters, the same two knobs the trainer applies). Memory: ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved`` over the training steps (peak stats reset once the model is built and adapted,
weights included, as in the trace), plus the peak while building. Throughput: median step time.
MFU = 6 * N * tokens/s / peak bf16 FLOP/s (H200: 989e12 dense). N counts *all* parameters (frozen base
included, the base's unquantised count for QLoRA) and only the input tokens (no attention FLOPs, no
recomputation for checkpointing): for LoRA/P-Tuning/QLoRA, whose backward skips the frozen weights'
gradients, it is the usual convention, not the hardware's utilisation.

Every case runs in its own process on CUDA (clean peak stats, a time cap that can kill it) inside a
try/except: an error or a hit cap is recorded as the case's status and the next case runs. A case starts
only if the overall budget (--budget) leaves room for it; otherwise it is skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WHEELS = ROOT / "gpu_wheels"
TRACED_FILE = BENCH / "results" / "memory_trace.json"
GPU_TRACED_FILE = BENCH / "results" / "gpu_check_traced.json"
MIB = 2**20

# module -> distribution, for what the GPU machine lacks (bitsandbytes only where CUDA is)
NEEDED = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "datasets": "datasets",
          "pyarrow": "pyarrow", "dill": "dill", "multiprocess": "multiprocess", "xxhash": "xxhash"}
NEEDED_CUDA = {"bitsandbytes": "bitsandbytes"}

PEAK_BF16_FLOPS_H200 = 989e12
REFERENCE = {"chatglm3_demo_lora_mib": 14082, "chatglm3_demo_ptuning_v2_mib": 18426,
             "llama_factory_lora_r32_samples_per_s": 21.67, "llama_factory_qlora_mib": 5.14e9 / MIB}

# the same override lists bench/run.py traces (TRACE_CASES), so the traced figure is the same config
_OFF = ["train.gradient_checkpointing=false", "train.loss_chunk_size=0"]
_LORA, _PT, _QLORA = "experiment=chatglm3_lora_lowmem", "experiment=chatglm3_ptuning_lowmem", "experiment=chatglm2_qlora_lowmem"
_DEMO = ["model=chatglm3", "data=adgen", "data.max_source_length=256", "data.max_target_length=512",
         "train.per_device_train_batch_size=4"]
_LF = ["model=chatglm2", "data=adgen", "method=lora", "method.r=32", "data.max_source_length=512",
       "data.max_target_length=512", "train.per_device_train_batch_size=4"]

# (key, title, overrides of the real config, layers (None = --layers / 28), reference key, cap seconds on CUDA)
CASES = [
    ("lora", "LoRA r8, bs 4, 256+512", [_LORA, *_OFF], None, "chatglm3_demo_lora_mib", 90),
    ("lora_lowmem", "LoRA r8, bs 4, 256+512, checkpointing + chunked CE (experiment=chatglm3_lora_lowmem)", [_LORA], None,
     "chatglm3_demo_lora_mib", 90),
    ("ptuning", "P-Tuning v2 pre_seq_len 128, bs 4, 256+512", [_PT, *_OFF], None, "chatglm3_demo_ptuning_v2_mib", 90),
    ("ptuning_lowmem", "P-Tuning v2 pre_seq_len 128, bs 4, 256+512, checkpointing + chunked CE (experiment=chatglm3_ptuning_lowmem)",
     [_PT], None, "chatglm3_demo_ptuning_v2_mib", 90),
    ("qlora_lowmem", "QLoRA r8 nf4, ChatGLM2-6B shape, bs 1, 512+512, checkpointing + chunked CE (experiment=chatglm2_qlora_lowmem)",
     [_QLORA], None, "llama_factory_qlora_mib", 180),
    ("qlora", "QLoRA r8 nf4, ChatGLM2-6B shape, bs 1, 512+512", [_QLORA, *_OFF], None, "llama_factory_qlora_mib", 90),
    ("lora_r32_lf", "LoRA r32, ChatGLM2-6B shape, bs 4 x 1024 (512+512)", [*_LF, *_OFF], None,
     "llama_factory_lora_r32_samples_per_s", 90),
    ("lora_r32_lf_ckpt", "LoRA r32, ChatGLM2-6B shape, bs 4 x 1024, gradient checkpointing (LLaMA-Factory's default)",
     [*_LF, "train.gradient_checkpointing=true", "train.loss_chunk_size=0"], None, "llama_factory_lora_r32_samples_per_s", 90),
    ("full_4l", "full fine-tuning, 4 layers, bs 4, 256+512, checkpointing + chunked CE",
     [*_DEMO, "method=full", "train.gradient_checkpointing=true", "train.loss_chunk_size=256"], 4, None, 90),
    ("cli", "CLI end to end: python -m glm_experiments (GPU-sized tiny GLM, tracking=none)", [], None, None, 150),
    ("pytest_gpu", "pytest -m gpu tests/test_gpu.py (bf16 vs fp32, QLoRA train+reload, GPU = CPU greedy, CLI CUDA metrics)",
     [], None, None, 120),
]

CHATGLM3_6B = dict(hidden_size=4096, intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2,
                   head_dim=128, vocab_size=65024)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=512)
# the CLI case's model on a GPU: the tiny family (pre-trained briefly on the demo corpus on the CPU first)
CLI_GPU_MODEL = dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=2, head_dim=64,
                     intermediate_size=2048, pretrain_steps=20)


# ============================================================================ environment
def ensure_packages(device: str, wheels: Path = WHEELS, site: Path | None = None) -> dict:
    """Install the carried wheels of whatever needed module is missing, into ``<tmp>/glm_gpu_check/pyX.Y/site-packages``
    (added to sys.path and PYTHONPATH for the case processes). pip first; if pip is unusable, unzip the wheels."""
    import torch

    needed = dict(NEEDED, **(NEEDED_CUDA if device == "cuda" and torch.cuda.is_available() else {}))
    # one per Python version (the wheels are cp312): never shadows what this interpreter already has
    site = site or Path(tempfile.gettempdir()) / "glm_gpu_check" / f"py{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    missing = {m: d for m, d in needed.items() if importlib.util.find_spec(m) is None}
    if missing and site.is_dir():  # a warm machine: what an earlier run installed
        _add_site(site)
        missing = {m: d for m, d in missing.items() if importlib.util.find_spec(m) is None}
    report = {"missing_before": sorted(missing.values()), "installed": [], "how": None}
    if not missing:
        return report
    if not wheels.is_dir():
        report["how"] = f"no {wheels} to install from"
        return report
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps",
           "--upgrade", "--target", str(site), "--disable-pip-version-check", "--quiet", *sorted(set(missing.values()))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report["how"] = " ".join(cmd[1:])
    if proc.returncode != 0:  # no pip, or it refused: a wheel is a zip of the installed files
        report["pip_error"] = (proc.stderr or proc.stdout).strip()[-1500:]
        report["how"] = "unzip (pip failed)"
        for dist in set(missing.values()):
            prefix = dist.replace("-", "_").lower() + "-"
            for wheel in wheels.glob("*.whl"):
                if wheel.name.lower().startswith(prefix):
                    with zipfile.ZipFile(wheel) as z:
                        z.extractall(site)
    _add_site(site)
    report["installed"] = sorted(d for m, d in missing.items() if importlib.util.find_spec(m) is not None)
    report["still_missing"] = sorted(d for m, d in missing.items() if importlib.util.find_spec(m) is None)
    return report


def _add_site(site: Path) -> None:
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(site) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *[p for p in paths if p]])
    importlib.invalidate_caches()


def environment(device: str) -> dict:
    import torch

    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": device,
            "cpu_count": os.cpu_count()}
    for name in ("transformers", "peft", "accelerate", "datasets", "pyarrow", "hydra", "omegaconf", "bitsandbytes"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001
            info[name] = f"not importable: {type(exc).__name__}: {exc}"[:300]
    try:  # what the machine has (issue 19: "check with pip list in the first run")
        listed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                                capture_output=True, text=True, timeout=60)
        info["pip_list"] = {p["name"]: p["version"] for p in json.loads(listed.stdout or "[]")}
    except Exception as exc:  # noqa: BLE001
        info["pip_list"] = f"pip list failed: {exc}"[:300]
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_mib=props.total_memory / MIB,
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


# ============================================================================ case specs
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sys.path.insert(0, str(ROOT))
    import glm_experiments.config  # noqa: F401  (registers the schema)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def train_spec(key: str, overrides: list[str], layers: int, args) -> dict:
    """What the project's config says for this case (method settings, batch, lengths, the two knobs)."""
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    t, d = cfg.train, cfg.data
    batch, source, target = t.per_device_train_batch_size, d.max_source_length, d.max_target_length
    if args.tiny:  # seconds on a CPU: a few short samples, chunks smaller than the supervised part
        batch, source, target = min(batch, 2), 8, 16
    return {"key": key, "kind": "train", "device": args.device, "overrides": overrides, "layers": layers,
            "shape": TINY_SHAPE if args.tiny else CHATGLM3_6B, "method_cfg": OmegaConf.to_container(cfg.method, resolve=True),
            "batch": batch, "source": source, "target": target,
            "gradient_checkpointing": bool(t.gradient_checkpointing),
            "loss_chunk_size": min(int(t.loss_chunk_size), 8) if args.tiny else int(t.loss_chunk_size),
            "warmup": args.warmup, "steps": args.steps}


def model_config(shape: dict, layers: int):
    from transformers import GlmConfig

    config = GlmConfig(**shape, num_hidden_layers=layers, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       attention_bias=True, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return config


# ============================================================================ traced column
def traced_figures() -> dict:
    """key -> traced case (bench/results/memory_trace.json for the 28-layer cases it has, gpu_check_traced.json
    for the others), matched by the exact override list so a traced figure is of the same config."""
    out = {}
    by_overrides = {}
    if TRACED_FILE.exists():
        for name, case in json.loads(TRACED_FILE.read_text()).get("cases", {}).items():
            by_overrides[json.dumps(case["overrides"])] = {**case, "source": f"bench/results/memory_trace.json: {name.strip()}"}
    extra = json.loads(GPU_TRACED_FILE.read_text()).get("cases", {}) if GPU_TRACED_FILE.exists() else {}
    for key, _title, overrides, layers, _ref, _cap in CASES:
        hit = by_overrides.get(json.dumps(overrides)) if layers is None else None
        if hit is None and key in extra and extra[key]["overrides"] == overrides:
            hit = {**extra[key], "source": "bench/results/gpu_check_traced.json"}
        if hit is not None:
            out[key] = hit
    return out


def trace_case(spec: dict) -> dict:
    """The traced peak of this spec's training steps (bench/memory_trace.py, FakeTensorMode: no data, no GPU)."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(BENCH))
    from memory_trace import dequant_transient_mib, nf4_saving_mib, trace_training_step

    config = model_config(spec["shape"], spec["layers"])
    method_cfg = OmegaConf.create(spec["method_cfg"])
    qlora = method_cfg.name == "qlora"
    if qlora:  # as bench/run.py: LoRA on the bf16 base, then the 4-bit weights by arithmetic
        method_cfg = OmegaConf.merge(method_cfg, {"name": "lora"})
    r = trace_training_step(config, method_cfg, spec["batch"], spec["source"], spec["target"],
                            gradient_checkpointing=spec["gradient_checkpointing"], loss_chunk_size=spec["loss_chunk_size"],
                            dtype=torch.bfloat16)
    if qlora:
        r["peak_mib"] += dequant_transient_mib(config) - nf4_saving_mib(config)
        r["weights_mib"] -= nf4_saving_mib(config)
    return r


def write_traced(args) -> Path:
    """``--trace-only``: trace the cases bench/results/memory_trace.json lacks (CPU, fake tensors) and save them."""
    known = traced_figures()
    cases = {}
    for key, _title, overrides, layers, _ref, _cap in CASES:
        if key == "cli" or (key in known and "gpu_check_traced" not in known[key]["source"]):
            continue
        spec = train_spec(key, overrides, layers or 28, args)
        start = time.perf_counter()
        r = trace_case(spec)
        cases[key] = {**r, "overrides": overrides, "layers": spec["layers"], "batch": spec["batch"],
                      "source_len": spec["source"], "target_len": spec["target"],
                      "gradient_checkpointing": spec["gradient_checkpointing"], "loss_chunk_size": spec["loss_chunk_size"],
                      "trace_seconds": time.perf_counter() - start}
        print(f"traced {key}: {r['peak_mib']:,.0f} MiB", flush=True)
    GPU_TRACED_FILE.write_text(json.dumps({"how": "bench/gpu_check.py --trace-only: bench/memory_trace.py's FakeTensorMode "
                                           "trace of the gpu_check cases memory_trace.json lacks (bf16, AdamW, two steps)",
                                           "cases": cases}, indent=2) + "\n")
    return GPU_TRACED_FILE


# ============================================================================ train case (worker)
def build_model(config, device: str):
    """Random bf16 weights, created on ``device`` (meta -> to_empty -> init there: no CPU copy of a 6B model)."""
    import torch
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GlmForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0 if "norm" in name else 0.0)
    model.model.rotary_emb = GlmRotaryEmbedding(config=config).to(device)  # inv_freq: real, fp32
    return model


def quantized_model(config, method, method_cfg, device: str):
    """QLoRA's base the way the CLI loads one: a random bf16 checkpoint of the shape, saved once (temp dir), read
    back by ``from_pretrained`` with the method's ``quantization_config`` (bitsandbytes nf4)."""
    import torch
    from transformers import AutoModelForCausalLM

    cache = Path(tempfile.gettempdir()) / "glm_gpu_check" / f"random_glm_{config.num_hidden_layers}l_{config.hidden_size}h"
    if not (cache / "done").exists():
        shutil.rmtree(cache, ignore_errors=True)
        model = build_model(config, device)
        model.save_pretrained(cache)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        (cache / "done").write_text("ok\n")
    return AutoModelForCausalLM.from_pretrained(cache, quantization_config=method.quantization_config(method_cfg),
                                                dtype=torch.bfloat16, device_map={"": 0})


def param_count(config) -> int:
    import torch
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in GlmForCausalLM(config).parameters())


def train_case(spec: dict) -> dict:
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from glm_experiments.losses import chunked_loss
    from glm_experiments.methods import get_method, trainable_summary

    device = spec["device"]
    cuda = device == "cuda"
    config = model_config(spec["shape"], spec["layers"])
    method_cfg = OmegaConf.create(spec["method_cfg"])
    method = get_method(method_cfg.name)
    method.check_available()  # QLoRA without CUDA/bitsandbytes: a clear reason
    out: dict = {"layers": spec["layers"], "batch": spec["batch"], "tokens_per_sample": spec["source"] + spec["target"],
                 "gradient_checkpointing": spec["gradient_checkpointing"], "loss_chunk_size": spec["loss_chunk_size"],
                 "method": method_cfg.name}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method_cfg.name == "qlora":
        model = quantized_model(config, method, method_cfg, device)
    else:
        model = build_model(config, device)
    model = method.apply(model, method_cfg)
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out["build_seconds"] = time.perf_counter() - start
    summary = trainable_summary(model)
    out["trainable_params"] = summary["trainable"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # QLoRA: PEFT's k-bit preparation upcasts every non-4-bit weight (embedding, head, norms) to fp32
    out["embedding_dtype"] = str(base.get_input_embeddings().weight.dtype)
    out["head_dtype"] = str(base.get_output_embeddings().weight.dtype)
    # N for MFU: every parameter of the unquantised shape plus the method's trainable ones (adapter / prefix)
    n_params = param_count(config) + (summary["trainable"] if method_cfg.name != "full" else 0)
    out["n_params"] = n_params
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, **({"fused": True} if cuda else {}))  # Trainer's CUDA default
    out["optimizer"] = "AdamW(fused)" if cuda else "AdamW"
    if cuda:
        torch.cuda.synchronize()
        out["build_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["weights_allocated_mib"] = torch.cuda.memory_allocated() / MIB
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    bs, seq = spec["batch"], spec["source"] + spec["target"]
    ids = torch.randint(10, config.vocab_size - 10, (bs, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : spec["source"]] = -100  # loss on the target part, as the data pipeline does
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    chunk = spec["loss_chunk_size"]
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16), (chunked_loss(model, chunk) if chunk else contextlib.nullcontext()):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach().float().item())
    out["losses"] = losses
    out["loss_finite"] = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    out["step_seconds"] = times
    step = statistics.median(times[spec["warmup"]:] or times)
    out["samples_per_s"] = bs / step
    out["tokens_per_s"] = bs * seq / step
    if cuda:
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
        out["gpu"] = torch.cuda.get_device_name(0)
        out["peak_flops"] = PEAK_BF16_FLOPS_H200 if any(k in out["gpu"] for k in ("H200", "H100", "H800")) else None
        if out["peak_flops"]:
            out["mfu"] = 6 * n_params * out["tokens_per_s"] / out["peak_flops"]
    return out


# ============================================================================ CLI case
def cli_overrides(args, run_dir: Path) -> list[str]:
    tiny = args.tiny or args.device != "cuda"
    model = {} if tiny else CLI_GPU_MODEL
    steps = args.cli_steps or (4 if tiny else 300)
    overrides = ["tracking=none", f"hydra.run.dir={run_dir}", f"train.max_steps={steps}",
                 f"train.save_steps={max(1, steps // 2)}", "train.save_total_limit=1",
                 f"train.logging_steps={max(1, steps // 10)}", "data.metrics=[accuracy]",  # jieba/nltk not carried
                 f"eval.max_samples={4 if tiny else 64}", f"eval.batch_size={4 if tiny else 16}",
                 f"eval.max_new_tokens={4 if tiny else 32}"]
    if tiny:  # the default tiny model (cached by the test suite's runs too)
        overrides += ["train.per_device_train_batch_size=4", "data.max_train_samples=64"]
    else:  # bf16 weights + bf16 autocast, as a 6B run on this GPU (the tiny preset keeps fp32 weights)
        overrides += ["model.dtype=auto"]
    overrides += [f"model.tiny.{k}={v}" for k, v in model.items()]
    return overrides


def cli_child(metrics_file: str, overrides: list[str]) -> None:
    """``python -m glm_experiments OVERRIDES`` in this process, every metric the run logs also appended to
    ``metrics_file`` (with tracking=none they go nowhere else) and the Trainer's precision recorded."""
    sys.path.insert(0, str(ROOT))
    import glm_experiments.train as train
    from glm_experiments.tracking.mlflow_tracker import Tracker

    log_metrics, training_arguments = Tracker.log_metrics, train.training_arguments

    def record(self, metrics, step):
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        return log_metrics(self, metrics, step)

    def args_recorded(cfg, checkpoint_dir):
        targs = training_arguments(cfg, checkpoint_dir)
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"training_arguments": {"bf16": targs.bf16, "fp16": targs.fp16, "use_cpu": targs.use_cpu}}) + "\n")
        return targs

    Tracker.log_metrics, train.training_arguments = record, args_recorded
    from glm_experiments.__main__ import main

    sys.argv = ["glm_experiments", *overrides]
    main()


def cli_case(args, timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="glm_gpu_check_cli_"))
    run_dir, metrics_file = work / "run", work / "metrics.jsonl"
    overrides = cli_overrides(args, run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cli-child", str(metrics_file), "--", *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        return {"status": "timeout", "reason": f"cap {timeout:.0f} s hit", "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    out: dict = {"command": "python -m glm_experiments " + " ".join(overrides), "wall_seconds": time.perf_counter() - start,
                 "returncode": proc.returncode}
    if proc.returncode != 0:
        return {**out, "status": "error", "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:500],
                "stderr_tail": proc.stderr[-3000:]}
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    metrics = {}
    for row in rows:
        if "training_arguments" in row:
            out["training_arguments"] = row["training_arguments"]
        else:
            metrics.update({k: v for k, v in row.items() if k != "step"})
    result = json.loads((run_dir / "result.json").read_text())
    for key in ("perf/cuda_max_allocated_mib", "perf/cuda_max_reserved_mib", "perf/peak_rss_mib", "perf/tokens_per_s",
                "perf/train_seconds", "perf/startup_seconds", "model/total_params", "model/trainable_params",
                "eval/accuracy", "eval/loss", "train/loss"):
        if key in metrics:
            out[key] = metrics[key]
    out["train"] = result.get("train", {})
    out["predictions_after"] = _count_lines(run_dir / "predictions" / "after.jsonl")
    out["predictions_before"] = _count_lines(run_dir / "predictions" / "before.jsonl")
    out["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    out["checkpoint_has_trainable"] = any((run_dir / "checkpoints" / c / "trainable.safetensors").exists()
                                          for c in out["checkpoints"])
    out["adapter_saved"] = (run_dir / "adapter" / "method.json").exists()
    checks = {"exit 0": True, "checkpoint saved": out["checkpoint_has_trainable"], "adapter saved": out["adapter_saved"],
              "batched generation (predictions written)": out["predictions_after"] > 0}
    if args.device == "cuda":
        checks["bf16 (Trainer)"] = bool(out.get("training_arguments", {}).get("bf16"))
        checks["perf/cuda_max_allocated_mib logged"] = "perf/cuda_max_allocated_mib" in out
    out["checks"] = checks
    out["status"] = "measured" if all(checks.values()) else "error"
    if out["status"] == "error":
        out["error"] = "failed checks: " + ", ".join(k for k, v in checks.items() if not v)
    shutil.rmtree(work, ignore_errors=True)
    return out


def pytest_case(args, timeout: float) -> dict:
    if args.device != "cuda":
        return {"status": "skipped", "reason": "pytest -m gpu needs CUDA (on CPU its tests skip; the normal suite collects them)"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(ROOT / "tests" / "test_gpu.py"), "-q", "-rA", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": "timeout", "reason": f"cap {timeout:.0f} s hit", "stdout_tail": out[-3000:]}
    lines = proc.stdout.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln or " skipped" in ln), "?")
    result = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary.strip("= "),
              "results": [ln for ln in lines if ln.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))],
              "stdout_tail": proc.stdout[-4000:]}
    if proc.returncode == 0 and " passed" in summary and "skipped" not in summary:
        return {**result, "status": "measured"}
    return {**result, "status": "error", "error": summary.strip("= ")}


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


# ============================================================================ driver
def run_isolated(spec: dict, timeout: float) -> dict:
    """One train case in a fresh process (clean CUDA peak stats; killable at the cap)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", result_path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"cap {timeout:.0f} s hit"}
    try:
        saved = json.loads(Path(result_path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        saved = {}
    finally:
        Path(result_path).unlink(missing_ok=True)
    if not saved:
        err = proc.stderr.strip().splitlines()
        oom = proc.returncode in (-9, 137) or any("out of memory" in ln.lower() for ln in err[-8:])
        return {"status": "error", "error": ("OOM: " if oom else "") + (err[-1] if err else f"rc {proc.returncode}")[:500],
                "stderr_tail": proc.stderr[-3000:]}
    return saved


def worker_main(spec_json: str, result_path: str) -> int:
    try:
        result = {**train_case(json.loads(spec_json)), "status": "measured"}
    except Exception as exc:  # noqa: BLE001
        result = _failure(exc)
    Path(result_path).write_text(json.dumps(result, default=float))
    return 0


def _failure(exc: BaseException) -> dict:
    text = f"{type(exc).__name__}: {exc}"
    unavailable = "needs a CUDA GPU" in str(exc)
    return {"status": "skipped" if unavailable else "error", ("reason" if unavailable else "error"): text[:1000],
            "traceback": traceback.format_exc()[-3000:]}


def fmt(v, spec=",.0f", suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({report['status']})", "",
             f"{env.get('date')}, device {env.get('gpu', env.get('device'))}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, "
             f"python {env.get('python')}. Mode: {report['mode']}.", "",
             "Measured: `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the training steps (weights included); "
             "traced: bench/memory_trace.py under FakeTensorMode (no CUDA context, workspaces or fragmentation). "
             f"MFU = {report['mfu_formula']}.", "",
             "| case | status | max allocated | max reserved | traced peak | measured / traced | reference | samples/s | tokens/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, case in report["cases"].items():
        status = case.get("status", "?")
        note = case.get("reason") or case.get("error") or ""
        status_cell = status + (f": {note[:160]}" if note and status != "measured" else "")
        traced = case.get("traced_peak_mib")
        alloc = case.get("cuda_max_allocated_mib", case.get("perf/cuda_max_allocated_mib"))
        ratio = f"{alloc / traced:.2f}x" if alloc and traced else "—"
        ref = case.get("reference") or ""
        mfu = case.get("mfu")
        lines.append(f"| {case['title']} | {status_cell} | {fmt(alloc, suffix=' MiB')} | "
                     f"{fmt(case.get('cuda_max_reserved_mib', case.get('perf/cuda_max_reserved_mib')), suffix=' MiB')} | "
                     f"{fmt(traced, suffix=' MiB')} | {ratio} | {ref} | {fmt(case.get('samples_per_s'), '.2f')} | "
                     f"{fmt(case.get('tokens_per_s', case.get('perf/tokens_per_s')), ',.0f')} | {fmt(mfu, '.1%') if mfu else '—'} |")
    cli = report["cases"].get("cli", {})
    if cli.get("checks"):
        lines += ["", "CLI checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in cli["checks"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=float)), ("gpu_check.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def reference_text(ref_key: str | None, case: dict) -> str:
    if ref_key is None:
        return ""
    value = REFERENCE[ref_key]
    if ref_key.endswith("samples_per_s"):
        sps = case.get("samples_per_s")
        return f"LLaMA-Factory {value} samples/s (A100)" + (f": {sps / value:.2f}x" if sps else "")
    label = {"chatglm3_demo_lora_mib": "ChatGLM3 demo", "chatglm3_demo_ptuning_v2_mib": "ChatGLM3 demo",
             "llama_factory_qlora_mib": "LLaMA-Factory 5.14 GB ="}[ref_key]
    return f"{label} {value:,.0f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output dir (default $OUT)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the 6B-shaped cases (28)")
    parser.add_argument("--tiny", action="store_true", help="tiny hidden sizes and lengths (the CPU dry run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (CUDA 4, CPU 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (CUDA 2, CPU 1)")
    parser.add_argument("--cli-steps", type=int, default=None, help="CLI training steps (CUDA 300, tiny 4)")
    parser.add_argument("--only", default="", help="comma-separated case keys: " + ",".join(c[0] for c in CASES))
    parser.add_argument("--budget", type=float, default=None, help="seconds for all cases (CUDA 420, CPU 900)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="each train case in its own process (auto: on CUDA)")
    parser.add_argument("--no-install", action="store_true", help="do not install carried wheels")
    parser.add_argument("--trace-only", action="store_true", help="write bench/results/gpu_check_traced.json (CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cli-child", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.result)
    if args.cli_child:
        cli_child(args.cli_child, args.rest)
        return 0

    started = time.perf_counter()
    cuda = args.device == "cuda"
    args.steps = args.steps if args.steps is not None else (4 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    budget = args.budget if args.budget is not None else (420.0 if cuda else 900.0)
    install = {"skipped": "--no-install"} if args.no_install else ensure_packages(args.device)
    if args.trace_only:
        print(f"wrote {write_traced(args)}")
        return 0
    if not args.out:
        parser.error("--out DIR (or $OUT) is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    report = {"status": "running", "mode": (f"{args.device}, {args.layers} layers" + (", tiny shapes" if args.tiny else "")),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "install": install,
              "environment": environment(args.device), "budget_seconds": budget,
              "mfu_formula": "6 * N * tokens/s / 989e12 (H200 dense bf16 peak); N = all parameters (frozen base, "
                             "unquantised for QLoRA, plus the adapter), input tokens only: for LoRA / P-Tuning / QLoRA "
                             "a convention (frozen weights get no gradient), not hardware utilisation",
              "reference": REFERENCE, "cases": {}}
    if cuda and not torch.cuda.is_available():
        report["status"] = "no CUDA"
        report["error"] = "torch.cuda.is_available() is False"
        write_report(report, out)
        print(report["error"], file=sys.stderr)
        return 1
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cuda)
    only = {k for k in args.only.split(",") if k}
    unknown = only - {c[0] for c in CASES}
    if unknown:
        parser.error(f"--only: unknown case(s) {sorted(unknown)}; known: {', '.join(c[0] for c in CASES)}")
    traced = {} if args.tiny or args.layers != 28 else traced_figures()
    for key, title, overrides, layers, ref_key, cap in CASES:
        if only and key not in only:
            continue
        case = {"title": title, "overrides": overrides}
        report["cases"][key] = case
        left = budget - (time.perf_counter() - started)
        cap = cap if cuda else cap * 4
        if left < min(cap, 45 if cuda else 20):
            case.update(status="skipped", reason=f"budget: {left:.0f} s of --budget {budget:.0f} s left, case needs up to {cap} s")
            write_report(report, out)
            continue
        print(f"[{time.perf_counter() - started:6.1f} s] {key}: {title}", flush=True)
        case["status"] = "running"  # what the JSON says if the whole command is killed during this case
        write_report(report, out)
        t0 = time.perf_counter()
        try:
            if key == "cli":
                case.update(cli_case(args, timeout=min(cap, left)))
            elif key == "pytest_gpu":
                case.update(pytest_case(args, timeout=min(cap, left)))
            else:
                spec = train_spec(key, overrides, min(layers or args.layers, args.layers), args)
                case["spec"] = {k: v for k, v in spec.items() if k not in ("overrides", "device", "key")}
                if key in traced:
                    case["traced_peak_mib"] = traced[key]["peak_mib"]
                    case["traced_source"] = traced[key]["source"]
                elif args.tiny or not cuda:  # tiny shapes trace in a second: exercises the traced column
                    case["traced_peak_mib"] = trace_case(spec)["peak_mib"]
                    case["traced_source"] = "traced now (bench/memory_trace.py)"
                if "qlora" in key and not cuda:
                    case.update(status="skipped", reason="QLoRA needs CUDA + bitsandbytes (4-bit kernels)")
                elif isolate:
                    case.update(run_isolated(spec, timeout=min(cap, left)))
                else:
                    try:
                        case.update({**train_case(spec), "status": "measured"})
                    except Exception as exc:  # noqa: BLE001
                        case.update(_failure(exc))
                    finally:
                        if cuda:
                            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001  (one failure never loses the others)
            case.update(_failure(exc))
        case["seconds"] = time.perf_counter() - t0
        case["reference"] = reference_text(ref_key, case)
        print(f"           -> {case.get('status')}: " + (case.get("reason") or case.get("error") or
              f"alloc {fmt(case.get('cuda_max_allocated_mib', case.get('perf/cuda_max_allocated_mib')))} MiB, "
              f"{fmt(case.get('samples_per_s'), '.2f')} samples/s") + f" ({case['seconds']:.0f} s)", flush=True)
        write_report(report, out)
    report["status"] = "done"
    report["total_seconds"] = time.perf_counter() - started
    write_report(report, out)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
