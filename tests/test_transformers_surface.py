"""What phi_helpers relies on in transformers (and in the same way in huggingface_hub, torchao, torch and
xgrammar): one test per item of docs/native-implementation.md ("What we rely on in transformers"). A
failure names the installed version of the package and the item that moved, so an upgrade
(./run.sh test-latest) says at once what to adapt.
"""

import contextlib
import dataclasses
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import huggingface_hub
import pytest
import torch
import transformers
import xgrammar
from huggingface_hub.utils import httpx  # the hub's HTTP client, as api/loading uses it
from packaging.version import Version
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    DynamicCache,
    GenerationMixin,
    StoppingCriteria,
    StoppingCriteriaList,
    pipeline,
)
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from transformers.utils import deprecation, is_flash_attn_2_available
from transformers.utils.chat_template_utils import render_jinja_template
from transformers.utils.deprecation import deprecate_kwarg

import phi_helpers  # noqa: F401  (registers the Auto classes)
from phi_helpers import FlashAttentionUnavailableError
from phi_helpers.models.phi3_v.configuration_phi3_v import Phi3VConfig
from phi_helpers.models.phi3_v.image_processing_phi3_v import Phi3VImageProcessor
from phi_helpers.models.phi3_v.modeling_phi3_v import PAST_KEY_VALUES_REMOVAL_VERSION, Phi3VForCausalLM, Phi3VModel
from phi_helpers.models.phi3_v.processing_phi3_v import CHECKPOINT_CHAT_TEMPLATE, Phi3VProcessor
from phi_helpers.testing import FIXTURES, make_tiny_checkpoint

PROMPT = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"


def surface(item: str, package: str = "transformers") -> str:
    return f"{package} {importlib.metadata.version(package)}: {item} moved; see docs/native-implementation.md"


def parameters(function) -> list[str]:
    return [name for name, p in inspect.signature(function).parameters.items() if p.kind is not p.VAR_KEYWORD]


@pytest.fixture(scope="module")
def phi3_vision(tmp_path_factory):
    """The Phi-3-vision variant: keeps its cache past 4096, so it uses GenerationMixin's method directly."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-phi-3-vision"), variant="phi-3-vision")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def picture(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (300, 400, 3), generator=generator, dtype=torch.uint8).numpy())


class FakeCache:
    """Only what the cache-reset decisions read: the number of cached tokens."""

    def __init__(self, length):
        self.length = length

    def get_seq_length(self, layer_idx=0):
        return self.length


# --- language model -----------------------------------------------------------------------------


def test_phi3_classes_subclassed_by_the_model(phi3_vision):
    item = "Phi3PreTrainedModel.__init__(config) / Phi3ForCausalLM attributes model, lm_head, loss_function"
    assert issubclass(Phi3VForCausalLM, Phi3ForCausalLM) and issubclass(Phi3VModel, Phi3Model), surface(item)
    assert list(inspect.signature(Phi3PreTrainedModel.__init__).parameters)[:2] == ["self", "config"], surface(item)
    assert callable(getattr(phi3_vision, "loss_function", None)), surface(item)
    language_models = [name for name, module in phi3_vision.named_modules() if isinstance(module, Phi3Model)]
    assert language_models == ["model"] and isinstance(phi3_vision.lm_head, torch.nn.Linear), surface(item)


def test_phi3_model_forward_takes_cache_and_returns_base_output():
    item = "Phi3Model.forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, **kwargs)"
    expected = ["self", "input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "use_cache"]
    assert parameters(Phi3Model.forward) == expected, surface(item)
    fields = [field.name for field in dataclasses.fields(BaseModelOutputWithPast)]
    assert fields[:2] == ["last_hidden_state", "cache"], surface("BaseModelOutputWithPast.cache")


def test_our_forward_names_every_parameter_of_phi3_for_causal_lm():
    """generate() only passes keyword arguments that forward's signature names (**kwargs does not count)."""
    ours = set(parameters(Phi3VForCausalLM.forward))
    missing = [name for name in parameters(Phi3ForCausalLM.forward) if name not in ours]
    assert not missing, surface(f"Phi3ForCausalLM.forward parameters {missing}")
    assert {"pixel_values", "image_sizes"} <= ours


