"""Configuration of Phi-3-vision / Phi-3.5-vision (model_type "phi3_v") on transformers 5.

The official config.json files are read unchanged. Four things need care on transformers 5
(see docs/native-implementation.md):

* ``rope_scaling: {"type": "su", ...}`` is the legacy name of LongRoPE and is renamed to ``longrope``
  *before* transformers standardises the RoPE parameters (otherwise loading raises a KeyError).
* ``"_attn_implementation": "flash_attention_2"`` stored in config.json is dropped, so the caller's
  ``attn_implementation=`` (or the best available one) decides, and nothing forces flash-attn.
* A plain ``attn_implementation="eager"`` sets the language model only: the vision tower keeps SDPA
  (the same numbers in fp32, faster; the original's CLIP ran transformers' default, SDPA since 4.43).
  Setting the vision tower's attention is explicit: ``attn_implementation={"": "eager", "vision_config": "eager"}``.
* config.json has no vision config: the original code hard-codes CLIP ViT-L/14 at 336 px, which is the
  default of ``vision_config`` here. Tiny test checkpoints store a small ``vision_config`` instead.

A config whose LongRoPE factor lists do not match its head size (an edited hidden_size or
num_attention_heads) is refused with a ConfigurationError naming both numbers.
"""

from transformers import CLIPVisionConfig, Phi3Config
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from ...errors import ConfigurationError

# openai/clip-vit-large-patch14-336, as hard-coded by the original image embedding (spec §2).
CLIP_VIT_L_14_336 = dict(
    attention_dropout=0.0,
    dropout=0.0,
    hidden_act="quick_gelu",
    hidden_size=1024,
    image_size=336,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=4096,
    layer_norm_eps=1e-5,
    num_attention_heads=16,
    num_channels=3,
    num_hidden_layers=24,
    patch_size=14,
    projection_dim=768,
)

# Values of the official config.json (spec §1.1); used when a config omits them.
DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}
# embd_layer: the original can vary these switches, but only these values describe the checkpoints (it
# asserts use_hd_transform == with_learnable_separator and builds other classes otherwise), so a config
# that sets another value is refused.
DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}


def split_attn_implementation(requested: str | dict | None) -> str | dict | None:
    """The attention of each part for an ``attn_implementation`` request.

    A dict (``{"": language model, "vision_config": vision tower}``) is taken as it is. A string sets
    both parts, except "eager": eager attention in CLIP gives the same numbers as SDPA in fp32, only slower
    (it materialises every 577x577 score table), so the vision tower keeps SDPA. (In bf16 the two differ in
    the last bits; ``{"": "eager", "vision_config": "eager"}`` runs eager everywhere.)
    """
    if requested == "eager":
        return {"": "eager", "vision_config": "sdpa"}
    return requested


