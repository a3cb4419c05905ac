"""`python -m apo_jax.collect_gold`: golden-answer collection's command line (`apo_jax.evaluation.collect_gold`)."""

import sys

from apo_jax.evaluation.collect_gold import main

if __name__ == "__main__":
    sys.exit(main())
