"""What ``load_model`` and the command line's model options accept, defined once.

    DEFAULT_MODEL_ID   the checkpoint loaded when you name none (HUB_NUM_CROPS: the checkpoints' num_crops)
    TINY_MODEL         the name of the tiny random model (is_tiny_model: any case, blanks around it)
    DEVICES            "auto" picks CUDA, then Apple MPS, then CPU ("cuda:N" is accepted too)
    DTYPES             dtype names -> torch dtypes; DTYPE_SHORT_NAMES are the ones the CLI offers
    ATTENTIONS         attention implementations; "auto" picks flash_attention_2 when it can run
    ASK_MAX_NEW_TOKENS, BATCH_MAX_NEW_TOKENS   the longest answer when max_new_tokens is left out
"""

import torch

DEFAULT_MODEL_ID = "microsoft/Phi-3.5-vision-instruct"
# The official checkpoints' num_crops (their preprocessor_config.json), known before anything is downloaded.
HUB_NUM_CROPS = {"microsoft/phi-3.5-vision-instruct": 4, "microsoft/phi-3-vision-128k-instruct": 16}
TINY_MODEL = "tiny"  # a tiny random Phi-3.5-vision for tests and dry runs, even where a folder has this name
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_SHORT_NAMES = ("auto", "bf16", "fp16", "fp32")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")



def is_tiny_model(model_id) -> bool:
    """Whether ``load_model(model_id)`` loads the tiny random model (``"tiny"``, any case, blanks around it)."""
    return isinstance(model_id, str) and model_id.strip().lower() == TINY_MODEL


__all__ = ["DEFAULT_MODEL_ID", "TINY_MODEL", "is_tiny_model", "HUB_NUM_CROPS", "DEVICES", "DTYPES", "DTYPE_SHORT_NAMES", "ATTENTIONS"]
# The longest answer, in tokens, when max_new_tokens is left out. ask, stream_chunks and the notebook chat box:
# a reply read as it comes, which 256 tokens (about 190 English words) leaves room for; one that rambles on
# stops before the wait grows long, and a reply cut off is still a reply.
ASK_MAX_NEW_TOKENS = 256
# extract, generate_batch and the command line (every task, predict_dataset, eval): answers nobody watches
# being written, and JSON that is cut off is no answer at all (JSONTruncatedError), so they get twice the
# room; extract takes the command line's so that an extraction that fits there fits in Python too.
BATCH_MAX_NEW_TOKENS = 512
