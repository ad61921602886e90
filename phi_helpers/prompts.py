# placeholder: being written by the user-API helper
Chat = build_prompt = None
