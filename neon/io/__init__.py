"""FlamingMoE's IO kinds (neon/io/base.py: the contract; neon/io/kinds.py: the registry of the
built-in ones). Plain PyTorch, shared by training and the Hugging Face export."""

import neon.io.kinds  # noqa: F401  (registers the built-in kinds)
