"""fleet-planner: accepts robot task requests, plans them, and counts how many completed
and how many failed (``fleet_tasks_total{result="completed|failed"}`` on ``/metrics``).

Standard library only (the image is Debian's python3 and nothing else). Settings come from
the environment first, then from ``config/`` baked into the image: ``config/<name>.<APP_ENV>``
(e.g. ``task_fail_percent.production``) before ``config/<name>``, so a commit can misbehave
in one environment only. Each is an integer:

- ``task_fail_percent``: share of planned tasks that fail (a business regression: the
  answer is still 200, only the result differs);
- ``fail_rate``: percent of ``/v1/status`` and ``/v1/tasks`` answered 500;
- ``status_delay_ms``: added to each ``/v1/status`` and ``/v1/tasks`` answer;
- ``crash_after_seconds``: the process exits (status 3) that long after it starts;
- ``leak_mb_per_second``: memory it allocates and keeps, every second;
- ``burn_cpu_workers``: busy-looping child processes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

APP_DIR = Path(os.environ.get("APP_DIR", Path(__file__).resolve().parent))
SETTINGS = (
    "task_fail_percent",
    "fail_rate",
    "status_delay_ms",
    "crash_after_seconds",
    "leak_mb_per_second",
    "burn_cpu_workers",
)
DEFAULTS = {"task_fail_percent": 1}


def setting(name: str, env: str | None = None, config_dir: Path | None = None) -> int:
    """The integer setting ``name``: environment (upper case), then config files."""
    raw = os.environ.get(name.upper())
    folder = config_dir or APP_DIR / "config"
    app_env = os.environ.get("APP_ENV", "") if env is None else env
    candidates = [f"{name}.{app_env}", name] if app_env else [name]
    for candidate in candidates:
        if raw is not None:
            break
        path = folder / candidate
        if path.is_file():
            raw = path.read_text().strip()
    try:
        return int(raw) if raw not in (None, "") else DEFAULTS.get(name, 0)
    except ValueError:
        return DEFAULTS.get(name, 0)


class Counters:
    """Thread-safe task counters, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks = {"completed": 0, "failed": 0}
        self.requests = 0

    def add(self, result: str) -> None:
        with self.lock:
            self.tasks[result] += 1

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP fleet_tasks_total Robot tasks planned, by result.",
                "# TYPE fleet_tasks_total counter",
            ]
            lines += [f'fleet_tasks_total{{result="{r}"}} {n}' for r, n in self.tasks.items()]
            lines += [
                "# HELP fleet_planner_info The running build.",
                "# TYPE fleet_planner_info gauge",
                f'fleet_planner_info{{version="{os.environ.get("APP_VERSION", "unknown")}"}} 1',
            ]
        return "\n".join(lines) + "\n"


class Planner:
    def __init__(self, settings: dict[str, int], rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.counters = Counters()

    def plan(self, robot: str) -> tuple[int, dict[str, object]]:
        """Plan one task: (HTTP status, JSON body). A failed task is still a 200."""
        if self.rng.randrange(100) < self.settings["fail_rate"]:
            return 500, {"ok": False, "error": "injected failure"}
        failed = self.rng.randrange(100) < self.settings["task_fail_percent"]
        result = "failed" if failed else "completed"
        self.counters.add(result)
        return 200, {"ok": True, "robot": robot, "result": result}

    def status(self) -> tuple[int, dict[str, object]]:
        if self.rng.randrange(100) < self.settings["fail_rate"]:
            return 500, {"ok": False, "error": "injected failure"}
        return 200, {
            "ok": True,
            "service": "fleet-planner",
            "version": os.environ.get("APP_VERSION", "unknown"),
        }


def make_handler(planner: Planner) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # the ingress logs requests; keep the container log for events

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, body: dict[str, object]) -> None:
            self._send(status, json.dumps(body) + "\n", "application/json")

        def _delay(self) -> None:
            delay = planner.settings["status_delay_ms"]
            if delay > 0:
                time.sleep(delay / 1000)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/healthz":
                self._send(200, "ok\n", "text/plain")
            elif url.path == "/metrics":
                self._send(200, planner.counters.render(), "text/plain; version=0.0.4")
            elif url.path == "/v1/status":
                self._delay()
                self._json(*planner.status())
            elif url.path in ("/v1/tasks", "/v1/tasks/plan"):
                self._delay()
                robot = parse_qs(url.query).get("robot", [f"r{planner.rng.randrange(64)}"])[0]
                self._json(*planner.plan(robot))
            else:
                self._json(404, {"ok": False, "error": f"no route {url.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            if urlparse(self.path).path != "/v1/tasks":
                self._json(404, {"ok": False, "error": "no route"})
                return
            try:
                robot = str(json.loads(raw or b"{}").get("robot", "r0"))
            except ValueError:
                self._json(400, {"ok": False, "error": "body must be JSON"})
                return
            self._delay()
            self._json(*planner.plan(robot))

    return Handler


def _misbehave(settings: dict[str, int]) -> None:
    """The regressions a release must catch, each off by default."""
    if settings["burn_cpu_workers"] > 0:
        for _ in range(settings["burn_cpu_workers"]):
            # Niced: the burner takes the CPU the server leaves, so the regression shows
            # in CPU first rather than in the server's latency.
            subprocess.Popen([sys.executable, "-c", "import os\nos.nice(19)\nwhile True: pass"])
    if settings["leak_mb_per_second"] > 0:
        leak: list[bytearray] = []

        def grow() -> None:
            while True:
                # Written, not only reserved: the pages count in the working set.
                leak.append(bytearray(b"\x01") * (settings["leak_mb_per_second"] << 20))
                time.sleep(1)

        threading.Thread(target=grow, daemon=True).start()
    if settings["crash_after_seconds"] > 0:

        def crash() -> None:
            time.sleep(settings["crash_after_seconds"])
            print("fleet-planner: crashing as configured (crash_after_seconds)", flush=True)
            os._exit(3)

        threading.Thread(target=crash, daemon=True).start()


def main() -> None:
    settings = {name: setting(name) for name in SETTINGS}
    port = int(os.environ.get("PORT", "8000"))
    planner = Planner(settings)
    server = ThreadingHTTPServer(("0.0.0.0", port), make_handler(planner))
    server.daemon_threads = True
    print(f"fleet-planner {os.environ.get('APP_VERSION', 'unknown')} on :{port} {settings}")
    _misbehave(settings)
    server.serve_forever()


if __name__ == "__main__":
    main()