def test_causal_lm_output_has_a_cache_field():
    fields = [field.name for field in dataclasses.fields(CausalLMOutputWithPast)]
    assert fields == ["loss", "logits", "cache", "hidden_states", "attentions"], surface("CausalLMOutputWithPast fields")


def test_deprecate_kwarg_maps_the_old_cache_name_and_warns_until_the_removal_version(model, processor):
    """From the removal version on, deprecate_kwarg still maps the old name but no longer warns."""
    item = f"deprecate_kwarg('past_key_values', {PAST_KEY_VALUES_REMOVAL_VERSION!r}, new_name='cache')"
    inputs = processor("<|user|>\nHi<|end|>\n<|assistant|>\n")
    cache = DynamicCache(config=model.config)
    # deprecation.__version__: the installed transformers version, as deprecate_kwarg compares it
    before_removal = Version(deprecation.__version__) < Version(PAST_KEY_VALUES_REMOVAL_VERSION)
    with pytest.warns(FutureWarning) if before_removal else contextlib.nullcontext(), torch.no_grad():
        output = model(**inputs, past_key_values=cache)
    assert output.cache is cache and cache.get_seq_length() == inputs["input_ids"].shape[1], surface(item)
    assert "version" in inspect.signature(deprecate_kwarg).parameters, surface(item)


# --- generation ---------------------------------------------------------------------------------


def test_generation_mixin_prepare_inputs_signature_and_cache_key(phi3_vision):
    item = "GenerationMixin.prepare_inputs_for_generation(input_ids, next_sequence_length, cache, ..., is_first_iteration)"
    expected = ["self", "input_ids", "next_sequence_length", "cache", "attention_mask", "inputs_embeds", "is_first_iteration"]
    assert parameters(GenerationMixin.prepare_inputs_for_generation) == expected, surface(item)
    cache = FakeCache(10)
    step = phi3_vision.prepare_inputs_for_generation(
        torch.ones(1, 11, dtype=torch.long), cache=cache, next_sequence_length=1, use_cache=True
    )
    assert step.get("cache") is cache and step["input_ids"].shape[1] == 1, surface(item + ": returns key 'cache'")


def test_images_are_dropped_after_prefill_and_kept_on_the_first_iteration(phi3_vision):
    item = "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL (pixel_values, image_sizes)"
    assert {"pixel_values", "image_sizes"} <= set(MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL), surface(item)
    images = dict(pixel_values=torch.zeros(1), image_sizes=torch.zeros(1, 2))
    ids = torch.ones(1, 11, dtype=torch.long)
    later = phi3_vision.prepare_inputs_for_generation(ids, cache=FakeCache(10), next_sequence_length=1, use_cache=True, **images)
    first = phi3_vision.prepare_inputs_for_generation(
        ids, cache=FakeCache(10), next_sequence_length=1, use_cache=True, is_first_iteration=True, **images
    )
    assert "pixel_values" not in later and "image_sizes" not in later, surface(item)
    assert "pixel_values" in first and "image_sizes" in first, surface(item + " with is_first_iteration=True")


def test_phi3_drops_the_cache_once_past_original_max_position_embeddings(phi3_vision):
    """Phi-3.5-vision relies on Phi3ForCausalLM's longrope reset (our override adds the images)."""
    item = "Phi3ForCausalLM.prepare_inputs_for_generation cache reset past original_max_position_embeddings"
    limit = phi3_vision.config.original_max_position_embeddings
    assert limit == 4096, surface("Phi3Config.original_max_position_embeddings")
    reset = Phi3ForCausalLM.prepare_inputs_for_generation(
        phi3_vision, torch.ones(1, limit + 1, dtype=torch.long), cache=FakeCache(limit), next_sequence_length=1
    )
    kept = Phi3ForCausalLM.prepare_inputs_for_generation(
        phi3_vision, torch.ones(1, limit, dtype=torch.long), cache=FakeCache(limit - 1), next_sequence_length=1
    )
    assert reset.get("cache") is None and reset["input_ids"].shape[1] == limit + 1, surface(item)
    assert kept.get("cache") is not None and kept["input_ids"].shape[1] == 1, surface(item)


