"""--speculative-config JSON and its single-key flags, on every command that loads a model (model-free)."""

import pytest

from tokenmill.cli import build_parser, engine_config_from_args
from tokenmill.config import SpeculativeConfig


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"], ["bench"]])
def test_speculative_config_json_reaches_the_engine_config(command):
    args = build_parser().parse_args([command[0], "--speculative-config",
                                      '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}',
                                      *command[1:]])
    spec = engine_config_from_args(args).speculative_config
    assert spec == SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=5)


def test_single_key_flags_merge_into_the_json_and_win():
    args = build_parser().parse_args(["bench", "--speculative-config", '{"num_speculative_tokens": 3}',
                                      "--num-speculative-tokens", "5", "--draft-model", "draft.gguf",
                                      "--speculative-disable-batch-size", "2"])
    spec = engine_config_from_args(args).speculative_config
    assert (spec.method, spec.model, spec.num_speculative_tokens, spec.disable_by_batch_size) == \
        ("draft_model", "draft.gguf", 5, 2)


def test_off_by_default():
    assert engine_config_from_args(build_parser().parse_args(["generate", "hi"])).speculative_config is None


@pytest.mark.parametrize("value", ["{not json", "[1, 2]"])
def test_bad_json_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["generate", "--speculative-config", value, "hi"])
    assert exc.value.code == 2
    assert "--speculative-config" in capsys.readouterr().err


def test_bad_key_names_the_field():
    args = build_parser().parse_args(["generate", "--speculative-config", '{"num_speculative_tokens": 0}', "hi"])
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        engine_config_from_args(args)
