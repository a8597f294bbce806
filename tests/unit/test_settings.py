"""Settings (services/settings.py): typed blocks, read from the environment and a secrets directory."""

import pytest

from services.settings import Settings


def test_settings_read_typed_values_into_their_block():
    settings = Settings.from_env({"RNNSERVE_SENTIMENT_MAX_BATCH_SIZE": "32", "RNNSERVE_DEVICE": "cpu",
                                  "RNNSERVE_TIMEOUT_S": "12"}, secrets_dir="/nonexistent")
    assert settings.sentiment.max_batch_size == 32
    assert settings.http.timeout_s == 12
    assert settings.torch_device() == "cpu"
    assert settings.translate.max_active_rows == 256  # the block's own default
    assert not hasattr(settings.translate, "max_batch_size")  # its decode loop has no batcher to size


def test_every_setting_has_one_environment_variable():
    names = Settings.env_names()
    assert names["http.api_token"] == "RNNSERVE_API_TOKEN"
    assert names["caption.max_image_pixels"] == "RNNSERVE_CAPTION_MAX_IMAGE_PIXELS"
    assert names["device"] == "RNNSERVE_DEVICE"
    assert len(set(names.values())) == len(names)


def test_a_secret_file_is_read_and_the_environment_wins(tmp_path):
    (tmp_path / "RNNSERVE_API_TOKEN").write_text("from-the-secret\n")
    assert Settings.from_env({}, secrets_dir=tmp_path).http.api_token == "from-the-secret"
    assert Settings.from_env({"RNNSERVE_API_TOKEN": "env"}, secrets_dir=tmp_path).http.api_token == "env"


def test_the_entry_does_not_read_the_processes_of_a_model_it_runs_itself():
    read = Settings.read_by_entry()
    assert "sentiment.workers" not in read and "sentiment.threads" not in read
    assert read["translate.workers"] == "RNNSERVE_TRANSLATE_WORKERS"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RNNSERVE_DEVICE": "tpu"}, "RNNSERVE_DEVICE: Input should be 'cpu', 'cuda' or 'auto'"),
        ({"RNNSERVE_SENTIMENT_MAX_LATENCY_MS": "soon"},
         "RNNSERVE_SENTIMENT_MAX_LATENCY_MS: Input should be a valid integer"),
        ({"RNNSERVE_MAX_ITEMS": "0"}, "RNNSERVE_MAX_ITEMS: Input should be greater than or equal to 1"),
        # One rule for every model: BentoML needs max_batch_size >= 2 (caption was not checked before).
        ({"RNNSERVE_SENTIMENT_MAX_BATCH_SIZE": "1"}, "RNNSERVE_SENTIMENT_MAX_BATCH_SIZE"),
        # A misspelt or retired variable is refused, not ignored (caption has no batcher to size).
        ({"RNNSERVE_CAPTION_MAX_BATCH_SIZE": "32"}, "RNNSERVE_CAPTION_MAX_BATCH_SIZE: not a setting"),
        ({"RNNSERVE_MAX_ITEM": "64"}, "RNNSERVE_MAX_ITEM: not a setting"),
        ({"RNNSERVE_FORECAST_WORKERS": "2"}, "RNNSERVE_FORECAST_WORKERS: Input should be less than or equal"),
    ],
)
def test_bad_settings_stop_the_service_naming_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env, secrets_dir="/nonexistent")


def test_connect_timeout_to_model_services_is_a_positive_setting():
    from services.settings import Settings

    assert Settings.from_env({}).http.connect_timeout_s == 3.0
    assert Settings.from_env({"RNNSERVE_CONNECT_TIMEOUT_S": "0.5"}).http.connect_timeout_s == 0.5
    with pytest.raises(ValueError, match="RNNSERVE_CONNECT_TIMEOUT_S"):
        Settings.from_env({"RNNSERVE_CONNECT_TIMEOUT_S": "0"})


def test_peer_timeout_of_model_service_connections_is_a_setting_of_at_least_10_ms():
    from services.settings import Settings

    assert Settings.from_env({}).http.peer_timeout_s == 3.0
    assert Settings.from_env({"RNNSERVE_PEER_TIMEOUT_S": "0.01"}).http.peer_timeout_s == 0.01
    with pytest.raises(ValueError, match="RNNSERVE_PEER_TIMEOUT_S"):
        Settings.from_env({"RNNSERVE_PEER_TIMEOUT_S": "0.009"})
