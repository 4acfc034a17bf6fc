"""Local LoRA training on a site: the only code in Pollinate that imports torch, transformers,
peft or bitsandbytes. The server side never imports this package.

Modules: `device` (where to train), `model` (base model + LoRA adapter), `data` (the site's
private text), `local` (one federated round of local training), `kbit` (bitsandbytes care).
"""

import logging
import os

# Sites train offline: a model hub lookup at run time would hang or leak the model name. Set before
# transformers/huggingface_hub are imported, because they read these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The fast tokenizer's thread pool warns (and can deadlock) when Flower forks after first use.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes warns at import on CPUs with avx512_bf16 that the optional `kernels` package is
# missing. Pollinate does not install it on purpose: it downloads kernels from the hub at run time.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
