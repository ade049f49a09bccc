"""Running on a Ray cluster: the cluster/ scripts, the launcher config, `crlft submit / jobs / stop`; and, end to end
(slow), the pipeline submitted through the Jobs API to a real two-node cluster started with cluster/start-local.sh,
its champion found in MLflow, served by Ray Serve on that cluster and answering the openai client, and the cluster
stopped with no Ray process left behind."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cluster.session import free_port, ingress_env, remove_haproxy_folders
from crlft.config import Config, load_config
from crlft.environ import environment
from crlft.errors import CrlftError
from jobs import submit

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
SCRIPTS = ("local-env.sh", "start-local.sh", "stop-local.sh")
BIN = Path(sys.executable).parent
WORKER_PORTS = 20  # per node, in the e2e cluster


def run_script(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER / name), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# ---------------------------------------------------------------------------------------------------------------------
# The scripts and the launcher config


@pytest.mark.parametrize("script", SCRIPTS)
def test_cluster_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(CLUSTER / script)], check=False).returncode == 0


def test_start_refuses_an_unknown_option_and_a_port_that_is_not_a_number():
    unknown = run_script("start-local.sh", "--gcs-prot", "1")
    assert unknown.returncode == 2 and "unknown option --gcs-prot" in unknown.stderr
    bad_port = run_script("start-local.sh", env={**os.environ, "CRLFT_RAY_DASHBOARD_PORT": "82a"})
    assert bad_port.returncode == 2 and "CRLFT_RAY_DASHBOARD_PORT=82a is not a whole number" in bad_port.stderr


def test_head_and_worker_node_ports_are_disjoint_blocks_from_the_port_base():
    script = f"source {CLUSTER / 'local-env.sh'} --port-base 30000 --worker-ports 5; node_ports 0; node_ports 1"
    head, worker = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split(
        "\n"
    )[:2]

    def ports(flags: str) -> set[int]:
        values = dict(flag.lstrip("-").split("=") for flag in flags.split())
        low, high = int(values.pop("min-worker-port")), int(values.pop("max-worker-port"))
        return {int(v) for v in values.values()} | set(range(low, high + 1))

    assert ports(head) == set(range(30000, 30006)) | set(range(30010, 30015))
    assert ports(worker) == set(range(30015, 30021)) | set(range(30025, 30030))


def test_stop_without_a_running_cluster_does_nothing(tmp_path):
    result = run_script("stop-local.sh", "--cluster-dir", str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_cluster_launcher_config_is_valid_for_ray_up_and_keeps_token_auth_on():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text(encoding="utf-8"))
    validate_config(prepare_config(copy_of(config)))
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in command for command in starts)
    assert all("RAY_SERVE_ENABLE_HA_PROXY=1" in command for command in starts)  # the endpoint's ingress, every node
    retry_on = ingress_env(Config())["RAY_SERVE_HAPROXY_RETRY_ON"]  # ... with the fault settings of `crlft serve`'s
    quoted = "$'" + retry_on.replace("\n", "\\n") + "'"  # bash's quoting, its second line included
    assert all(f"RAY_SERVE_HAPROXY_RETRY_ON={quoted}" in c and "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT=1" in c
               for c in starts)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]


def copy_of(config: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(config))


def test_a_mistake_in_the_cluster_launcher_config_is_an_error():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text(encoding="utf-8"))
    config["available_node_types"]["gpu"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))


# ---------------------------------------------------------------------------------------------------------------------
# crlft submit / jobs / stop, without a cluster


def test_stages_run_as_python_dash_m_commands_of_the_project():
    stages = submit.stage_entrypoints()
    assert stages["pipeline"] == ["python", "-m", "jobs.pipeline"]
    assert stages["train"] == ["python", "-m", "jobs.train"]
    assert stages["data-build"] == stages["build_dataset"] == ["python", "-m", "jobs.build_dataset"]
    assert stages["synth"] == ["python", "-m", "jobs.cli", "synth"]
    assert not {"submit", "jobs", "stop"} & set(stages)
    assert submit.entrypoint_for("pipeline", ["--set", "train.epochs=1", "a b.jsonl"], REPO) == (
        "python -m jobs.pipeline --set train.epochs=1 'a b.jsonl'"
    )


def test_an_unknown_stage_or_a_working_dir_without_its_module_is_a_user_error(tmp_path):
    with pytest.raises(CrlftError, match="unknown stage 'pipline'; stages: .*pipeline"):
        submit.entrypoint_for("pipline", [], REPO)
    with pytest.raises(CrlftError, match="jobs/pipeline.py does not exist: submit from the project root"):
        submit.entrypoint_for("pipeline", [], tmp_path)


def test_runtime_env_comes_from_the_file_with_the_flags_on_top(tmp_path):
    (tmp_path / "env.yaml").write_text("working_dir: code\nenv_vars: {A: '1'}\npip: [x==1]\n", encoding="utf-8")
    env = submit.load_runtime_env("env.yaml", env=["B=2", "A=3"], pip=["y==2"], base_dir=tmp_path)
    assert env == {"working_dir": str(tmp_path / "code"), "env_vars": {"A": "3", "B": "2"}, "pip": ["x==1", "y==2"]}
    assert submit.load_runtime_env(None, working_dir="/w", base_dir=tmp_path) == {"working_dir": "/w"}
    shipped = submit.load_runtime_env(None, base_dir=REPO)
    assert shipped["working_dir"] == str(REPO) and ".venv" in shipped["excludes"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "missing.yaml"}, "--runtime-env missing.yaml: no such file"),
        ({"path": None, "env": ["NOVALUE"]}, "--env 'NOVALUE': expected KEY=VALUE"),
    ],
)
def test_a_bad_runtime_env_flag_is_a_user_error(tmp_path, kwargs, message):
    with pytest.raises(CrlftError, match=message):
        submit.load_runtime_env(base_dir=tmp_path, **kwargs)


def test_submit_options_after_the_stage_are_submits_and_everything_after_a_double_dash_is_the_stages():
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    args = parser.parse_args(
        ["--env", "A=1", "pipeline", "--address", "http://h:1", "--epochs", "1", "--follow", "--", "--env", "B=2"]
    )
    options, stage_args = submit.split_stage_args(args)
    assert (options.stage, options.address, options.follow, options.env) == ("pipeline", "http://h:1", True, ["A=1"])
    assert stage_args == ["--epochs", "1", "--env", "B=2"]


def test_an_explicit_address_wins_over_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert submit.resolve_address("http://flag:8265") == "http://flag:8265"
    assert submit.resolve_address(None) == "http://from-env:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert submit.resolve_address(None) == submit.DEFAULT_ADDRESS


def test_a_local_ray_gets_the_ingress_environment_only_while_it_starts_and_the_users_values_win(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "8555")
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    with environment(ingress_env(Config())) as in_effect:
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert in_effect["RAY_SERVE_HAPROXY_STATS_PORT"] == "8555"
        # A free port for HAProxy's metrics page, not Ray's fixed 9101: local sessions run side by side. The fallback
        # proxy binds a port of its own (cluster/haproxy_pages.py): nothing to set.
        assert in_effect["RAY_SERVE_HAPROXY_METRICS_PORT"] != "9101"
        assert "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT" not in in_effect
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "8555"
    assert ingress_env(load_config(None, {"serve.ingress": "serve-proxy"})) == {}


def test_a_stopped_session_removes_its_nodes_haproxy_folder_and_no_other_sessions(monkeypatch, tmp_path):
    base = tmp_path / "haproxy-serve"
    ours, theirs = base / "node-a", base / "node-b"
    for folder in (ours, theirs):
        folder.mkdir(parents=True)
        (folder / "haproxy.cfg").write_text("")
    monkeypatch.setitem(sys.modules, "ray.serve._private.constants", SimpleNamespace(
        RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(base / "haproxy.cfg"), RAY_SERVE_HAPROXY_SOCKET_PATH=str(base / "s"),
        RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(base / "state"), RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=str(base / "m"),
        RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(base)))
    remove_haproxy_folders("")  # no node id: never the folder of every node
    remove_haproxy_folders("node-a")
    assert sorted(folder.name for folder in base.iterdir()) == ["node-b"]


def test_environment_blocks_of_two_threads_take_turns_and_leave_nothing_behind(monkeypatch):
    """os.environ is one per process: overlapping, the second block would put back the first block's value after the
    first had removed it (a vLLM start's variables left set for every later process, as the ablation's parallel runs
    once did)."""
    monkeypatch.delenv("CRLFT_TEST_VARIABLE", raising=False)
    first_in, first_may_leave, second_done = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with environment({"CRLFT_TEST_VARIABLE": "first"}):
            first_in.set()
            first_may_leave.wait(10)

    def second() -> None:
        with environment({"CRLFT_TEST_VARIABLE": "second"}, override=True):
            second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    assert not second_done.wait(0.3)  # waits for the first block to end
    first_may_leave.set()
    for thread in threads:
        thread.join(10)
    assert second_done.is_set() and "CRLFT_TEST_VARIABLE" not in os.environ


def test_an_unreachable_jobs_api_is_a_user_error_that_says_what_to_do():
    with pytest.raises(CrlftError, match=r"no Ray Jobs API at http://127.0.0.1:\d+ .*cluster/start-local.sh"):
        submit.connect(f"http://127.0.0.1:{free_port()}")


# ---------------------------------------------------------------------------------------------------------------------
# End to end on a real two-node cluster


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def free_port_block(size: int, low: int = 20000, high: int = 32000) -> int:
    """The first port of `size` consecutive free ports below the ephemeral range (other Ray users share the box)."""
    for base in range(low + (os.getpid() % 50) * 200, high - size, size):
        if all(port_is_free(port) for port in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports in [{low}, {high})")


def process_tree(roots: list[int]) -> set[int]:
    """The given pids and all their descendants, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree = set(roots)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


