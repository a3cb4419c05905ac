"""A small real setup of a second family: Gemma-3-270M-it as policy and RM init, on HH-RLHF, for one GPU.

    python -m apo_jax.main --config=configs/hh_gemma3.py
    # offline / local copies (any gemma3_text checkpoint directory with its tokenizer):
    python -m apo_jax.main --config=configs/hh_gemma3.py \
        --config.policy.checkpoint=/path/to/gemma-3-270m-it \
        --config.rm.init_checkpoint=/path/to/gemma-3-270m-it \
        --config.data.hh_train=/path/to/hh-rlhf --config.data.hh_test=/path/to/hh-rlhf

Gemma-3-270M (`gemma3_text`: 18 layers, d 640, 4 query / 1 KV heads of width 256, vocabulary
262,144, five 512-token sliding-window layers to one global, q/k norms, tied embeddings; pad id 0
!= EOS id 1) is twice SmolLM2-135M's parameters, most of them in the embedding, so the game keeps
`configs/hh_small.py`'s sizes, learning rates and sampling settings (the reasons are given there):
only the checkpoints and the run directory differ. The RM exports as
`Gemma3TextForSequenceClassification`, the policies as `Gemma3ForCausalLM`. The instruction-tuned
checkpoint is the one with a chat template (`data.prompt_format = "chat_template"`).
"""

import os
import runpy

MODEL = "google/gemma-3-270m-it"


def get_config():
    small = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hh_small.py"))
    c = small["get_config"]()
    c.run_dir = "runs/hh_gemma3"
    c.policy.checkpoint = MODEL
    c.rm.init_checkpoint = MODEL
    return c
