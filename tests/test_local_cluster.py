"""The Serve settings neo-serve starts its own local clusters with (neo_serve/serve/local_cluster.py).
test_serve_launcher checks that they reach Serve's controller process."""

from __future__ import annotations

from neo_serve.serve.local_cluster import LOCAL_SERVE_SETTINGS, apply_local_serve_settings


def test_settings_are_set_where_the_user_left_them_unset():
    env: dict[str, str] = {"PATH": "/bin"}
    assert apply_local_serve_settings(env) == LOCAL_SERVE_SETTINGS
    assert env == {"PATH": "/bin", **LOCAL_SERVE_SETTINGS}
    assert float(env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]) > 0.1  # Serve's default loop is 0.1 s


def test_the_users_own_values_win():
    env = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}
    in_effect = apply_local_serve_settings(env)
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == in_effect["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == LOCAL_SERVE_SETTINGS["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]
