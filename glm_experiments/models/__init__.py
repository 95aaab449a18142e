"""Model families. Importing registers the ChatGLM-6B (v1) class with transformers' Auto classes,
so a converted v1 directory loads with AutoModelForCausalLM."""

from glm_experiments.models import chatglm_v1  # noqa: F401
