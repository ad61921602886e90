"""What the native model does with the inputs a caller hands it: images that follow their prompt through
beam search, typed errors for inputs that would silently lose the images or crash deep in torch, labels
that skip the image positions, and transformers' own conventions (return_dict=False, inputs_embeds)."""

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, DynamicCache, GenerationMixin

import phi_helpers  # noqa: F401  (registers the Auto classes)
from phi_helpers.errors import InvalidArgumentError, PromptImageMismatchError
from phi_helpers.testing import make_tiny_checkpoint

ONE_IMAGE = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
TWO_IMAGES = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n"
TEXT = "<|user|>\nNo picture, just a question.<|end|>\n<|assistant|>\n"
IMAGE = 32044  # <|image|>
GREEDY = dict(do_sample=False, eos_token_id=None)

# torch 2.13 CPU: the first call of a transcendental op can be off by ~1e-4 (transformers5-notes.md)
for op in (torch.cos, torch.sin, torch.exp, torch.tanh, torch.log, torch.erf):
    op(torch.linspace(0.1, 1, 64))


def picture(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


WIDE, TALL, OTHER = picture(400, 300, 1), picture(300, 700, 2), picture(400, 300, 3)  # 1x1 and 2x1 tiles at num_crops=2


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    """num_crops=2: images of 313 (WIDE, OTHER) and 469 (TALL) image positions, fast on CPU."""
    return AutoProcessor.from_pretrained(tiny_checkpoint, num_crops=2)


def prefill_embeddings(model, **generate_kwargs):
    """The embeddings (rows, L, hidden) that the first forward pass of ``model.generate`` feeds its decoder."""
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True
    )
    try:
        model.generate(**generate_kwargs, max_new_tokens=1)
    finally:
        hook.remove()
    return seen[0]


def alone(model, processor, prompt, images):
    """The embeddings (L, hidden) of one prompt encoded on its own."""
    inputs = processor(prompt, images)
    return model.model.embed(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_sizes"))[0]


def reset_at(tmp_path, limit):
    """A tiny Phi-3.5-vision whose cache reset comes at ``limit`` tokens instead of 4096."""
    path = make_tiny_checkpoint(tmp_path, variant="phi-3.5-vision", seed=1)
    config = json.loads((path / "config.json").read_text())
    config["original_max_position_embeddings"] = limit
    (path / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --- 1. generate's copies of a prompt keep the prompt's images ------------------------------------------


def test_generation_mixin_expand_signature():
    """The method our model overrides to copy each row's images (transformers 5)."""
    parameters = list(inspect.signature(GenerationMixin._expand_inputs_for_generation).parameters)
    assert parameters == ["self", "expand_size", "is_encoder_decoder", "input_ids", "model_kwargs"]


@pytest.mark.parametrize("settings", [dict(num_beams=2, do_sample=False), dict(do_sample=True, num_return_sequences=2)])
def test_every_copy_of_a_two_image_prompt_sees_its_two_images(model, processor, settings):
    """Before: transformers repeated pixel_values image by image, [a, c] -> [a, a, c, c], so the first
    copy of the prompt saw a twice and the second c twice."""
    expected = alone(model, processor, TWO_IMAGES, [WIDE, TALL])
    with torch.no_grad():
        embeddings = prefill_embeddings(model, **processor(TWO_IMAGES, [WIDE, TALL]), **settings)
    assert embeddings.shape[0] == 2
    for row in embeddings:
        assert torch.equal(row, expected)


def test_copies_of_a_batch_with_uneven_image_counts_keep_their_rows_images(model, processor):
    prompts, images = [TEXT, TWO_IMAGES, ONE_IMAGE], [[], [WIDE, TALL], [OTHER]]
    with torch.no_grad():
        embeddings = prefill_embeddings(model, **processor(prompts, images), num_beams=2, do_sample=False)
        expected = [alone(model, processor, prompt, group) for prompt, group in zip(prompts, images)]
    assert embeddings.shape[0] == 6
    for row, got in enumerate(embeddings):
        single = expected[row // 2]
        assert torch.equal(got[-len(single) :], single), f"copy {row % 2} of prompt {row // 2}"


def test_beam_search_answers_as_it_does_from_the_prompts_embeddings(model, processor):
    """From inputs_embeds, transformers copies whole prompts (the images are inside them): the reference."""
    inputs = processor(TWO_IMAGES, [WIDE, TALL])
    with torch.no_grad():
        embeds = model.model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        from_ids = model.generate(**inputs, num_beams=2, max_new_tokens=6, **GREEDY)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], num_beams=2, max_new_tokens=6, **GREEDY)
    assert from_ids[:, inputs["input_ids"].shape[1] :].tolist() == from_embeds.tolist()


def test_images_that_do_not_fill_their_rows_are_refused_before_copying(model, processor):
    """Row 0 holds a 313-position image, row 1 a 469-position one; the images come in the other order.
    Before: the copies were scattered silently (the totals agree)."""
    inputs = processor([ONE_IMAGE, ONE_IMAGE], [[WIDE], [TALL]])
    swapped = {**inputs, "pixel_values": inputs["pixel_values"].flip(0), "image_sizes": inputs["image_sizes"].flip(0)}
    with pytest.raises(PromptImageMismatchError, match="Row 0 of input_ids"):
        model.generate(**swapped, num_beams=2, max_new_tokens=1, **GREEDY)


def test_phi35_beam_search_re_encodes_each_copy_with_its_images(tmp_path, processor):
    """Past original_max_position_embeddings Phi-3.5-vision encodes everything again, images included."""
    inputs = processor(TWO_IMAGES, [WIDE, TALL])
    prompt = inputs["input_ids"].shape[1]
    model = reset_at(tmp_path, prompt + 2)  # the cache is dropped on the third answer token
    settings = dict(num_beams=2, num_return_sequences=2, max_new_tokens=6, return_dict_in_generate=True, output_scores=True, **GREEDY)
    with torch.no_grad():
        embeds = model.model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        from_ids = model.generate(**inputs, **settings)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **settings)
    assert from_ids.sequences[:, prompt:].tolist() == from_embeds.sequences.tolist()
    assert torch.allclose(from_ids.sequences_scores, from_embeds.sequences_scores, rtol=0, atol=1e-6)


