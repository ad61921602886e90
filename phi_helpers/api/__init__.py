"""The user API: load a model, read images, build prompts and chats, generate, parse, report.

Everything a notebook needs is re-exported by ``phi_helpers`` itself; the modules here are
choices (default model id, devices, dtypes, attention implementations), loading, images, prompts
(build_prompt, Chat), generation (ask, streaming, batches), parsing (extract_json), structured (JSON
Schemas), metrics (CER, field match) and report (environment_report, format_table).
"""
