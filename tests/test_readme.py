"""The README, executed: every fenced ``python`` block runs against the reference
provider, and the settings its shell examples show are ones that work as shown.

A ``python`` block is a program.  One that runs a worker host (``run_host(``) is
started first, in the background, and must be ready (its ``/readyz``) before the
others run; at the end it is stopped with SIGTERM and must exit 0.  Every other
block runs to completion and must exit 0.  They run as a user would run them: a
file of their own, ``python FILE``, with ``BUS_EVENTS_API_URL`` and
``BUS_API_TOKEN`` set.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from busevents.provider import open_provider, secret_from_env

from .services import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


async def test_every_python_block_of_the_readme_runs_against_the_reference_provider(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    blocks = fenced("python")
    assert len(blocks) >= 3
    hosts = [block for block in blocks if "run_host(" in block]
    programs = [block for block in blocks if block not in hosts]
    async with open_provider() as provider, httpx.AsyncClient(timeout=5) as http:
        env = {**cli_env, "BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()}
        running: list[trio.Process] = []
        try:
            for number, block in enumerate(hosts):
                script = tmp_path / f"host_{number}.py"
                script.write_text(block, encoding="utf-8")
                health = f"127.0.0.1:{free_port()}"
                proc = await trio.lowlevel.open_process(
                    [sys.executable, str(script)],
                    env={**env, "BUS_EVENTS_HEALTH_ADDR": health},
                    stderr=subprocess.DEVNULL,
                )
                running.append(proc)
                with trio.fail_after(30):
                    while True:
                        assert proc.poll() is None, f"the README's worker block exited:\n{block}"
                        try:
                            if (await http.get(f"http://{health}/readyz")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.1)
            outputs = []
            for number, block in enumerate(programs):
                script = tmp_path / f"program_{number}.py"
                script.write_text(block, encoding="utf-8")
                with trio.fail_after(40):
                    done = await trio.run_process(
                        [sys.executable, str(script)],
                        env=env,
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                assert done.returncode == 0, f"{block}\n{done.stderr.decode()}"
                outputs.append(done.stdout.decode())
            # What the README says they print.
            assert any("{'echo': {'n': 1}}" in out for out in outputs), outputs
            assert any(out.startswith("published ") for out in outputs), outputs
        finally:
            for proc in running:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(20):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert [proc.returncode for proc in running] == [0] * len(hosts)


def test_the_readme_secrets_are_long_enough_for_serve() -> None:
    # `serve` warns about a secret shorter than 32 bytes; the README's own must not.
    values = re.findall(r"BUS_API_JWT_SECRET=(\S+)", README)
    assert values
    for value in values:
        assert len(secret_from_env(value.strip("'\""))) >= 32, value


def test_the_durable_example_gives_the_deployment_its_own_redis_prefix() -> None:
    durable = [block for block in fenced("sh") if "--events-backend redis" in block]
    assert durable
    for block in durable:
        assert re.search(r"BUS_EVENTS_REDIS_PREFIX=\S+", block), block


def test_the_quick_start_says_how_long_the_tests_take_and_what_they_use() -> None:
    quick = section("Quick start")
    assert re.search(r"about \d+\u2013\d+ minutes", quick)  # an en dash, as typeset
    assert "Redis" in quick and "PostgreSQL" in quick
