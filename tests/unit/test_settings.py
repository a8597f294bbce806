import pytest

from services.settings import Settings


def test_settings_read_typed_values_from_the_environment():
    settings = Settings.from_env({"RNNSERVE_SENTIMENT_MAX_BATCH_SIZE": "32", "RNNSERVE_DEVICE": "cpu"})
    assert settings.sentiment_max_batch_size == 32
    assert settings.torch_device() == "cpu"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RNNSERVE_DEVICE": "tpu"}, "cpu, cuda or auto"),
        ({"RNNSERVE_SENTIMENT_MAX_LATENCY_MS": "soon"}, "must be an integer"),
        ({"RNNSERVE_MAX_ITEMS": "0"}, "must be >= 1"),
    ],
)
def test_bad_settings_stop_the_service_with_a_message(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)
