"""ServerConfig: TLSERVE_* variables, flags on top, a sentence naming a bad key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tlserve.server.config import ConfigError, ServerConfig

REPO = {"TLSERVE_MODEL_REPOSITORY": "/srv/models"}


def test_defaults_are_production_safe() -> None:
    config = ServerConfig.load(environ=REPO)
    assert config.model_repository == Path("/srv/models")
    assert config.host == "127.0.0.1"
    assert (config.grpc_port, config.metrics_port) == (8001, 8002)
    assert config.device == "auto"
    assert config.max_batch_size == 32
    assert config.max_queue_delay == 0.0
    assert config.max_queue_size == 256  # bounded
    assert (config.drain_delay, config.grace) == (5.0, 10.0)
    assert config.max_message_bytes == 64 * 1024 * 1024  # not gRPC's 4 MiB
    assert config.log_level == "INFO"


def test_the_config_is_frozen() -> None:
    config = ServerConfig.load(environ=REPO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grpc_port = 1  # type: ignore[misc]


def test_environment_variables_are_parsed_with_their_types() -> None:
    config = ServerConfig.load(
        environ={
            **REPO,
            "TLSERVE_HOST": "0.0.0.0",
            "TLSERVE_GRPC_PORT": "9001",
            "TLSERVE_METRICS_PORT": " 9002 ",
            "TLSERVE_DEVICE": "cpu",
            "TLSERVE_MAX_BATCH_SIZE": "64",
            "TLSERVE_MAX_QUEUE_DELAY": "0.005",
            "TLSERVE_MAX_QUEUE_SIZE": "1024",
            "TLSERVE_DRAIN_DELAY": "0",
            "TLSERVE_GRACE": "2.5",
            "TLSERVE_INTRA_OP_THREADS": "4",
            "TLSERVE_PREPROCESS_THREADS": "8",
            "TLSERVE_LOG_LEVEL": "DEBUG",
            "TLSERVE_MAX_BATCH": "999",  # not a key: ignored
            "OTHER": "x",
        }
    )
    assert config.host == "0.0.0.0"
    assert config.grpc_port == 9001 and isinstance(config.grpc_port, int)
    assert config.metrics_port == 9002
    assert config.device == "cpu"
    assert config.max_batch_size == 64
    assert config.max_queue_delay == 0.005 and isinstance(config.max_queue_delay, float)
    assert config.max_queue_size == 1024
    assert config.drain_delay == 0.0
    assert config.grace == 2.5
    assert config.intra_op_threads == 4
    assert config.preprocess_threads == 8
    assert config.log_level == "DEBUG"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TLSERVE_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("TLSERVE_GRPC_PORT", "7001")
    config = ServerConfig.load()
    assert config.model_repository == tmp_path
    assert config.grpc_port == 7001


def test_an_empty_variable_counts_as_unset() -> None:
    config = ServerConfig.load(environ={**REPO, "TLSERVE_GRPC_PORT": "", "TLSERVE_DEVICE": ""})
    assert config.grpc_port == 8001
    assert config.device == "auto"


def test_overrides_beat_the_environment() -> None:
    config = ServerConfig.load(
        {"grpc_port": 7000, "model_repository": "/flag/models", "max_queue_delay": 0.01},
        environ={**REPO, "TLSERVE_GRPC_PORT": "9001", "TLSERVE_MAX_QUEUE_DELAY": "0.5"},
    )
    assert config.grpc_port == 7000
    assert config.model_repository == Path("/flag/models")
    assert config.max_queue_delay == 0.01


def test_none_overrides_are_not_given() -> None:
    config = ServerConfig.load(
        {"grpc_port": None, "device": None, "model_repository": None},
        environ={**REPO, "TLSERVE_GRPC_PORT": "9001"},
    )
    assert config.grpc_port == 9001
    assert config.device == "auto"
    assert config.model_repository == Path("/srv/models")


@pytest.mark.parametrize(
    ("key", "raw", "kind"),
    [
        ("TLSERVE_GRPC_PORT", "eighty", "int"),
        ("TLSERVE_MAX_BATCH_SIZE", "3.5", "int"),
        ("TLSERVE_MAX_QUEUE_DELAY", "5ms", "float"),
        ("TLSERVE_GRACE", "ten", "float"),
    ],
)
def test_an_unparsable_value_names_the_variable(key: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}='{raw}' is not a valid {kind}$"):
        ServerConfig.load(environ={**REPO, key: raw})


def test_a_config_error_is_in_the_error_tree() -> None:
    # The CLI reports every TlserveError as one line, without a traceback (exit 2: usage).
    from tlserve.contract.errors import InvalidInput

    assert issubclass(ConfigError, InvalidInput)


def test_a_missing_repository_says_how_to_give_one() -> None:
    with pytest.raises(ConfigError, match="--model-repository or set TLSERVE_MODEL_REPOSITORY"):
        ServerConfig.load(environ={"TLSERVE_GRPC_PORT": "9001"})
    with pytest.raises(ConfigError, match="--model-repository"):
        ServerConfig.load({"model_repository": None}, environ={})


@pytest.mark.parametrize("device", ["gpu", "CUDA", "tpu"])
def test_an_unknown_device_is_refused(device: str) -> None:
    with pytest.raises(ConfigError, match=f"TLSERVE_DEVICE must be one of .*got '{device}'"):
        ServerConfig.load(environ={**REPO, "TLSERVE_DEVICE": device})


@pytest.mark.parametrize("key", ["max_queue_delay", "drain_delay", "grace", "intra_op_threads"])
def test_a_negative_duration_or_count_is_refused(key: str) -> None:
    name = "TLSERVE_" + key.upper()
    with pytest.raises(ConfigError, match=f"{name} must not be negative, got -1"):
        ServerConfig.load(environ={**REPO, name: "-1"})


@pytest.mark.parametrize(
    "key", ["max_batch_size", "max_queue_size", "max_message_bytes", "preprocess_threads"]
)
def test_a_size_below_one_is_refused(key: str) -> None:
    name = "TLSERVE_" + key.upper()
    with pytest.raises(ConfigError, match=f"{name} must be at least 1, got 0"):
        ServerConfig.load({key: 0}, environ=REPO)


@pytest.mark.parametrize("port", [-1, 65536, 100_000])
@pytest.mark.parametrize("key", ["grpc_port", "metrics_port"])
def test_a_port_out_of_range_is_refused(key: str, port: int) -> None:
    name = "TLSERVE_" + key.upper()
    with pytest.raises(ConfigError, match=f"{name} must be a port in 0..65535, got {port}"):
        ServerConfig.load(environ={**REPO, name: str(port)})


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_ports_at_the_edges_are_accepted(port: int) -> None:
    assert ServerConfig.load({"grpc_port": port}, environ=REPO).grpc_port == port


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("version_policy", "newest", "expected 'latest:N', 'specific:V1,V2' or 'all'"),
        ("version_policy", "latest:0", "positive integers"),
        ("version_policy", "latest:1,2", "latest:N takes one positive integer"),
        ("version_policy", "specific:", "expected 'latest:N'"),
        ("version_policy", "specific:1,x", "positive integers"),
        ("preferred_batch_sizes", "4,-8", "positive integers"),
        ("instances", 0, "TLSERVE_INSTANCES must be at least 1"),
        ("model_control", "none", "TLSERVE_MODEL_CONTROL must be one of"),
        ("poll_interval", 0.0, "TLSERVE_POLL_INTERVAL must be positive"),
    ],
)
def test_bad_batching_and_lifecycle_settings_are_refused(
    key: str, value: object, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        ServerConfig(model_repository=Path("/m"), **{key: value})  # type: ignore[arg-type]


def test_version_policies_select_versions() -> None:
    from tlserve.server.policy import parse_batch_sizes, parse_version_policy

    on_disk = [3, 1, 7, 5]
    assert parse_version_policy("latest").select(on_disk) == [7]
    assert parse_version_policy("latest:2").select(on_disk) == [5, 7]
    assert parse_version_policy("latest:9").select(on_disk) == [1, 3, 5, 7]
    assert parse_version_policy("specific:3,4").select(on_disk) == [3]
    assert parse_version_policy("all").select(on_disk) == [1, 3, 5, 7]
    assert str(parse_version_policy("specific:4,3")) == "specific:3,4"
    assert parse_batch_sizes(" 8, 4 ") == (4, 8) and parse_batch_sizes("") == ()
    config = ServerConfig.load(
        environ={"TLSERVE_MODEL_REPOSITORY": "/m", "TLSERVE_INSTANCES": "3",
                 "TLSERVE_VERSION_POLICY": "latest:2", "TLSERVE_MODEL_CONTROL": "explicit",
                 "TLSERVE_PREFERRED_BATCH_SIZES": "4,8", "TLSERVE_POLL_INTERVAL": "2.5"}
    )  # fmt: skip
    assert (config.instances, str(config.version_policy), config.model_control) == (
        3,
        "latest:2",
        "explicit",
    )
    # Parsed once, at start-up: typed values from here on.
    assert config.version_policy.select([1, 2, 3]) == [2, 3]
    assert (config.preferred_batch_sizes, config.poll_interval) == ((4, 8), 2.5)
