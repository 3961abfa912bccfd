"""`petal-serve CONFIG`: run the service until its sources end (files) or SIGTERM / SIGINT (exit 0);
SIGHUP reloads the gallery. `petal-serve --example-config` prints a commented config."""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from ..errors import exit_on_user_error

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command("petal-serve", context_settings=CONTEXT)
@click.argument("config_path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--example-config", is_flag=True, help="Print a commented configuration and exit.")
@click.option("--check", is_flag=True, help="Read and check the configuration, open models, gallery and sources, "
                                            "then exit without running.")
def serve_cli(config_path: Path | None, example_config: bool, check: bool) -> None:
    """Run many sources in one process; events as JSON lines, webhook; /healthz, /metrics, /sources."""
    from .config import EXAMPLE_CONFIG, ServeConfig

    if example_config:
        click.echo(EXAMPLE_CONFIG, nl=False)
        return
    if config_path is None:
        raise click.UsageError("give a CONFIG file (petal-serve --example-config prints one)")
    config = ServeConfig.load(config_path)
    from ..cli import _quiet_opencv
    from .service import Service

    _quiet_opencv()
    service = Service(config)
    if check:
        service.close()
        click.echo(f"{config_path}: {len(config.source)} sources, models and gallery ok", err=True)
        return
    stop = threading.Event()
    signals = []

    def on_stop(signum, _frame):
        stop.set()

    def on_hup(signum, _frame):
        service.request_reload()

    if threading.current_thread() is threading.main_thread():
        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
            signals.append((sig, signal.signal(sig, handler)))
    try:
        service.start()
        if service.http is not None:
            click.echo(f"petal-serve: {len(config.source)} sources; {service.http.url}/metrics", err=True)
        while not stop.is_set() and not service.wait(timeout=0.2):
            pass
    finally:
        service.stop()
        for sig, old in signals:
            signal.signal(sig, old)
        sys.stdout.flush()


main = exit_on_user_error(serve_cli)