def test_without_generation_config_json_the_generation_config_comes_from_config_json(phi3_vision, tmp_path):
    """Phi-3-vision's repo has no generation_config.json; transformers then builds the generation config
    from config.json's raw keys (no pad_token_id) through ``adjust_generation_fn``, where our override
    adds the config's pad id 32000, the original's pad for finished rows of a batch (spec §1.2)."""
    item = "from_pretrained without generation_config.json -> adjust_generation_fn"
    path = make_tiny_checkpoint(tmp_path, variant="phi-3-vision")
    assert not (path / "generation_config.json").exists()
    raw = transformers.GenerationConfig.from_pretrained(path, config_file_name="config.json", _from_model_config=True)
    assert raw.pad_token_id is None, surface(item + ": config.json's raw keys now carry a pad id")
    assert "adjust_generation_fn" in vars(Phi3VForCausalLM) and hasattr(GenerationMixin, "adjust_generation_fn"), surface(item)
    config = phi3_vision.generation_config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 32000), surface(item)
    given = AutoModelForCausalLM.from_pretrained(path, generation_config=transformers.GenerationConfig(max_new_tokens=3))
    assert given.generation_config.pad_token_id is None  # a generation config the caller passes stays as it is

    # What it changes: a row that stopped early is padded with 32000, not with the stop token.
    ids = torch.tensor([[1, 450, 4799, 338], [1, 1, 450, 338]])
    step = phi3_vision(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])).logits[:, -1].argmax(-1)
    output = phi3_vision.generate(
        ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), max_new_tokens=3, do_sample=False,
        eos_token_id=int(step[0]),
    )
    assert output[0, 4].item() == step[0].item() and output[0, 5:].tolist() == [32000, 32000]


def test_a_generation_config_made_from_config_json_is_marked_from_model_config(tmp_path):
    """Our adjust_generation_fn fills the token ids only into a generation config that transformers made
    from config.json, told apart by ``_from_model_config``. Checked on transformers' own Phi3, without
    our override (whose bare AttributeError would name nothing)."""
    item = "GenerationConfig._from_model_config (True when from_pretrained made it from config.json)"
    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
    )
    Phi3ForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    made_from_config = Phi3ForCausalLM.from_pretrained(tmp_path).generation_config
    assert getattr(made_from_config, "_from_model_config", None) is True, surface(item)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    written = Phi3ForCausalLM.from_pretrained(tmp_path).generation_config
    assert getattr(written, "_from_model_config", True) in (None, False), surface(item)


def test_generate_calls_streamers_and_stopping_criteria_per_token(model, processor):
    """ask(stream=True), the batch timer and the profiler rely on: the first put() is the prompt, then
    one put() and one stopping-criteria call per new token."""
    item = "generate(streamer=BaseStreamer, stopping_criteria=StoppingCriteriaList)"
    puts, checks = [], []

    class Streamer(BaseStreamer):
        def put(self, value):
            puts.append(value.shape[-1])

        def end(self):
            puts.append("end")

    class Criterion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            checks.append(input_ids.shape[1])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    inputs = processor(PROMPT, picture())
    prompt_length = inputs["input_ids"].shape[1]
    model.generate(
        **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, streamer=Streamer(),
        stopping_criteria=StoppingCriteriaList([Criterion()]),
    )
    assert puts == [prompt_length, 1, 1, 1, "end"], surface(item)
    assert checks == [prompt_length + 1, prompt_length + 2, prompt_length + 3], surface(item)


