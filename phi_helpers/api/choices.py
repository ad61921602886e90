"""What ``load_model`` and the command line's model options accept, defined once.

    DEFAULT_MODEL_ID   the checkpoint loaded when you name none (HUB_NUM_CROPS: the checkpoints' num_crops)
    DEVICES            "auto" picks CUDA, then Apple MPS, then CPU ("cuda:N" is accepted too)
    DTYPES             dtype names -> torch dtypes; DTYPE_SHORT_NAMES are the ones the CLI offers
    ATTENTIONS         attention implementations; "auto" picks flash_attention_2 when it can run
"""

import torch

DEFAULT_MODEL_ID = "microsoft/Phi-3.5-vision-instruct"
# The official checkpoints' num_crops (their preprocessor_config.json), known before anything is downloaded.
HUB_NUM_CROPS = {"microsoft/phi-3.5-vision-instruct": 4, "microsoft/phi-3-vision-128k-instruct": 16}
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_SHORT_NAMES = ("auto", "bf16", "fp16", "fp32")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")

__all__ = ["DEFAULT_MODEL_ID", "HUB_NUM_CROPS", "DEVICES", "DTYPES", "DTYPE_SHORT_NAMES", "ATTENTIONS"]
