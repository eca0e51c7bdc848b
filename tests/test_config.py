import pytest

from sqakd.config import load_config, parse_override, validate_config


def test_defaults_are_the_released_code_settings():
    config = load_config()
    assert config.method.name == "sqakd"
    assert (
        config.method.temperature,
        config.method.alpha,
        config.method.gamma,
        config.method.beta,
    ) == (4, 1, 0, 0)
    assert (
        config.train.weights.name,
        config.train.weights.lr,
        config.train.weights.weight_decay,
    ) == ("adam", 1e-3, 1e-4)
    assert (config.train.quantizers.lr, config.train.quantizers.schedule) == (1e-5, "cosine")


def test_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant:\n  method: lsq\n  weight_bits: 4\nmodel:\n  name: resnet20\n")
    config = load_config(
        recipe, ["quant.weight_bits=2", "quant.overrides={'layer3.*': {weight_bits: 8}}"]
    )
    assert config.quant.method == "lsq"
    assert config.quant.weight_bits == 2
    assert config.quant.overrides["layer3.*"].weight_bits == 8


def test_typo_names_the_key_and_suggests():
    with pytest.raises(
        ValueError, match=r"unknown config key 'data.bacth_size'.*did you mean 'batch_size'"
    ):
        load_config(None, ["data.bacth_size=64"])


def test_wrong_type_names_the_key():
    with pytest.raises(ValueError, match="'train.epochs'"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="quant.weight_bits.*1..8"):
        load_config(None, [f"quant.weight_bits={bits}"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_override("quant.weight_bits")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("key", ["quant.method", "quant.weight_method", "quant.act_method"])
def test_unknown_quantizer_fails_when_the_config_loads(key):
    # before any data is decoded or any teacher loaded: the config itself is refused
    with pytest.raises(ValueError, match=rf"'{key}'.*unknown quantization method 'magic'.*ewgs"):
        load_config(None, [f"{key}=magic"])
    with pytest.raises(ValueError, match="unknown quantization method 'lsqq'"):
        load_config(None, ["quant.overrides={'layer3.*': {act_method: lsqq}}"])


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_run_compile_takes_true_false_or_auto(value, expected):
    assert load_config(None, [f"run.compile={value}"]).run.compile == expected


def test_a_validator_message_reads_as_one_plain_sentence():
    with pytest.raises(ValueError) as error:
        load_config(None, ["run.compile=maybe"])
    assert str(error.value) == (
        "config key 'run.compile': run.compile must be true, false or auto, got 'maybe'"
    )


def test_a_run_folder_from_before_the_method_contract_still_loads():
    old_dump = {"temperature": 4.0, "alpha": 1.0, "gamma": 0.0, "beta": 0.0, "extra_loss": None,
                "options": {}}  # fmt: skip
    assert validate_config({"method": {"name": "qat", **old_dump}}).method.options == {}
    sqakd = validate_config({"method": {"name": "sqakd", **old_dump, "alpha": 2.0}}).method
    assert sqakd.options["alpha"] == 2.0 and "options" not in sqakd.options
    with pytest.raises(
        ValueError, match="unknown config key 'method.temperature' for method 'qat'"
    ):
        validate_config({"method": {"name": "qat", **old_dump, "temperature": 3.0}})
    with pytest.raises(ValueError, match="unknown config key 'method.alpha' for method 'qat'"):
        validate_config({"method": {"name": "qat", "alpha": 1.0}})  # a recipe, not an old dump


def test_load_config_leaves_the_callers_base_unchanged():
    base = {"data": {"batch_size": 8}, "model": {"name": "small_cnn"}}
    config = load_config(None, ["data.limit_train=600"], base=base)
    assert config.data.limit_train == 600
    assert base == {"data": {"batch_size": 8}, "model": {"name": "small_cnn"}}
    assert load_config(None, [], base=base).data.limit_train is None