def test_render_jinja_template_returns_the_texts_and_the_generation_indices():
    """api/prompts.render_messages renders the checkpoint's chat template with this private function,
    annotated ``-> str`` but returning a tuple (rendered texts, generation indices) that we unpack."""
    item = "chat_template_utils.render_jinja_template([messages], chat_template=, add_generation_prompt=) -> (texts, indices)"
    messages = [{"role": "user", "content": "What is this?"}]
    result = render_jinja_template([messages], chat_template=CHECKPOINT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert isinstance(result, tuple) and len(result) == 2, surface(item)
    assert result[0] == ["<|user|>\nWhat is this?<|end|>\n<|assistant|>\n"], surface(item)


def test_pipeline_image_text_to_text(model, processor):
    item = 'pipeline("image-text-to-text", model=, processor=)(images=, text=) and chat messages'
    image = picture(1)
    expected = model.generate(**processor(PROMPT, image), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    text = processor.decode(expected[0, -4:], skip_special_tokens=True)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert pipe(images=image, text=PROMPT, return_full_text=False, **settings)[0]["generated_text"] == text, surface(item)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is shown in this image?"}]}]
    assert pipe(text=chat, **settings)[0]["generated_text"][-1] == {"role": "assistant", "content": text}, surface(item)


# --- configuration ------------------------------------------------------------------------------


def test_rope_hook_renames_the_legacy_su_type():
    item = "Phi3Config.convert_rope_params_to_dict(default_theta, ignore_keys, **kwargs) / rope_parameters"
    assert parameters(transformers.Phi3Config.convert_rope_params_to_dict) == ["self", "default_theta", "ignore_keys"], surface(item)
    config = AutoConfig.from_pretrained(FIXTURES)  # the real config.json: rope_scaling type "su"
    assert config.rope_parameters["rope_type"] == "longrope", surface(item)
    assert len(config.rope_parameters["long_factor"]) == 48, surface(item)


def test_stored_attn_implementation_reaches_post_init_kwargs():
    item = "PreTrainedConfig.__post_init__(**kwargs) receives config.json's _attn_implementation"
    config = AutoConfig.from_pretrained(FIXTURES)  # stores "_attn_implementation": "flash_attention_2"
    assert config._attn_implementation is None, surface(item)


def test_attn_implementation_is_a_config_property_whose_setter_reaches_the_sub_configs():
    """Phi3VConfig overrides the setter of this property (to keep SDPA in the vision tower) and reads
    the value back through the property's own getter."""
    item = "PreTrainedConfig._attn_implementation property (getter; setter that also sets the sub-configs)"
    attn_property = inspect.getattr_static(PreTrainedConfig, "_attn_implementation", None)
    assert isinstance(attn_property, property) and attn_property.fset is not None, surface(item)
    config = Phi3VConfig()
    config._attn_implementation = "eager"
    assert (config._attn_implementation, config.vision_config._attn_implementation) == ("eager", "sdpa"), surface(item)


def test_sub_config_defaults_build_the_clip_vision_config():
    item = "configuration_utils.SubConfigSpec / sub_configs_defaults"
    config = Phi3VConfig()
    assert isinstance(config.vision_config, CLIPVisionConfig), surface(item)
    assert (config.vision_config.hidden_size, config.vision_config.image_size) == (1024, 336), surface(item)


# --- vision tower -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_clip():
    """A 3-layer CLIPVisionModel, an input, and its full output with every hidden state."""
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)
    clip = CLIPVisionModel(config).eval()
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return clip, pixels, clip(pixels, output_hidden_states=True)


def test_clip_hidden_states_index_minus_two_is_the_penultimate_layer(small_clip):
    item = "CLIPVisionModel(output_hidden_states=True).hidden_states (num_layers + 1 entries, [-1] before post_layernorm)"
    clip, pixels, output = small_clip
    with torch.no_grad():
        hidden = clip.pre_layrnorm(clip.embeddings(pixels))
    assert len(output.hidden_states) == 4, surface(item)
    assert torch.allclose(output.hidden_states[0], hidden, atol=1e-6), surface(item)
    assert torch.equal(output.hidden_states[-1], output.last_hidden_state), surface(item)


def test_clip_parts_run_one_by_one_give_the_hidden_states(small_clip):
    item = "CLIPVisionModel's embeddings, pre_layrnorm and encoder.layers[i](hidden, attention_mask=None)"
    clip, pixels, output = small_clip
    with torch.no_grad():
        hidden = clip.pre_layrnorm(clip.embeddings(pixels))
        for layer in clip.encoder.layers[:2]:  # what the vision tower runs: up to the penultimate layer
            hidden = layer(hidden, attention_mask=None)
    assert torch.allclose(output.hidden_states[-2], hidden, atol=1e-5), surface(item)


def test_dynamic_cache_keeps_the_selected_rows():
    item = "DynamicCache(config=...).batch_select_indices(indices) and get_seq_length()"
    config = Phi3VConfig(**{**json.loads((FIXTURES / "config.json").read_text()), "num_hidden_layers": 1})
    cache = DynamicCache(config=config)
    keys = torch.arange(3 * 2 * 4 * 5, dtype=torch.float32).reshape(3, 2, 4, 5)  # (batch, heads, tokens, head_dim)
    cache.update(keys, keys + 1, layer_idx=0)
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.get_seq_length() == 4, surface(item)
    assert torch.equal(cache.layers[0].keys, keys[[0, 2]]), surface(item)


def test_attn_implementation_dict_sets_each_part(tiny_checkpoint):
    item = 'from_pretrained(attn_implementation={"": ..., "vision_config": ...}) and config._attn_implementation per sub-config'
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation={"": "eager", "vision_config": "sdpa"})
    assert model.config._attn_implementation == "eager", surface(item)
    assert model.config.vision_config._attn_implementation == "sdpa", surface(item)


