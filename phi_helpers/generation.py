# placeholder: being written by the user-API helper
ask = None
