"""Phi-3-vision / Phi-3.5-vision on transformers 5 (spec §2, §3, §6).

    pixel_values (N, K, 3, 336, 336) ──CLIP ViT-L/14, penultimate layer, CLS dropped──▶ (N·K, 576, 1024)
        ──2x2 merge──▶ 12x12 cells of 4096 ──tile grid + sub_GN row ends, glb_GN, global grid──▶ (T, 4096)
        ──Linear 4096→3072, GELU, Linear 3072→3072──▶ (T, 3072) written over the <|image|> positions
    text + image embeddings ──Phi-3-mini decoder (32 layers, LongRoPE)──▶ logits

The language model is transformers' own Phi3 (same weight names as the checkpoint); the vision tower is
transformers' CLIPVisionModel kept at the original module path ``img_processor.vision_model``, so
the official safetensors load unchanged: 592 tensors, nothing missing, nothing unexpected.
"""

import torch
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel, Phi3RotaryEmbedding
from transformers.utils import can_return_tuple, is_flash_attn_2_available
from transformers.utils.deprecation import deprecate_kwarg

from ...errors import FlashAttentionUnavailableError, InvalidArgumentError, PromptImageMismatchError
from .configuration_phi3_v import Phi3VConfig, split_attn_implementation

HALF_DTYPES = (torch.float16, torch.bfloat16)  # the dtypes flash-attn computes in
PAST_KEY_VALUES_REMOVAL_VERSION = "5.40.0"  # as transformers' Phi3: `past_key_values` warns until this version
SAME_PROCESSOR_CALL = (  # the advice of every error about image inputs
    "Build input_ids, pixel_values and image_sizes with the same processor call, processor(text, images), "
    "and pass all of its outputs to the model."
)
IGNORE_INDEX = -100  # labels the loss skips (transformers' cross-entropy ignore_index)


def check_flash_attention(installed: bool, on_cuda: bool = True, dtype: torch.dtype | None = None) -> None:
    """Raise a helpful error when ``flash_attention_2`` cannot run: no CUDA GPU, flash-attn not
    ``installed``, or a ``dtype`` other than fp16/bf16. The one place that says so: ``load_model``
    calls it before anything is downloaded, ``from_pretrained`` (below) when the model is built."""
    if not on_cuda:
        raise FlashAttentionUnavailableError(
            "attn='flash_attention_2' needs an NVIDIA GPU (device 'cuda'); it does not run on CPU or Apple GPUs. "
            "Use attn='sdpa' (PyTorch's built-in fast attention) instead."
        )
    if not installed:
        raise FlashAttentionUnavailableError(
            "attn='flash_attention_2' was asked for, but flash-attn is not installed (or too old). Install it with "
            "`pip install flash-attn --no-build-isolation` (CUDA only; compiling can take a long time), "
            "or use attn='sdpa' (fast, works on CPU, MPS and every GPU)."
        )
    if dtype is not None and dtype not in HALF_DTYPES:
        raise InvalidArgumentError(
            f"flash_attention_2 works only in bf16 or fp16, not {str(dtype).removeprefix('torch.')}; "
            "pass dtype='bf16' or attn='sdpa'."
        )


class Phi3VCLIPVisionModel(CLIPVisionModel):
    """transformers' CLIPVisionModel under our own name.

    transformers 5 renames checkpoint keys of its own CLIPVisionModel (it strips ``vision_model.``);
    keeping the keys exactly as the checkpoint has them is simpler, and a class defined outside
    transformers gets no renaming.
    """


