"""The user API: load a model, read images, build prompts and chats, generate, parse, report.

The everyday functions import from ``phi_helpers`` itself (load_model, load_image, build_prompt, Chat,
ask, extract, extract_json, load_schema, environment_report: see ``help(phi_helpers)``). The rest
imports from the module that holds it:

    choices        what load_model accepts: DEFAULT_MODEL_ID, DEVICES, DTYPES, ATTENTIONS
    loading        load_model and its choices: pick_device, pick_dtype, check_checkpoint_files
    hardware       what the machine has and the model needs: pick_attention, memory_estimate / memory_need
    report         environment_report (shows those facts), format_table
    images         load_image, load_page (one page of a multi-page TIFF)
    prompts        build_prompt, Chat
    generation     ask, extract, stream_chunks, generate_batch (many prompts in one batch)
    parsing        extract_json
    structured     JSON Schemas: load_schema, check_schema, check_extraction
    constrained    constrained decoding to a schema: check_supported, compile_schema, allowed_next_tokens
    quantization   quantize="int8"/"int4": quantization_config, weights_bytes
    metrics        character_error_rate, field_matches
    kv_cache, batch_linear   speed-ups that generation uses by itself
"""