# --- 2. pixel_values with input_ids that hold no image positions ---------------------------------------


def test_pixel_values_with_tokenizer_only_input_ids_are_refused(model, processor):
    """Before: the images were ignored, and the answer was the one without images."""
    images = processor.image_processor(WIDE, num_crops=2)
    text_ids = processor.tokenizer(ONE_IMAGE, return_tensors="pt")  # <|image_1|> is plain text to the tokenizer
    with pytest.raises(PromptImageMismatchError, match=r"no image positions.*processor\(text, images\)"):
        model(**text_ids, pixel_values=images["pixel_values"], image_sizes=images["image_sizes"])
    with pytest.raises(PromptImageMismatchError, match="no image positions"):
        model.generate(**text_ids, pixel_values=images["pixel_values"], image_sizes=images["image_sizes"], max_new_tokens=1)


def test_pixel_values_stay_allowed_where_they_are_not_for_this_step(model, processor):
    """A decoding step on a cache (the original passes the images at every step), and an empty set of images."""
    inputs = processor(ONE_IMAGE, [WIDE])
    with torch.no_grad():
        cache = model(**inputs).cache
        copy = DynamicCache(config=model.config)
        for layer, cached in enumerate(cache.layers):
            copy.update(cached.keys, cached.values, layer)
        step = torch.tensor([[450]])
        mask = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)
        with_images = model(input_ids=step, attention_mask=mask, cache=cache, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        without = model(input_ids=step, attention_mask=mask, cache=copy)
        assert torch.equal(with_images.logits, without.logits)
        text = processor(TEXT)
        none = inputs["pixel_values"][:0], inputs["image_sizes"][:0]  # what generate_batch keeps for rows without images
        assert torch.equal(model(**text, pixel_values=none[0], image_sizes=none[1]).logits, model(**text).logits)


# --- 3, 4. inputs_embeds ------------------------------------------------------------------------------


def test_inputs_embeds_with_pixel_values_are_refused(model, processor):
    inputs = processor(ONE_IMAGE, [WIDE])
    embeds = model.model.embed_tokens(inputs["input_ids"].clamp(min=0))
    images = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(InvalidArgumentError, match=r"model\.model\.embed\(input_ids, pixel_values, image_sizes\)"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **images)
    with pytest.raises(InvalidArgumentError, match=r"model\.model\.embed"):
        model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=1, **images)


