"""The Hugging Face side of Neon: `NeonHFConfig` and the plain-PyTorch reference `NeonForCausalLM`.

Importing this package registers model_type "neon" with transformers' Auto classes; a saved
model carries its own copy of the files (configuration_neon.py, modeling_neon.py and the IO kinds
it uses, neon/io/) and loads with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from neon.hf.configuration_neon import NeonHFConfig
from neon.hf.modeling_neon import NeonForCausalLM

AutoConfig.register("neon", NeonHFConfig, exist_ok=True)
AutoModelForCausalLM.register(NeonHFConfig, NeonForCausalLM, exist_ok=True)

__all__ = ["NeonForCausalLM", "NeonHFConfig"]