def test_checkpoint_keys_load_unchanged_into_our_clip_subclass(tiny_checkpoint):
    item = "no key renaming for a CLIPVisionModel subclass defined outside transformers"
    _, info = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], surface(item)



def test_load_report_and_mismatched_keys(tiny_checkpoint, tmp_path, caplog):
    item = ("from_pretrained(output_loading_info=True, ignore_mismatched_sizes=True) -> mismatched_keys of "
            "(key, checkpoint shape, model shape); the LOAD REPORT logged on transformers.modeling_utils")
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "reshaped"
    shutil.copytree(tiny_checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    expected = weights["model.norm.weight"].shape
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, folder / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
        _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
    assert set(info["mismatched_keys"]) == {("model.norm.weight", torch.Size([7]), expected)}, surface(item)
    assert any(record.name == "transformers.modeling_utils" and "LOAD REPORT" in record.getMessage()
               for record in caplog.records), surface(item)

def test_no_split_module_names_exist(model):
    item = "_no_split_modules class names Phi3DecoderLayer, CLIPEncoderLayer"
    classes = {type(module).__name__ for module in model.modules()}
    assert set(Phi3VForCausalLM._no_split_modules) <= classes, surface(item)


# --- attention selection ------------------------------------------------------------------------


def test_get_correct_attn_implementation_is_the_hook_for_flash_attention(tiny_checkpoint):
    item = "PreTrainedModel.get_correct_attn_implementation(requested_attention, is_init_check) / is_flash_attn_2_available"
    assert parameters(Phi3ForCausalLM.get_correct_attn_implementation) == ["self", "requested_attention", "is_init_check"], surface(item)
    assert isinstance(is_flash_attn_2_available(), bool), surface(item)
    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed: the missing-package error cannot be provoked")
    with pytest.raises(FlashAttentionUnavailableError):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="flash_attention_2")


# --- Auto classes, tokenizer, processor ---------------------------------------------------------


def test_auto_registration(tiny_checkpoint):
    item = "Auto*.register (config, causal LM, image-text-to-text, image processor 'pil', processor, tokenizer)"
    assert type(AutoConfig.for_model("phi3_v")) is Phi3VConfig, surface(item)
    assert MODEL_FOR_CAUSAL_LM_MAPPING[Phi3VConfig] is Phi3VForCausalLM, surface(item)
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[Phi3VConfig] is Phi3VForCausalLM, surface(item)
    assert type(AutoImageProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=False)) is Phi3VImageProcessor, surface(item)
    assert type(AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=False)) is Phi3VProcessor, surface(item)
    assert type(AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=False)) is TokenizersBackend, surface(item)