def test_input_ids_with_inputs_embeds_are_refused_as_transformers_does(model, processor):
    """Before: inputs_embeds won and input_ids were dropped without a word."""
    ids = processor(TEXT)["input_ids"]
    with pytest.raises(InvalidArgumentError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=model.model.embed_tokens(ids))
    with pytest.raises(InvalidArgumentError, match="exactly one of input_ids or inputs_embeds"):
        model(attention_mask=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("variant", ["phi-3-vision", "phi-3.5-vision"])
def test_generate_from_image_embeddings_answers_as_from_input_ids(tmp_path, processor, variant):
    """Before: transformers refused, as prepare_inputs_for_generation did not name inputs_embeds."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_checkpoint(tmp_path, variant=variant), dtype=torch.float32).eval()
    inputs = processor(TWO_IMAGES, [WIDE, TALL])
    with torch.no_grad():
        embeds = model.model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        from_ids = model.generate(**inputs, max_new_tokens=6, **GREEDY)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=6, **GREEDY)
    assert from_embeds.tolist() == from_ids[:, inputs["input_ids"].shape[1] :].tolist()


def test_phi35_generate_from_embeddings_re_encodes_past_original_max_position_embeddings(tmp_path, processor):
    """The re-encoding takes the prompt's embeddings and the answer's tokens so far, whether generate was
    given the embeddings alone (its input_ids then hold the answer only) or the prompt's ids too."""
    inputs = processor(ONE_IMAGE, [WIDE])
    prompt = inputs["input_ids"].shape[1]
    model = reset_at(tmp_path, prompt + 3)
    settings = dict(attention_mask=inputs["attention_mask"], max_new_tokens=8, **GREEDY)
    with torch.no_grad():
        embeds = model.model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        from_ids = model.generate(**inputs, max_new_tokens=8, **GREEDY)[:, prompt:]
        from_embeds = model.generate(inputs_embeds=embeds, **settings)
        from_both = model.generate(input_ids=inputs["input_ids"], inputs_embeds=embeds, **settings)[:, prompt:]
    assert from_embeds.tolist() == from_ids.tolist() == from_both.tolist()


# --- 5. return_dict=False --------------------------------------------------------------------------------


def test_return_dict_false_gives_a_tuple(model, processor):
    inputs = processor(ONE_IMAGE, [WIDE])
    with torch.no_grad():
        output = model(**inputs)
        plain = model(**inputs, return_dict=False)
        with_loss = model(**inputs, labels=inputs["input_ids"], return_dict=False)
    assert isinstance(plain, tuple) and torch.equal(plain[0], output.logits)
    assert isinstance(with_loss, tuple) and with_loss[0].ndim == 0 and torch.equal(with_loss[1], output.logits)


# --- 6. a cached chunk that holds image runs -----------------------------------------------------------


def test_prompt_lookup_candidates_copied_from_an_image_run_are_text(model, processor):
    """Why a cached chunk with runs of <|image|> and no pixel_values is not refused: prompt-lookup decoding
    copies candidates from the prompt, here the run after "\\n", and checks them in one cached chunk
    ("\\n", <|image|> x 10). They are text, as every 32044 is in the original; the answer is greedy's."""
    inputs = processor(ONE_IMAGE, [WIDE])
    prompt = inputs["input_ids"].shape[1]
    newline = inputs["input_ids"][0, 3].item()
    assert newline == 13 and inputs["input_ids"][0, 4] == IMAGE  # "\n" before the image run

    def newline_first(input_ids, scores):
        if input_ids.shape[1] == prompt:
            scores = torch.full_like(scores, -1e9)
            scores[:, newline] = 0
        return scores

    chunks = []
    embed = model.model.embed
    model.model.embed = lambda ids, *args, **kwargs: chunks.append(ids) or embed(ids, *args, **kwargs)
    try:
        with torch.no_grad():
            greedy = model.generate(**inputs, max_new_tokens=6, logits_processor=[newline_first], **GREEDY)
            chunks.clear()
            lookup = model.generate(**inputs, max_new_tokens=6, logits_processor=[newline_first], prompt_lookup_num_tokens=10, **GREEDY)
    finally:
        del model.model.embed
    assert any(len(chunk[0]) > 2 and (chunk[0, 1:3] == IMAGE).all() for chunk in chunks[1:])  # the copied run
    assert torch.equal(lookup, greedy)


def test_decoding_steps_do_not_look_for_image_positions(model, processor):
    """A decoding step gets no images, so its embeddings are the tokens' own: no image_positions, whose
    .any() would wait for the GPU at every step."""
    calls = []
    find = model.model.image_positions
    model.model.image_positions = lambda ids: calls.append(ids.shape) or find(ids)
    try:
        with torch.no_grad():
            model.generate(**processor(ONE_IMAGE, [WIDE]), max_new_tokens=4, **GREEDY)
    finally:
        del model.model.image_positions
    assert len(calls) == 1  # the prompt


# --- 7. image_sizes and pixel_values that the processor cannot have made --------------------------------


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(image_sizes=torch.tensor([336, 336])), InvalidArgumentError, r"shape \(images, 2\).*got shape \(2,\)"),
        (dict(image_sizes=torch.tensor([[336, 336, 1]])), InvalidArgumentError, r"shape \(images, 2\).*\(1, 3\)"),
        (dict(image_sizes=torch.tensor([[336.0, 336.0]])), InvalidArgumentError, "whole numbers.*float32"),
        (dict(image_sizes=torch.tensor([[0, 0]])), InvalidArgumentError, "positive multiples of 336"),
        (dict(image_sizes=torch.tensor([[-336, 336]])), InvalidArgumentError, "positive multiples of 336"),
        (dict(image_sizes=torch.tensor([[335, 336]])), InvalidArgumentError, "positive multiples of 336"),
        (dict(image_sizes=torch.tensor([[672, 672]])), PromptImageMismatchError, "5 crops, but pixel_values has 3"),
        (dict(image_sizes=torch.tensor([[336, 336], [336, 336]])), PromptImageMismatchError, "2 rows but pixel_values holds 1"),
        ("4-D", InvalidArgumentError, r"shape \(images, crops, 3, 336, 336\), got Tensor of shape \(3, 3, 336, 336\)"),
        ("numpy", InvalidArgumentError, r"a torch tensor of shape \(images, crops, 3, 336, 336\), got ndarray"),
    ],
)
def test_image_inputs_the_processor_cannot_have_made_are_clear_errors(model, processor, change, error, message):
    """Before: a torch error deep in the vision tower (or a reshape that happened to work)."""
    inputs = dict(processor(ONE_IMAGE, [WIDE]))  # image_sizes [[336, 336]], num_crops + 1 = 3 crops
    if change == "4-D":
        inputs["pixel_values"] = inputs["pixel_values"][0]
    elif change == "numpy":
        inputs["pixel_values"] = inputs["pixel_values"].numpy()
    else:
        inputs.update(change)
    with pytest.raises(error, match=message) as raised, torch.no_grad():
        model(**inputs)
    assert "processor(text, images)" in str(raised.value)


