"""The models: one folder per family (chatglm/: ChatGLM-6B; glm/: ChatGLM2-6B, ChatGLM3-6B, GLM-4; tiny/: the CPU demo
model; hf/: any transformers-format directory), each with its family record (family.py) and what only it needs
(modeling, checkpoint layout, tokenizer); beside them what the families share: the records (family.py), loading,
THUDM checkpoint streaming (thudm.py, layouts.py, checkpoint_files.py) and the tokenizer machinery (tokenizers.py)."""
