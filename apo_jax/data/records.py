"""Record formats shared by the data pipeline, the loop, the judge and gold collection.

All files are JSONL, one object per line, UTF-8.

- preference pair:  {"prompt_id", "prompt", "chosen", "rejected"}
- golden response:  {"prompt_id", "prompt", "response", "source"}
  (`source` says where the answer came from, e.g. "endpoint", "why_followup", "refusal",
  "hh_chosen")
- policy answer:    {"prompt_id", "prompt", "response"}  (one per prompt; judge inputs)

`prompt` is the full transcript up to and including the final "\n\nAssistant:".
"""

from __future__ import annotations

import hashlib


def prompt_id(prompt: str) -> str:
    """A stable 16-hex-digit id for a prompt text (sha1 of its UTF-8 bytes)."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]
