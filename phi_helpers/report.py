# placeholder: being written by the user-API helper
environment_report = None