class Phi3VConfig(Phi3Config):
    r"""Phi3Config plus the image side of Phi-3-vision.

    vision_config (`CLIPVisionConfig` or dict, defaults to CLIP ViT-L/14-336):
        The vision tower. Its hidden size is `img_processor["image_dim_out"]`.
    img_processor (dict): kept from the official config.json (`image_dim_out`, `num_img_tokens`, ...).
    embd_layer (dict): kept from the official config.json (HD transform switches, all fixed).
    image_token_id (int, defaults to 32044): the `<|image|>` token marking image positions in `input_ids`.
    reset_cache_at_original_max (bool, optional): whether `generate` drops the KV cache once the
        sequence grows past `original_max_position_embeddings` (4096) and re-encodes everything with
        the long RoPE factors. Phi-3.5-vision does this, Phi-3-vision does not. When unset it is inferred
        from the checkpoint: Phi-3.5-vision's config is the one whose `sliding_window` (262144) exceeds
        `max_position_embeddings` (Phi-3-vision: 131072 = 131072).
    """

    model_type = "phi3_v"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L_14_336)
    }

    vision_config: dict | CLIPVisionConfig | None = None
    img_processor: dict | None = None
    embd_layer: dict | None = None
    image_token_id: int = 32044
    reset_cache_at_original_max: bool | None = None

    def __post_init__(self, **kwargs):
        # Trap 2: a stored "_attn_implementation" would beat from_pretrained(attn_implementation=...).
        kwargs.pop("_attn_implementation", None)
        for name in ("img_processor", "embd_layer"):
            if not isinstance(getattr(self, name) or {}, dict):
                raise ConfigurationError(
                    f"{name} is {getattr(self, name)!r}; it must be a dict like the checkpoints' config.json "
                    "(leave it out for their values)."
                )
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        for key, value in DEFAULT_EMBD_LAYER.items():
            if self.embd_layer[key] != value:
                raise ConfigurationError(
                    f"embd_layer[{key!r}] is {self.embd_layer[key]!r}; this implementation defines only the "
                    f"checkpoints' image embedding ({value!r})."
                )
        if self.img_processor["model_name"] != DEFAULT_IMG_PROCESSOR["model_name"]:
            raise ConfigurationError(
                f"img_processor['model_name'] is {self.img_processor['model_name']!r}; the image embedding is "
                f"built for {DEFAULT_IMG_PROCESSOR['model_name']} (its size is set by vision_config)."
            )
        if self.img_processor.get("type_feature", "patch") != "patch":  # the original also knows "cls_patch"
            raise ConfigurationError(
                f"img_processor['type_feature'] is {self.img_processor['type_feature']!r}; this implementation "
                "defines only the checkpoints' 'patch' features (the CLS token dropped)."
            )
        if self.reset_cache_at_original_max is None:
            self.reset_cache_at_original_max = bool(
                self.sliding_window is not None and self.sliding_window > self.max_position_embeddings
            )
        super().__post_init__(**kwargs)
        self._check_rope_factors()
        if self.vision_config.hidden_size != self.img_processor["image_dim_out"]:
            raise ConfigurationError(
                f"vision_config.hidden_size ({self.vision_config.hidden_size}) must equal "
                f"img_processor['image_dim_out'] ({self.img_processor['image_dim_out']})."
            )

    def _check_rope_factors(self) -> None:
        """LongRoPE has one factor per pair of rotated dimensions: head_dim/2 of them. Another count means
        hidden_size or num_attention_heads was changed without the factor lists; transformers would only
        log it here and fail later, while the model is built, with a tensor broadcasting RuntimeError."""
        rope = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        if rope.get("rope_type") != "longrope":
            return
        head_dim = self.hidden_size // self.num_attention_heads
        pairs = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        for name in ("long_factor", "short_factor"):
            factors = rope.get(name)
            if isinstance(factors, list) and len(factors) != pairs:
                raise ConfigurationError(
                    f"config.json's rope_scaling {name} has {len(factors)} entries, but head_dim/2 is {pairs} "
                    f"(hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} = head_dim "
                    f"{head_dim}): the config does not belong to these weights. Use the config.json that came with "
                    "the checkpoint (copy or download it again)."
                )

    @property
    def _attn_implementation(self):
        return PreTrainedConfig._attn_implementation.fget(self)  # transformers' getter (we only change the setter)

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None):
        # transformers sets the request on the config and, recursively, on vision_config.
        PreTrainedConfig._attn_implementation.fset(self, split_attn_implementation(value))

    def convert_rope_params_to_dict(self, default_theta=10_000.0, ignore_keys=None, **kwargs):
        # Trap 1: rename the legacy LongRoPE type "su" before transformers validates the parameters.
        for rope in (kwargs.get("rope_scaling"), self.rope_parameters):
            if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "su":
                rope.pop("type", None)
                rope["rope_type"] = "longrope"
        return super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)


__all__ = ["Phi3VConfig", "CLIP_VIT_L_14_336", "split_attn_implementation"]
