"""A local S3-compatible server for tests: moto's server mode in a child process on 127.0.0.1.

Authentication is on (``INITIAL_NO_AUTH_ACTION_COUNT``): the first requests create an IAM user with an
access key, and from then on the server refuses a wrong key or secret, as a real bucket does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

SETUP_ACTIONS = 3  # create_user, put_user_policy, create_access_key


@dataclass
class S3Server:
    """A running local server and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def env(self, **changes: str) -> dict[str, str]:
        """The AWS variables that point a client at this server (``~/.aws`` files hidden)."""
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        env.update(changes)
        return env

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...] = ("amflow-test",)) -> Iterator[S3Server]:
    """Starts moto's server on a free port, makes the buckets, and stops the server afterwards."""
    import boto3

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_ACTIONS))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local S3 server did not start") from None
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **kw)
        iam.create_user(UserName="amflow")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="amflow", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="amflow")["AccessKey"]
        server = S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], proc)
        for bucket in buckets:
            server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        proc.kill()
        proc.wait()
