"""APO on UltraFeedback (`HuggingFaceH4/ultrafeedback_binarized`) with SmolLM2-135M-Instruct, for one GPU.

    python -m apo_jax.main --config=configs/ultrafeedback.py
    # offline / a local snapshot of the data set (its data/*.parquet files) and the model:
    python -m apo_jax.main --config=configs/ultrafeedback.py \
        --config.data.train=/path/to/ultrafeedback_binarized:train_prefs \
        --config.data.test=/path/to/ultrafeedback_binarized:test_prefs \
        --config.policy.checkpoint=/path/to/smollm2-135m-instruct \
        --config.rm.init_checkpoint=/path/to/smollm2-135m-instruct

The data set's `train_prefs` (61K pairs) and `test_prefs` (2K) splits are conversational: `chosen`
and `rejected` are [user, assistant] message lists beside a string `prompt`, so the prompt is
their shared history (TRL's implicit prompt); `score_chosen` / `score_rejected` are GPT-4's
ratings (1-10), read as each pair's margin when `rm.margin_from_data` is on (off here, as in the
paper). Each prompt has one pair, so HH_RM and HH_LLM are disjoint sets of prompts of equal kind.
There are no separate golden answers: with `data.gold` empty the golden answer of an RM prompt is
its chosen completion, the best-rated of four (often GPT-4's own), the role GPT-4's answers play
in the paper. Everything else (model, learning rates, sampling, lengths) is `configs/hh_small.py`'s
and its docstring says why; prompts use the model's chat template.
"""

import os
import runpy

HUB_ID = "HuggingFaceH4/ultrafeedback_binarized"


def get_config():
    small = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hh_small.py"))
    c = small["get_config"]()
    c.run_dir = "runs/ultrafeedback"
    c.data.kind = "preference"
    c.data.hh_train = c.data.hh_test = ""
    c.data.train = f"{HUB_ID}:train_prefs"
    c.data.test = f"{HUB_ID}:test_prefs"
    c.data.gold = ""  # golden answers fall back to each RM prompt's chosen (best-rated) completion
    c.data.prompt_format = "chat_template"
    # 61K crowd-sourced rows: a malformed one (equal answers, a turn marker inside a message) is
    # skipped and counted in run_dir/data/splits.json rather than stopping the run.
    c.data.on_bad_line = "skip"
    # The data set's own column names are the standard ones; listed for sets that differ.
    c.data.columns.prompt = "prompt"
    c.data.columns.chosen = "chosen"
    c.data.columns.rejected = "rejected"
    c.data.columns.prompt_id = "prompt_id"
    c.data.columns.score_chosen = "score_chosen"
    c.data.columns.score_rejected = "score_rejected"
    c.data.n_rm = 5_000
    c.data.n_dev = 1_000
    c.data.n_llm = 5_000
    c.data.n_test = 1_000
    # UltraFeedback's prompts and answers run longer than HH's.
    c.data.rm_max_len = 1024
    c.data.sft_max_len = 1024
    c.data.prompt_max_len = 512
    c.data.buckets = (256, 512, 768, 1024)
    c.sampling.stop_strings = ()  # the chat template's end of turn (EOS) ends an answer
    return c
