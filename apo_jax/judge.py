"""`python -m apo_jax.judge`: the LLM judge's command line (`apo_jax.evaluation.judge`)."""

import sys

from apo_jax.evaluation.judge import main

if __name__ == "__main__":
    sys.exit(main())
