# placeholder: being written by the user-API helper
extract_json = None
