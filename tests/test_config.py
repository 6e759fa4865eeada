"""Configs: arg strings, overrides, validation, and the command line's error messages."""

import pytest

from longjax.train import cli
from longjax.train import config as config_lib

from conftest import REPO

QUICKSTART = f"{REPO}/configs/quickstart.py"


def test_parse_arg_types():
    assert config_lib.parse_arg("steps=5,model.mixer=mamba,lr=1e-3,flag=True") == {
        "steps": 5, "model.mixer": "mamba", "lr": 1e-3, "flag": True}
    assert config_lib.parse_arg(None) == {}
    assert config_lib.parse_arg("mixer=(mamba,mamba,attention)*2,num_layers=6,"
                                "data.eval_seq_lens=(64,128)") == {
        "mixer": "(mamba,mamba,attention)*2", "num_layers": 6, "data.eval_seq_lens": (64, 128)}
    with pytest.raises(ValueError, match="not key=value"):
        config_lib.parse_arg("steps")


def test_config_arg_variants():
    config = cli.load_config_file(f"{QUICKSTART}:steps=7,d_model=64,data.seq_len=128")
    assert (config.train.steps, config.model.d_model, config.data.seq_len) == (7, 64, 128)
    with pytest.raises(ValueError, match=r"unknown config field config.model.widht.*d_model"):
        cli.load_config_file(f"{QUICKSTART}:model.widht=3")


def test_overrides_name_unknown_fields_and_wrong_types():
    config = config_lib.base_config()
    with pytest.raises(ValueError, match=r"config.trian has no field|config has no field 'trian'"):
        config_lib.apply_overrides(config, {"trian.steps": 3})
    with pytest.raises(ValueError, match="config.train.steps expects int"):
        config_lib.apply_overrides(config, {"train.steps": "many"})


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stepz=5"], r"config.train has no field 'stepz'; allowed: \[.*'steps'"),
    (["--config.train.steps=five"], r"config.train.steps expects int"),
    (["--config.train.learning_rate=fast"], r"config.train.learning_rate expects float"),
])
def test_command_line_override_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.check_config_overrides(["train.py", f"--config={QUICKSTART}", *argv])


def test_command_line_good_overrides_pass():
    cli.check_config_overrides(
        ["train.py", "--config", QUICKSTART, "--config.train.steps=5",
         "--config.train.learning_rate=1e-3", "--config.model.mixer", "attention"])


@pytest.mark.parametrize("field, value, message", [
    ("data.seq_len", 0, "config.data.seq_len must be a positive number"),
    ("data.batch_size", -4, "config.data.batch_size must be a positive number"),
    ("model.d_model", 0, "config.model.d_model must be a positive number"),
    ("train.steps", 0, "config.train.steps must be a positive number"),
    ("model.num_kv_heads", 3, "num_heads=4 must be a multiple of config.model.num_kv_heads=3"),
    ("model.mixer", "atention", "unknown mixer 'atention'; registered mixers"),
    ("model.dtype", "float16", r"config.model.dtype='float16'; allowed"),
    ("data.source", "web", r"config.data.source='web'; allowed"),
    ("train.warmup_steps", 10**6, "config.train.warmup_steps"),
])
def test_validate_names_the_bad_field(field, value, message):
    config = cli.load_config_file(QUICKSTART)
    config_lib.apply_overrides(config, {field: value})
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_validate_batch_must_divide_over_data_shards():
    config = cli.load_config_file(f"{QUICKSTART}:batch_size=12")
    config_lib.validate(config, num_data_shards=4)
    with pytest.raises(ValueError, match="batch_size=12.*8 data-parallel shards"):
        config_lib.validate(config, num_data_shards=8)


def test_validate_lengths_must_split_over_sequence_shards():
    config = cli.load_config_file(f"{QUICKSTART}:seq_len=72")
    config_lib.validate(config, num_sequence_shards=4)  # zigzag: 72 = 9 x (2 x 4)
    with pytest.raises(ValueError, match=r"seq_len has length 72.*sequence=8.*multiples of 16"):
        config_lib.validate(config, num_sequence_shards=8)
    config.model.mixer_options.attention.layout = "contiguous"
    config_lib.validate(config, num_sequence_shards=8)
    config.data.eval_seq_lens = (100,)
    with pytest.raises(ValueError, match="eval_seq_lens has length 100"):
        config_lib.validate(config, num_sequence_shards=8)


def test_unknown_mixer_option():
    config = cli.load_config_file(QUICKSTART)
    config.model.mixer_options.attention.windoww = 3
    with pytest.raises(ValueError, match="mixer_options.attention.windoww is not an option"):
        config_lib.validate(config)
