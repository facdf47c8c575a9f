"""Unit tests of fleet-planner, stdlib unittest (run: python3 -m unittest discover tests)."""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import unittest
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "app"))

import fleet_planner as fp


def settings(**overrides: int) -> dict[str, int]:
    values = {name: fp.DEFAULTS.get(name, 0) for name in fp.SETTINGS}
    values.update(overrides)
    return values


class SettingsTest(unittest.TestCase):
    def test_environment_file_wins_over_the_plain_one(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "task_fail_percent").write_text("1\n")
            (folder / "task_fail_percent.production").write_text("40\n")
            self.assertEqual(fp.setting("task_fail_percent", "production", folder), 40)
            self.assertEqual(fp.setting("task_fail_percent", "staging", folder), 1)
            self.assertEqual(fp.setting("fail_rate", "staging", folder), 0)


class PlannerTest(unittest.TestCase):
    def test_failed_tasks_are_counted_and_still_answer_200(self) -> None:
        planner = fp.Planner(settings(task_fail_percent=100), random.Random(1))
        status, body = planner.plan("r1")
        self.assertEqual((status, body["result"]), (200, "failed"))
        self.assertIn('fleet_tasks_total{result="failed"} 1', planner.counters.render())
        self.assertIn('fleet_tasks_total{result="completed"} 0', planner.counters.render())

    def test_fail_rate_answers_500_and_counts_no_task(self) -> None:
        planner = fp.Planner(settings(fail_rate=100), random.Random(1))
        self.assertEqual(planner.plan("r1")[0], 500)
        self.assertEqual(planner.status()[0], 500)
        self.assertEqual(planner.counters.tasks, {"completed": 0, "failed": 0})


class HttpTest(unittest.TestCase):
    def test_paths_over_http(self) -> None:
        planner = fp.Planner(settings(task_fail_percent=0), random.Random(1))
        server = ThreadingHTTPServer(("127.0.0.1", 0), fp.make_handler(planner))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:  # noqa: S310
                self.assertEqual(r.status, 200)
            with urllib.request.urlopen(f"{base}/v1/tasks/plan?robot=r9", timeout=5) as r:  # noqa: S310
                self.assertEqual(json.loads(r.read())["result"], "completed")
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:  # noqa: S310
                self.assertIn('fleet_tasks_total{result="completed"} 1', r.read().decode())
        finally:
            server.shutdown()


if __name__ == "__main__":
    unittest.main()
