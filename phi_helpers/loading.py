# placeholder: being written by the user-API helper
load_model = None