class Phi3VVisionTower(nn.Module):
    """Holds the CLIP model as ``.vision_model``, the module path of the original checkpoint."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.vision_model = Phi3VCLIPVisionModel(config.vision_config)


class Phi3VImageEmbedding(nn.Module):
    """Image features for the ``<|image|>`` positions: CLIP + HD transform + projection (spec §3).

    Attribute names are the checkpoint's (``img_processor``, ``glb_GN``, ``sub_GN``, ``img_projection``).
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.img_processor = Phi3VVisionTower(config)
        layers = config.vision_config.num_hidden_layers
        layer_idx = config.img_processor.get("layer_idx", -2)  # index into hidden_states: penultimate layer
        self.num_clip_layers = layer_idx % (layers + 1)  # hidden_states[i] is the output of layer i (1-based)
        self.image_dim_out = config.img_processor["image_dim_out"]  # C = 1024
        merged_dim = 4 * self.image_dim_out  # a 2x2 patch block concatenated
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged_dim))  # between local tiles and global image
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_dim))  # ends every row of cells
        self.img_projection = nn.Sequential(
            nn.Linear(merged_dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.drop = nn.Dropout(config.embd_pdrop)
        vision = config.vision_config
        self.tile_size = vision.image_size  # 336
        self.grid = vision.image_size // vision.patch_size  # 24 patches per side

    def clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, K, 3, 336, 336) -> (N, K, 576, C): penultimate CLIP layer, CLS token dropped.

        Only the layers up to the one whose output is used run (23 of CLIP's 24); the others keep
        their weights, so the checkpoint loads and saves unchanged, but they cost nothing.
        """
        num_images, num_tiles = pixel_values.shape[:2]
        clip = self.img_processor.vision_model
        pixels = pixel_values.flatten(0, 1).to(clip.dtype)  # every tile, zero padding tiles included
        hidden = clip.pre_layrnorm(clip.embeddings(pixels))  # CLIP's hidden_states[0]: (N·K, 577, C)
        for layer in clip.encoder.layers[: self.num_clip_layers]:
            hidden = layer(hidden, attention_mask=None)
        return hidden[:, 1:].reshape(num_images, num_tiles, self.grid * self.grid, self.image_dim_out)

    def merge_2x2(self, tiles: torch.Tensor) -> torch.Tensor:
        """(t, 576, C) -> (t, 12, 12, 4C): cell (i, j) concatenates patches (2i, 2j), (2i, 2j+1),
        (2i+1, 2j), (2i+1, 2j+1) of its tile, in this order."""
        half, dim = self.grid // 2, self.image_dim_out
        return (
            tiles.reshape(-1, half, 2, half, 2, dim)  # (t, i, di, j, dj, C)
            .permute(0, 1, 3, 2, 4, 5)  # (t, i, j, di, dj, C)
            .reshape(-1, half, half, 4 * dim)
        )

    @staticmethod
    def tile_grid(cells: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(rows·cols, 12, 12, D) tiles in row-major order -> (1, rows·12, cols·12, D) canvas."""
        _, half, _, dim = cells.shape
        return cells.reshape(rows, cols, half, half, dim).permute(0, 2, 1, 3, 4).reshape(1, rows * half, cols * half, dim)

    def add_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        """(n, R, W, 4C) -> (n, R·(W+1), 4C): sub_GN appended to every row, then flattened row-major."""
        n, rows, _, dim = grid.shape
        return torch.cat([grid, self.sub_GN.expand(n, rows, 1, dim)], dim=2).reshape(n, -1, dim)

    def tile_grids(self, pixel_values: torch.Tensor, image_sizes) -> list[tuple[int, int]]:
        """Each image's grid of tiles (rows, cols) = image_sizes (N, 2) / 336, after checking that
        ``pixel_values`` (N, K, 3, 336, 336) and ``image_sizes`` are what the processor returns for N images:
        [height, width] of each padded canvas, whole multiples of 336, each needing rows·cols tiles + the
        global image among its K crops. ``image_sizes`` may be a tensor or the list the original iterates."""
        tile = self.tile_size
        expected = f"a torch tensor of shape (images, crops, 3, {tile}, {tile})"
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, tile, tile):
            got = type(pixel_values).__name__ + (f" of shape {tuple(pixel_values.shape)}" if hasattr(pixel_values, "shape") else "")
            raise InvalidArgumentError(f"pixel_values must be {expected}, got {got}. {SAME_PROCESSOR_CALL}")
        try:
            sizes = torch.as_tensor(image_sizes)
        except (TypeError, ValueError, RuntimeError):
            sizes = None
        whole = sizes is not None and not (sizes.dtype.is_floating_point or sizes.dtype.is_complex or sizes.dtype == torch.bool)
        if not whole or sizes.ndim != 2 or sizes.shape[1] != 2:
            got = f"shape {tuple(sizes.shape)}, {str(sizes.dtype).removeprefix('torch.')}" if sizes is not None else repr(image_sizes)
            raise InvalidArgumentError(
                f"image_sizes must be whole numbers of shape (images, 2): one [height, width] per image, "
                f"as the processor returns; got {got}. {SAME_PROCESSOR_CALL}"
            )
        num_images, crops = pixel_values.shape[:2]
        if len(sizes) != num_images:
            raise PromptImageMismatchError(
                f"image_sizes has {len(sizes)} rows but pixel_values holds {num_images} images. {SAME_PROCESSOR_CALL}"
            )
        grids = []
        for i, (height, width) in enumerate(sizes.tolist()):
            if height <= 0 or width <= 0 or height % tile or width % tile:
                raise InvalidArgumentError(
                    f"image_sizes[{i}] is {[height, width]}; each [height, width] is the padded canvas, two "
                    f"positive multiples of {tile}. {SAME_PROCESSOR_CALL}"
                )
            rows, cols = height // tile, width // tile
            if rows * cols + 1 > crops:
                raise PromptImageMismatchError(
                    f"image_sizes[{i}] is {[height, width]}: {rows}x{cols} tiles and the global image, "
                    f"{rows * cols + 1} crops, but pixel_values has {crops} crops per image. {SAME_PROCESSOR_CALL}"
                )
            grids.append((rows, cols))
        return grids

    def num_features(self, rows: int, cols: int) -> int:
        """Feature vectors (= image positions) of an image with a rows x cols tile grid, as ``forward``
        lays them out: the local canvas, (rows·12) x (cols·12 + 1) with its row separators; glb_GN; the
        global image, 12 x (12 + 1). ((rows·cols + 1)·144 + 1 + (rows + 1)·12 for the 336-pixel tiles.)"""
        half = self.grid // 2
        return rows * half * (cols * half + 1) + 1 + half * (half + 1)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """All images of a call -> (total image tokens, hidden_size), images in order.

        Per image ("sub_glb" order): local canvas rows with separators, glb_GN, global image rows
        with separators. All images are projected in one call, as in the original.
        """
        grids = self.tile_grids(pixel_values, image_sizes)  # checks both first: a clear error, not torch's
        features = self.clip_features(pixel_values)  # (N, K, 576, C)
        global_grids = self.add_row_separators(self.merge_2x2(features[:, 0]))  # (N, 12·13, 4C)
        pieces = []
        for i, (rows, cols) in enumerate(grids):
            local = self.tile_grid(self.merge_2x2(features[i, 1 : 1 + rows * cols]), rows, cols)
            pieces += [self.add_row_separators(local)[0], self.glb_GN[0], global_grids[i]]
        # The projection's dtype; its device is the projection's business: accelerate's hooks bring the input
        # to its weights (which are on the 'meta' device, not yet loaded, while the module is offloaded).
        merged = torch.cat(pieces).to(dtype=self.img_projection[0].weight.dtype)
        return self.img_projection(merged)


class Phi3VRotaryEmbedding(Phi3RotaryEmbedding):
    """LongRoPE (spec §6): the short factors up to ``original_max_position_embeddings`` (4096) tokens,
    the long ones past it, chosen by max(position_ids) + 1 on every call.

    Phi3's own module makes the choice by overwriting its ``inv_freq`` buffer, so two threads sharing a
    model could rotate one prompt with the factors chosen for the other's length; here each call picks
    its factors without changing the module. Both sets are kept in float32 whatever the model's dtype,
    as the original computes them (Phi3's buffers would be rounded by ``model.to(torch.bfloat16)``);
    otherwise the cos/sin are Phi3's, bit for bit.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.longrope = self.rope_type == "longrope"
        self.limit = config.rope_parameters.get("original_max_position_embeddings")
        self.factor_sets = {}  # device -> (short, long) inverse frequencies; not buffers: made on first use

    def inverse_frequencies(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse frequencies with the short and with the long factors, float32, on ``device``."""
        if device not in self.factor_sets:
            short, _ = ROPE_INIT_FUNCTIONS["longrope"](self.config, device)
            long, _ = ROPE_INIT_FUNCTIONS["longrope"](self.config, device, seq_len=self.limit + 1)
            self.factor_sets[device] = (short.float(), long.float())
        return self.factor_sets[device]

    def forward(self, x, position_ids):
        if not self.longrope:
            return super().forward(x, position_ids)
        short, long = self.inverse_frequencies(x.device)
        inv_freq = torch.where(torch.max(position_ids) + 1 > self.limit, long, short)  # no host sync, traceable
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class Phi3VModel(Phi3Model):
    """Phi3Model whose token embeddings take image features at the ``<|image|>`` positions."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.rotary_emb = Phi3VRotaryEmbedding(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where image features go, (B, L) -> (B, L) bool: the runs of id 32044 that the processor writes
        (one id per image token, hundreds in a row), or the original processor's negative ids -1, -2, ...
        A lone 32044 is text, as every 32044 is in the original (whose images are negative ids): an
        ``<|image|>`` the model generated, which Phi-3.5's re-encoding at 4096 tokens reads again."""
        image = input_ids == self.config.image_token_id
        in_run = torch.zeros_like(image)
        in_run[:, 1:] |= image[:, :-1]  # the token before is one too
        in_run[:, :-1] |= image[:, 1:]  # or the token after
        return (image & in_run) | ((input_ids < 0) & (input_ids > -1_000_000_000))

    def images_per_row(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_sizes) -> list[int]:
        """How many of the images each row of input_ids (B, L) holds. ``embed`` fills the image positions
        row by row with the images in order, image i taking ``num_features`` of its tile grid; so row 0's
        images are the first ones whose features add up to row 0's image positions, and so on. Positions
        are counted, not runs: two adjacent tags make one run of two images."""
        vision = self.vision_embed_tokens
        features = [vision.num_features(rows, cols) for rows, cols in vision.tile_grids(pixel_values, image_sizes)]
        counts, image = [], 0
        for row, positions in enumerate(self.image_positions(input_ids).sum(dim=1).tolist()):
            first, left = image, positions
            while left > 0 and image < len(features):
                left -= features[image]
                image += 1
            if left != 0:
                raise PromptImageMismatchError(
                    f"Row {row} of input_ids has {positions} image positions, which the images do not fill exactly "
                    f"(they take {features} positions, in order). {SAME_PROCESSOR_CALL}"
                )
            counts.append(image - first)
        if image != len(features):
            raise PromptImageMismatchError(
                f"pixel_values hold {len(features)} images but input_ids have image positions for {image}. "
                f"{SAME_PROCESSOR_CALL}"
            )
        return counts

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None, first_step=True) -> torch.Tensor:
        """Token embeddings (B, L, hidden_size) with image features scattered in, row-major over
        (batch, sequence). ``first_step``: the ids start the sequence (an empty cache); only then are
        images missing or left over an error. A later step without images (generate passes them on the
        first step only) is text, embedded without a GPU sync: a new token per row, or a chunk of assisted
        decoding's candidates, which prompt-lookup decoding may copy from a prompt's run of <|image|>."""
        if first_step and not (isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2):  # no GPU sync
            tensor = isinstance(input_ids, torch.Tensor)
            got = f"a tensor of shape {tuple(input_ids.shape)}" if tensor else f"a {type(input_ids).__name__}"
            raise InvalidArgumentError(
                f"input_ids must be a 2-D tensor (batch, sequence) of token ids, as the processor returns; got {got}. "
                "For one sequence of ids use ids[None]; for a list, torch.tensor([[...]])."
            )
        if first_step and bool((input_ids >= self.config.vocab_size).any()):  # the original fails too (IndexError);
            # a decoding step's ids come from lm_head, always in the vocabulary (no GPU sync for them)
            raise InvalidArgumentError(
                f"input_ids hold token id {int(input_ids.max())}, beyond the model's vocabulary of "
                f"{self.config.vocab_size} ids: they come from another tokenizer. Build the inputs with this "
                "model's processor."
            )
        # Out of place: the caller's input_ids (and generate's running sequence) stay untouched.
        embeds = self.embed_tokens(input_ids.clamp(min=0))
        images = pixel_values is not None and image_sizes is not None
        if not first_step and not images:  # a decoding step: generate passes images on the first step only
            return embeds
        positions = self.image_positions(input_ids)
        if not positions.any():  # text only: the vision tower does not run
            if first_step and pixel_values is not None and len(pixel_values) > 0:  # generate_batch may keep 0 images
                raise PromptImageMismatchError(
                    f"pixel_values hold {len(pixel_values)} image(s) but input_ids have no image positions "
                    "(input_ids from the tokenizer alone leave the images out): the images would be ignored. "
                    f"{SAME_PROCESSOR_CALL}"
                )
            return embeds
        if not images:
            raise PromptImageMismatchError(
                f"input_ids contain {int(positions.sum())} image positions but no pixel_values/image_sizes "
                f"were given. {SAME_PROCESSOR_CALL}"
            )
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        if features.shape[0] != int(positions.sum()):
            raise PromptImageMismatchError(
                f"The images produce {features.shape[0]} feature vectors but input_ids have "
                f"{int(positions.sum())} image positions. {SAME_PROCESSOR_CALL} (Same images, same num_crops.)"
            )
        embeds = embeds.masked_scatter(positions[..., None], features.to(embeds.dtype))
        return self.vision_embed_tokens.drop(embeds)

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVAL_VERSION, new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidArgumentError(
                "You must specify exactly one of input_ids or inputs_embeds (transformers' rule), "
                f"got {'both' if input_ids is not None else 'neither'}."
            )
        if inputs_embeds is not None and pixel_values is not None:
            raise InvalidArgumentError(
                "pixel_values with inputs_embeds: the images would be left out, since the model places them "
                "into the embeddings of input_ids. Pass input_ids, pixel_values and image_sizes; or embed them "
                "yourself with model.model.embed(input_ids, pixel_values, image_sizes) and pass inputs_embeds alone."
            )
        if inputs_embeds is None:
            first_step = cache is None or cache.get_seq_length() == 0
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, first_step)
        return super().forward(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi-3-vision with a language-model head; load it with ``AutoModelForCausalLM.from_pretrained``."""

    config_class = Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: Phi3VConfig):
        Phi3PreTrainedModel.__init__(self, config)  # skip Phi3ForCausalLM.__init__: no plain Phi3Model
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def adjust_generation_fn(self, generation_config, *args, **kwargs):
        """After ``from_pretrained`` reads the generation config: Phi-3-vision's repo has no
        generation_config.json, and transformers then builds one from config.json's raw keys, which lack
        ``pad_token_id``. The original's generation config came from the config object (pad 32000, spec
        §1.2), so the unset token ids of a generation config made from the model's config are taken from
        the config (one passed to ``from_pretrained``, or a file that is not from the config, stays as it is)."""
        super().adjust_generation_fn(generation_config, *args, **kwargs)
        if generation_config is not None or not self.generation_config._from_model_config:
            return
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.generation_config, name, None) is None:
                setattr(self.generation_config, name, getattr(self.config, name, None))

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        if requested_attention == "flash_attention_2":
            check_flash_attention(is_flash_attn_2_available())
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        """Switch attention after loading, with the same rule as ``from_pretrained``: a string sets both
        parts except "eager", which keeps SDPA in the vision tower; a dict sets each part."""
        return super().set_attn_implementation(split_attn_implementation(attn_implementation), allow_all_kernels)

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVAL_VERSION, new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Like Phi3ForCausalLM.forward, plus ``pixel_values`` (N, K, 3, 336, 336) and ``image_sizes`` (N, 2).

        Logits are float32, as in the original. ``labels`` (B, L) may be the input_ids: their image
        positions (runs of ``<|image|>``, or the original's negative ids) become -100, so the loss skips
        them, as it skips -100 anywhere; a lone ``<|image|>`` is text and stays a label. ``return_dict=False``
        gives a tuple, as transformers' models do.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # a BaseModelOutputWithPast whatever the config says; the tuple, if asked for, is made above
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            labels = labels.masked_fill(self.model.image_positions(labels), IGNORE_INDEX)  # out of place
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """``generate``'s copies of each prompt for beam search and ``num_return_sequences``: rows r0, r1
        become r0, r0, r1, r1 (transformers repeats every tensor along dim 0). pixel_values (N, K, 3, 336, 336)
        and image_sizes (N, 2) count images, not prompts, so each row's group of images is repeated
        instead, in row order: r0's images [a, c] and r1's [d] become [a, c, a, c, d, d]."""
        pixel_values, image_sizes = model_kwargs.get("pixel_values"), model_kwargs.get("image_sizes")
        images = {}
        if expand_size > 1 and input_ids is not None and pixel_values is not None and image_sizes is not None:
            counts = self.model.images_per_row(input_ids, pixel_values, image_sizes)
            groups = [range(sum(counts[:row]), sum(counts[: row + 1])) for row in range(len(counts))]  # each row's images
            order = torch.tensor([image for group in groups for _ in range(expand_size) for image in group], dtype=torch.long)
            sizes = torch.as_tensor(model_kwargs.pop("image_sizes"))
            images = {"pixel_values": model_kwargs.pop("pixel_values")[order.to(pixel_values.device)],
                      "image_sizes": sizes[order.to(sizes.device)]}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        return input_ids, {**model_kwargs, **images}

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVAL_VERSION, new_name="cache")
    def prepare_inputs_for_generation(self, input_ids, cache=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """Phi-3.5-vision re-encodes the whole sequence once it grows past 4096 tokens (long RoPE
        factors from then on); the images must be re-encoded too, so they are kept for that step.
        Phi-3-vision keeps its cache (its cached keys stay rotated with the short factors).

        ``inputs_embeds`` (B, P, hidden_size), e.g. from ``model.model.embed(input_ids, pixel_values,
        image_sizes)``, are the prompt of the first step. generate's input_ids then hold the answer only
        (or the prompt ids and the answer), so Phi-3.5-vision re-encodes the prompt's embeddings followed
        by those of the tokens generated since."""
        limit = self.config.original_max_position_embeddings
        if not self.config.reset_cache_at_original_max:
            return GenerationMixin.prepare_inputs_for_generation(
                self, input_ids, cache=cache, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
            )
        if inputs_embeds is not None and cache is not None and not is_first_iteration:
            cached = cache.get_seq_length()
            length = cached + (kwargs.get("next_sequence_length") or 1)  # prompt and answer so far
            if cached <= limit < length:
                answer = self.model.embed(input_ids[:, inputs_embeds.shape[1] - length :], first_step=False)
                return GenerationMixin.prepare_inputs_for_generation(
                    self, input_ids, cache=None, inputs_embeds=torch.cat([inputs_embeds, answer], dim=1),
                    is_first_iteration=True, **{**kwargs, "next_sequence_length": None},
                )
        resets = (
            cache is not None
            and input_ids.shape[1] > limit
            and cache.get_seq_length() <= limit
        )
        return super().prepare_inputs_for_generation(
            input_ids, cache=cache, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration or resets, **kwargs
        )


__all__ = ["Phi3VForCausalLM", "Phi3VModel", "Phi3VImageEmbedding", "check_flash_attention", "HALF_DTYPES"]