def test_image_sizes_as_lists_and_int32_stay_accepted(model, processor):
    inputs = processor(ONE_IMAGE, [TALL])
    with torch.no_grad():
        expected = model(**inputs).logits
        for sizes in (inputs["image_sizes"].tolist(), inputs["image_sizes"].int(), inputs["image_sizes"].numpy()):
            assert torch.equal(model(**{**inputs, "image_sizes": sizes}).logits, expected)


def test_num_features_is_the_length_of_the_embedding(model, processor):
    vision = model.model.vision_embed_tokens
    for image in (WIDE, TALL, picture(1000, 500, 4)):
        inputs = processor(ONE_IMAGE, [image], num_crops=6)
        (rows, cols), = vision.tile_grids(inputs["pixel_values"], inputs["image_sizes"])
        with torch.no_grad():
            assert vision.num_features(rows, cols) == len(vision(inputs["pixel_values"], inputs["image_sizes"]))
        assert vision.num_features(rows, cols) == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12  # spec §4.6


# --- 8. labels=input_ids --------------------------------------------------------------------------------


def test_labels_skip_the_image_positions(model, processor):
    inputs = processor(ONE_IMAGE + "A red box.<|end|>", [WIDE])
    ids = inputs["input_ids"]
    masked = ids.masked_fill(ids == IMAGE, -100)
    negative = ids.masked_fill(ids == IMAGE, -1)  # the original processor's image ids
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = model.loss_function(logits=logits, labels=masked, vocab_size=model.config.vocab_size)
        assert torch.equal(model(**inputs, labels=ids).loss, expected)  # before: trained on 313 <|image|> targets
        assert torch.equal(model(**inputs, labels=negative).loss, expected)  # before: "Target -1 is out of bounds"
    assert torch.equal(ids, inputs["input_ids"])  # the caller's labels stay as they were


def test_text_labels_keep_their_loss_and_a_lone_image_token_stays_a_label(model, processor):
    ids = processor(TEXT)["input_ids"]
    lone = torch.cat([ids[:, :5], torch.tensor([[IMAGE]]), ids[:, 5:]], dim=1)  # text, as in the original
    with torch.no_grad():
        for labels in (ids, lone, ids.masked_fill(torch.arange(ids.shape[1]) < 4, -100)):
            logits = model(input_ids=labels.clamp(min=0)).logits
            expected = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
            assert torch.equal(model(input_ids=labels.clamp(min=0), labels=labels).loss, expected)
