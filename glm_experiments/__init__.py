import logging as _logging

# bitsandbytes (>= 0.49) logs a warning whenever it is imported on a CPU machine (PEFT imports it where it is installed):
# an optional kernel package from the Hugging Face Hub could not be loaded. Its pure-torch CPU path, which
# model.quantization uses (models/quantization.py), runs without it: nothing for a user to do, in every run.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
