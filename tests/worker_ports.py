"""Ports for tf.distribute worker processes, reserved without a race.

Binding port 0, closing the socket and handing the number to a worker
leaves a window in which another process (another pytest-xdist worker, say)
can take the port before the worker binds it. Instead the sockets that
chose the ports stay open, bound with SO_REUSEPORT, until the workers have
exited: the kernel gives the ports to no one else (binding port 0 never
shares a port, and a socket without SO_REUSEPORT cannot bind them), while
the workers' gRPC servers, started with SO_REUSEPORT too, can. A bound
socket that does not listen receives no connections, so the servers get
them all.

TensorFlow's gRPC server binds without SO_REUSEPORT unless the environment
variable TF_GRPC_REUSE_PORT is true: without it a worker fails with "Could
not start gRPC server" while the port is reserved (measured with
TensorFlow 2.21 on Linux). `run_workers` starts them so.
"""

import contextlib
import json
import os
import socket
import subprocess

WORKER_ENV = {"TF_GRPC_REUSE_PORT": "1"}


@contextlib.contextmanager
def reserved_ports(count, host="127.0.0.1"):
    """Yields `count` distinct free ports, reserved until the block exits."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        yield ports


def run_workers(command, timeout, env=None, count=2):
    """Runs `count` worker processes of a MultiWorkerMirroredStrategy
    cluster on 127.0.0.1, `command(index)` each (a list of arguments), with
    TF_CONFIG, `WORKER_ENV` and `env` added to this process's environment.
    Returns their exit codes and their output (stdout and stderr).

    The ports stay reserved until every worker has exited; a worker still
    running after `timeout` seconds is killed.
    """
    with reserved_ports(count) as ports:
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        workers = []
        try:
            for index in range(count):
                task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
                workers.append(
                    subprocess.Popen(
                        command(index),
                        env={
                            **os.environ,
                            **WORKER_ENV,
                            **(env or {}),
                            "TF_CONFIG": json.dumps(task),
                        },
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            logs = [worker.communicate(timeout=timeout)[0] for worker in workers]
        finally:
            for worker in workers:  # stop by itself, whatever happened
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
    return [worker.returncode for worker in workers], logs