def test_the_tokenizer_is_registered_with_the_v5_parameter():
    """registration.py passes ``tokenizer_class=`` (``fast_tokenizer_class=`` is deprecated in transformers 5);
    the official checkpoint's files load as tokenizer.json says, with its ids."""
    item = "AutoTokenizer.register(config_class, tokenizer_class=)"
    assert "tokenizer_class" in inspect.signature(AutoTokenizer.register).parameters, surface(item)
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES)  # the official tokenizer files
    assert type(tokenizer) is TokenizersBackend, surface(item)
    assert tokenizer("<|user|>\nWhat is shown?<|end|>\n<|assistant|>\n").input_ids == [
        1, 32010, 29871, 13, 5618, 338, 4318, 29973, 32007, 29871, 13, 32001
    ], surface(item)


def test_tokenizers_backend_loads_tokenizer_json_as_it_is():
    item = "tokenization_utils_tokenizers.TokenizersBackend.from_pretrained"
    tokenizer = TokenizersBackend.from_pretrained(FIXTURES)
    assert tokenizer("<|user|>\n").input_ids == [1, 32010, 29871, 13], surface(item)


def test_processor_mixin_loads_the_tokenizer_through_our_hook(tiny_checkpoint):
    item = "ProcessorMixin._load_tokenizer_from_pretrained(sub_processor_type, pretrained_model_name_or_path, subfolder)"
    expected = ["sub_processor_type", "pretrained_model_name_or_path", "subfolder"]
    assert parameters(ProcessorMixin._load_tokenizer_from_pretrained) == expected, surface(item)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor.tokenizer) is TokenizersBackend, surface(item)
    assert processor.tokenizer("<|user|>\n").input_ids == [1, 32010, 29871, 13], surface(item)


def test_image_processor_kwargs_are_typed(tiny_checkpoint):
    item = "BaseImageProcessor / valid_kwargs (ImagesKwargs) / BatchFeature"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor = AutoProcessor.from_pretrained(tiny_checkpoint, num_crops=2)
        features = processor.image_processor(picture(), num_crops=1)
    assert processor.image_processor.num_crops == 2, surface(item)
    assert tuple(features["pixel_values"].shape) == (1, 2, 3, 336, 336), surface(item)


# --- no deprecation warnings from our code --------------------------------------------------------


