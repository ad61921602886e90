"""Run a function in another thread, for the tests of what one thread sees while another works: shared
by test_generation.py and test_prompts.py."""

import threading


def run_with_watchdog(function, seconds=60):
    """Run ``function`` in a thread and return {"value": ...} or {"error": ...}; fail (instead of hanging
    the suite) if it does not finish within ``seconds``."""
    result = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as error:  # noqa: BLE001
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    return result
