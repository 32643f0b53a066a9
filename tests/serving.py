"""``python -m refusion_mlx.server`` in a subprocess, for the server's tests."""

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import openai
from conftest import with_root_on_path

CORS_ORIGIN = "http://frontend.example"
# A completion prompt in the demo's trained chat format whose answer (30 numbers, ~140 tokens) runs
# well past a small max_tokens. Off its trained formats (a plain-text prompt) the demo's answer may
# end after a few tokens, or never, depending on its weights: tests that need a cut use this.
LONG_PROMPT = ("<|im_start|>user\nWrite 30 numbers, starting from 25 and adding 9 each time.<|im_end|>\n"
               "<|im_start|>assistant\n")


class Server:
    """``python -m refusion_mlx.server --port 0`` in a subprocess; the port is read from its first line."""

    def __init__(self, *flags):
        env = {**os.environ, "PYTHONPATH": with_root_on_path()}
        self.process = subprocess.Popen([sys.executable, "-m", "refusion_mlx.server", "--port", "0", *flags],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if "http://" not in line:
            self.process.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.process.stderr.read()}")
        self.url = line.split()[3]  # http://127.0.0.1:PORT/v1
        self.host, self.port = self.url.split("//")[1].split("/")[0].split(":")
        self.port = int(self.port)
        self.client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)

    def request(self, method, path, body=None, headers=None):
        """(status, headers, raw body) of one plain HTTP request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def raw(self, method, path, body=None, headers=None):
        """(status, parsed JSON) of one plain HTTP request."""
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def health(self):
        return self.raw("GET", "/health")[1]

    def health_after_disconnect(self, before: int, timeout: float = 30.0):
        """/health once a disconnect beyond ``before`` is counted and nothing runs (or at the timeout)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            health = self.health()
            if health["disconnected"] > before and health["running"] == 0:
                break
            time.sleep(0.05)
        return health

    def stop(self, sig=signal.SIGINT):
        """Ctrl-C (or ``sig``); returns (exit status, stderr)."""
        self.process.send_signal(sig)
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return self.process.returncode, err