def test_generation_raises_no_deprecation_warning(model, processor, tmp_path):
    """Cached decoding, streaming, the Phi-3.5 cache reset (at a short threshold) and the pipeline."""
    path = make_tiny_checkpoint(tmp_path, variant="phi-3.5-vision", seed=1)
    config = json.loads((path / "config.json").read_text())
    config["original_max_position_embeddings"] = 780  # 775 prompt tokens: decoding crosses it
    (path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        inputs = processor(PROMPT, picture(2))
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        resetting = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        long_inputs = AutoProcessor.from_pretrained(path)(PROMPT, Image.new("RGB", (640, 480)))
        resetting.generate(**long_inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        phi_helpers.ask(model, processor, "What is it?", images=[picture(3)], max_new_tokens=4, stream=True)
        pipe = pipeline("image-text-to-text", model=model, processor=processor)
        pipe(images=picture(4), text=PROMPT, max_new_tokens=4, return_full_text=False)


def test_torchao_int8_tensor_fields_and_torchs_fused_int8_kernel():
    """api/quantization.FusedInt8Linear reads a torchao Int8Tensor's fields and calls torch._weight_int8pack_mm."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    item = "torchao Int8Tensor(qdata, scale, block_size, act_quant_kwargs, act_pre_scale) / torch._weight_int8pack_mm"
    linear = torch.nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    torchao_quantization.quantize_(linear, torchao_quantization.Int8WeightOnlyConfig())
    weight = linear.weight
    assert isinstance(weight, torchao_quantization.Int8Tensor), surface(item, "torchao")
    assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == (16, 64), surface(item, "torchao")
    assert tuple(weight.block_size) == (1, 64) and weight.scale.numel() == 16, surface(item, "torchao")  # one scale per output row
    assert weight.act_quant_kwargs is None and weight.act_pre_scale is None, surface(item, "torchao")  # weight-only
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    fused = torch._weight_int8pack_mm(x, weight.qdata, weight.scale.reshape(-1).to(x.dtype))
    exact = x.float() @ weight.dequantize().float().t()
    assert torch.allclose(fused.float(), exact, rtol=2e-2, atol=2e-2), surface(item, "torch")


# --- xgrammar -----------------------------------------------------------------------------------


def test_xgrammars_torch_native_mask_runs_on_cpu():
    """api/constrained.apply_mask passes backend="torch_native" on MPS and on CUDA without triton, where the
    CPU tests never go; that backend is plain torch on any device, so it is checked here on the CPU."""
    item = 'xgrammar.apply_token_bitmask_inplace(scores, bitmask, backend="torch_native")'
    bitmask = torch.tensor([[0b101, -1]], dtype=torch.int32)  # bit j of word i allows token 32 * i + j
    scores = torch.zeros(1, 40)
    try:
        xgrammar.apply_token_bitmask_inplace(scores, bitmask, backend="torch_native")
    except Exception as error:  # a renamed backend or argument
        pytest.fail(f"{surface(item, 'xgrammar')}: {error!r}")
    allowed = [0, 2] + list(range(32, 40))
    assert scores[0].isfinite().nonzero().flatten().tolist() == allowed, surface(item, "xgrammar")


# --- huggingface_hub (api/loading's probe of the hub) -------------------------------------------


def test_the_hub_functions_the_probe_calls_take_its_arguments():
    """tests/test_loading.py replaces these with lambdas, which would hide a change of their signatures."""
    item = "model_info(repo_id, timeout=), try_to_load_from_cache(repo_id, filename), is_offline_mode(), utils.httpx.TransportError"
    assert parameters(huggingface_hub.model_info)[0] == "repo_id", surface(item, "huggingface_hub")
    assert "timeout" in parameters(huggingface_hub.model_info), surface(item, "huggingface_hub")
    assert parameters(huggingface_hub.try_to_load_from_cache)[:2] == ["repo_id", "filename"], surface(item, "huggingface_hub")
    assert parameters(huggingface_hub.is_offline_mode) == [], surface(item, "huggingface_hub")
    assert issubclass(httpx.ConnectError, httpx.TransportError), surface(item, "huggingface_hub")


def probe_the_hub(tmp_path, **environment) -> subprocess.CompletedProcess:
    """api/loading's probe of the hub for 'someone/model' in a fresh Python (huggingface_hub reads
    HF_ENDPOINT and HF_HUB_OFFLINE when it is imported), against a local port that refuses connections."""
    env = {name: value for name, value in os.environ.items() if name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path), **environment)  # port 9: nothing listens
    code = "from phi_helpers.api.loading import _hub_access; print(_hub_access('someone/model'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_an_unreachable_hub_is_a_model_load_error_naming_the_refusal(tmp_path):
    item = "model_info(timeout=) raising an httpx.TransportError or OSError when the hub refuses the connection"
    result = probe_the_hub(tmp_path)
    assert result.returncode != 0 and "ModelLoadError: huggingface.co cannot be reached" in result.stderr, (
        surface(item, "huggingface_hub") + "\n" + result.stderr[-2000:]
    )
    assert "Connection refused" in result.stderr, result.stderr[-2000:]


def test_hf_hub_offline_asks_the_hub_nothing(tmp_path):
    item = "is_offline_mode() is True with HF_HUB_OFFLINE=1"
    result = probe_the_hub(tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 0 and result.stdout.strip() == "{}", surface(item, "huggingface_hub") + "\n" + result.stderr[-2000:]