def running(pids: set[int]) -> set[int]:
    """Those of the pids that still run (zombies have exited)."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.add(pid)
    return alive


def processes_mentioning(text: str) -> set[int]:
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
    return running(found)


def crlft(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "crlft"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def local_cluster(env: dict[str, str], cluster_dir: str) -> Iterator[set[int]]:
    """Starts the two-node cluster and stops it at exit; the yielded set then holds the pids the cluster ran last."""
    started = run_script("start-local.sh", env=env, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    seen: set[int] = set()
    try:
        yield seen
    finally:
        roots = [
            int(Path(cluster_dir, f"{node}.pid").read_text())
            for node in ("head", "worker")
            if Path(cluster_dir, f"{node}.pid").is_file()
        ]
        seen |= process_tree(roots)
        stopped = run_script("stop-local.sh", env=env, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def wait_for_serve(url: str, app: str, timeout_s: float) -> str:
    import httpx

    deadline = time.monotonic() + timeout_s
    status = "not deployed"
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            status = httpx.get(f"{url}/api/serve/applications/", timeout=10).json()["applications"][app]["status"]
            if status in {"RUNNING", "DEPLOY_FAILED"}:
                return status
        time.sleep(2)
    return status


def cluster_env(cluster_dir: str, **extra: str) -> dict[str, str]:
    """The environment for the cluster scripts and crlft: free ports everywhere, no inherited cluster address."""
    env = {key: value for key, value in os.environ.items() if key not in submit.ADDRESS_ENV_VARS}
    env.update(
        CRLFT_RAY_GCS_PORT=str(free_port()),
        CRLFT_RAY_DASHBOARD_PORT=str(free_port()),
        CRLFT_RAY_CLIENT_PORT=str(free_port()),
        CRLFT_RAY_WORKER_PORTS=str(WORKER_PORTS),
        CRLFT_RAY_PORT_BASE=str(free_port_block(2 * (10 + WORKER_PORTS))),
        CRLFT_CLUSTER_DIR=cluster_dir,
        RAY_AUTH_MODE="disabled",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra)
    return env


@pytest.mark.slow
def test_pipeline_submitted_to_a_two_node_cluster_registers_a_champion_that_serve_on_the_cluster_answers(tmp_path):
    from mlflow import MlflowClient
    from openai import OpenAI

    cluster_dir = tempfile.mkdtemp(prefix="crlft-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = cluster_env(cluster_dir)
    gcs, dashboard, serve_port = int(env["CRLFT_RAY_GCS_PORT"]), int(env["CRLFT_RAY_DASHBOARD_PORT"]), free_port()
    state, tracking_uri = tmp_path / "state", f"sqlite:///{tmp_path / 'mlflow.db'}"
    address = f"http://127.0.0.1:{dashboard}"
    try:
        with local_cluster(env, cluster_dir) as cluster_pids:
            # The pipeline on the tiny defaults, through the Jobs API, with the working directory shipped.
            job = crlft(
                "submit",
                "pipeline",
                "--address",
                address,
                "--follow",
                "--state-dir",
                str(state),
                "--mlflow-uri",
                tracking_uri,
                "--max-steps",
                "8",
                env=env,
                timeout=900,
            )
            assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
            assert "SUCCEEDED" in job.stderr
            listed = crlft("jobs", "--address", address, env=env, timeout=60)
            assert "SUCCEEDED" in listed.stdout and "python -m jobs.pipeline" in listed.stdout

            champion = MlflowClient(tracking_uri).get_model_version_by_alias("crlft-chat", "champion")
            assert int(champion.version) >= 1

            # Serve it on the same cluster, the way KubeRay's RayService does: a Serve config through the dashboard.
            config = {
                "proxy_location": "HeadOnly",  # both nodes share this machine: one proxy, one port
                "http_options": {"host": "127.0.0.1", "port": serve_port},
                "applications": [
                    {
                        "name": "crlft-chat",
                        "route_prefix": "/",
                        "import_path": "services.chat:build_app",
                        "args": {
                            "model": "models:/crlft-chat@champion",
                            "tracking_uri": tracking_uri,
                            "api_keys": ["e2e-key"],
                            "overrides": {"serve.max_new_tokens": 16},
                        },
                        "deployments": [{"name": "ChatServer", "ray_actor_options": {"num_cpus": 0.5}}],
                    }
                ],
            }
            config_file = tmp_path / "serve.yaml"
            config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
            deployed = subprocess.run(
                [str(BIN / "serve"), "deploy", str(config_file), "-a", address],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert deployed.returncode == 0, deployed.stderr[-4000:]
            assert wait_for_serve(address, "crlft-chat", timeout_s=300) == "RUNNING"

            chat = OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="e2e-key", timeout=120)
            assert [model.id for model in chat.models.list().data] == ["crlft-chat"]
            answer = chat.chat.completions.create(
                model="crlft-chat", messages=[{"role": "user", "content": "What comes after A?"}], max_tokens=8
            )
            assert isinstance(answer.choices[0].message.content, str)
            assert answer.usage.completion_tokens > 0

        assert len(cluster_pids) > 10
        assert running(cluster_pids) == set(), "Ray processes left behind"
        assert processes_mentioning(cluster_dir) == set()
        assert not listening(gcs) and not listening(dashboard) and not listening(serve_port)
    finally:
        shutil.rmtree(cluster_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_cluster_with_token_authentication_answers_only_clients_that_send_its_token(tmp_path):
    cluster_dir = tempfile.mkdtemp(prefix="crlft-ray-", dir="/tmp")
    token = os.urandom(16).hex()
    env = cluster_env(cluster_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    address = f"http://127.0.0.1:{env['CRLFT_RAY_DASHBOARD_PORT']}"
    try:
        with local_cluster(env, cluster_dir):
            no_token = crlft("jobs", "--address", address, env={**env, "RAY_AUTH_MODE": "disabled"}, timeout=60)
            assert no_token.returncode == 2
            assert "Authentication required" in no_token.stderr and "RAY_AUTH_MODE=token" in no_token.stderr
            wrong = crlft("jobs", "--address", address, env={**env, "RAY_AUTH_TOKEN": "not-" + token}, timeout=60)
            assert wrong.returncode == 2 and "Authentication failed" in wrong.stderr

            out = tmp_path / "suite"
            job = crlft(
                "submit",
                "synth",
                "--address",
                address,
                "--follow",
                "--out",
                str(out),
                "--n-expert",
                "2",
                "--n-eval",
                "2",
                env=env,
                timeout=300,
            )
            assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
            assert (out / "eval.jsonl").is_file()
    finally:
        shutil.rmtree(cluster_dir, ignore_errors=True)
