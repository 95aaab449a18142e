"""Any directory already in transformers' format (``model_type`` known to the Auto classes): a converted
ChatGLM, a merged run, another decoder. Needs ``model.template``; the methods treat its class generically."""

from __future__ import annotations

from glm_experiments.models.family import Family, register
from glm_experiments.models.glm.family import load_checkpoint_dir

FAMILY = register(Family("hf", load_checkpoint_dir))
