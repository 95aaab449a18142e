"""The config overrides the traced peaks (bench/traced_peaks.py) and the GPU check (bench/gpu_cases.py) share.

The same override list composes the same run, so a traced figure and a measured one are of the same config:
the GPU check finds its traced figure by the exact list.
"""

# the two memory options off (the *_lowmem experiments turn both on)
OFF = ["train.gradient_checkpointing=false", "train.loss_chunk_size=0"]
LORA_LOWMEM = "experiment=chatglm3_lora_lowmem"
PTUNING_LOWMEM = "experiment=chatglm3_ptuning_lowmem"
QLORA_LOWMEM = "experiment=chatglm2_qlora_lowmem"
# the ChatGLM3 demo's setting: bs 4, every sample at 256 + 512 tokens
DEMO = [
    "model=chatglm3",
    "data=adgen",
    "data.max_source_length=256",
    "data.max_target_length=512",
    "train.per_device_train_batch_size=4",
]
