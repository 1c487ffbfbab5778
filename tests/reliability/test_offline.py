"""Offline: `mm train` with log.report_to=wandb, no API key, WANDB_MODE unset and every network
connection refused goes offline and finishes; it never fails or hangs (bounded wait)."""

from __future__ import annotations

import textwrap

from tests.helpers import mm_env

from .conftest import Launch, vq_args

# Loaded by every Python process of the run (PYTHONPATH): connections to anything but this
# machine raise, as on a machine without network; each attempt is written to a file.
BLOCK_NETWORK = textwrap.dedent("""
    import os, socket

    _connect = socket.socket.connect
    _log = os.environ["MM_TEST_NET_LOG"]
    open(_log, "a").write(f"loaded {os.getpid()}\\n")

    def _refuse(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            open(_log, "a").write(f"blocked {address}\\n")
            raise OSError(101, "Network is unreachable (blocked by the test)")
        return _connect(self, address)

    socket.socket.connect = _refuse
""")


def test_wandb_without_key_goes_offline_and_finishes(tmp_path, shapes_cache):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_NETWORK)
    net_log = tmp_path / "net.log"
    env = mm_env(PYTHONPATH=site, MM_TEST_NET_LOG=net_log, HOME=tmp_path / "home", WANDB_SILENT="true")
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        env.pop(key, None)
    run = tmp_path / "run"
    launch = Launch(vq_args(run, shapes_cache, **{"train.max_steps": 2, "train.checkpoint_every": 0,
                                                  "log.report_to": "wandb"}), tmp_path / "logs", env=env)
    assert launch.wait(timeout=240) == 0, launch.stderr()[-3000:]
    assert "logging to wandb offline" in launch.stderr()
    assert (run / "final" / "model.safetensors").exists()
    assert list((run / "wandb").glob("offline-run-*")), "wandb kept no offline run to sync later"
    assert net_log.read_text().startswith("loaded"), "the network block was not active"
