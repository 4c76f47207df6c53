import pytest

from resampling_forcing.config import ConfigError, config_from_dict, load_config


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.model.chunk_frames == 3 and cfg.diffusion.sample_steps == 32


def test_preset_fills_sizes_and_explicit_keys_win():
    cfg = config_from_dict({"model": {"preset": "wan2.1-t2v-1.3b", "num_layers": 2}})
    assert (cfg.model.dim, cfg.model.num_heads, cfg.model.ffn_dim, cfg.model.num_layers) == (1536, 12, 8960, 2)


@pytest.mark.parametrize("data,msg", [
    ({"model": {"dimm": 3}}, r"unknown key model\.dimm"),
    ({"train": {"lr": "fast"}}, r"train\.lr: expected float, got str 'fast'"),
    ({"train": {"stages": [{"objective": "magic"}]}}, r"train\.stages\[0\]\.objective: 'magic' is not one of"),
    ({"model": {"preset": "nope"}}, r"model\.preset: unknown preset 'nope'"),
    ({"attention": {"routing": {"mode": "topk"}}}, r"attention\.routing\.top_k must be >= 1 when mode=.topk., got None"),
    ({"attention": {"routing": {"mode": "window", "sink_chunks": -1}}}, r"attention\.routing\.sink_chunks must be an int >= 0"),
    ({"model": {"dim": 100, "num_heads": 3}}, r"model\.dim=100 is not divisible"),
    ({"data": {"height": True}}, r"data\.height: expected int, got bool"),
    ({"encoders": {"text_ngram": 0}}, r"encoders\.text_ngram=0: must be >= 1"),
    ({"train": {"min_lr_ratio": 1.5}}, r"train\.min_lr_ratio=1\.5: must be in \[0, 1\]"),
    ({"train": {"lr_schedule": "linear"}}, r"train\.lr_schedule: 'linear' is not one of"),
    ({"data": {"synthetic_blackout_prob": 0.5, "synthetic_blackout_frames": [4, 9]}},
     r"data\.synthetic_blackout_prob / data\.synthetic_blackout_frames: .*do not fit 12-frame clips"),
    ({"data": {"synthetic_blackout_prob": 1.5}}, r"data\.synthetic_blackout_prob .*must be in \[0, 1\]"),
    ({"data": {"synthetic_blackout_frames": [4]}}, r"data\.synthetic_blackout_frames=\[4\]: need \[lo, hi\]"),
    ({"model": {"num_layers": 4}, "attention": {"routing": {"layers": [1, 4]}}},
     r"attention\.routing\.layers=\[1, 4\]: must be distinct block indices in \[0, 3\]"),
    ({"attention": {"routing": {"layers": [-1]}}}, r"attention\.routing\.layers=\[-1\]"),
    ({"attention": {"routing": {"layers": [0, 0]}}}, r"attention\.routing\.layers=\[0, 0\]"),
    ({"attention": {"routing": {"layers": []}}}, r"attention\.routing\.layers=\[\]"),
    ({"model": {"num_heads": 0}}, r"model\.num_heads=0: must be >= 1"),
    ({"model": {"num_layers": 0}}, r"model\.num_layers=0: must be >= 1"),
    ({"model": {"x0_min_t": 0.0}}, r"model\.x0_min_t=0\.0: must be in \(0, 1\)"),
    ({"train": {"seed": -1}}, r"train\.seed=-1: must be an int >= 0"),
    ({"data": {"synthetic_seed": -2}}, r"data\.synthetic_seed=-2: must be an int >= 0"),
    ({"train": {"weight_decay": -1.0}}, r"train\.weight_decay=-1\.0: must be a finite number >= 0"),
    ({"train": {"lr": float("nan")}}, r"train\.lr=nan must be > 0"),
    ({"train": {"warmup_steps": -5}}, r"train\.warmup_steps=-5: must be >= 0"),
    ({"data": {"synthetic_max_objects": 0}}, r"data\.synthetic_max_objects=0: must be >= 1"),
    ({"encoders": {"vae": "pixel_shuffle", "vae_factor": 4}, "data": {"height": 33}},
     r"data\.height=33: must be a multiple of 8 .*e\.g\. 32"),
    ({"encoders": {"vae": "wan"}, "data": {"width": 40}}, r"data\.width=40: must be a multiple of 16"),
])
def test_errors_name_the_key(data, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(data)


def test_overrides_parse_types_and_lists():
    cfg = config_from_dict({"train": {"stages": [{"name": "a"}, {"name": "b"}]}},
                           ["train.lr=1e-4", "train.stages.1.steps=7", "attention.routing.mode=topk",
                            "attention.routing.top_k=5", "model.patch_size=[1,4,4]"])
    assert cfg.train.lr == 1e-4 and cfg.train.stages[1].steps == 7
    assert cfg.attention.routing.top_k == 5 and cfg.model.patch_size == [1, 4, 4]


def test_overrides_keep_the_text_of_string_fields():
    """YAML reads `no` as false and `2024` as an int: a string field takes the text as typed (the default
    train.mixed_precision=no was refused); other fields keep YAML's types, and a boolean where a word
    belongs in a YAML file gets a hint to quote it."""
    cfg = config_from_dict({}, ["train.mixed_precision=no", "train.run_dir=2024", "train.seed=3", "train.ema_decay=null",
                                "data.synthetic_seed=5"])
    assert cfg.train.mixed_precision == "no" and cfg.train.run_dir == "2024"
    assert cfg.train.seed == 3 and cfg.train.ema_decay is None and cfg.data.synthetic_seed == 5
    with pytest.raises(ConfigError, match=r"train\.seed: expected int, got str 'abc'"):
        config_from_dict({}, ["train.seed=abc"])
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got bool True"):
        config_from_dict({}, ["train.lr=true"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: False is not one of .*quote the word"):
        config_from_dict({"train": {"mixed_precision": False}})  # `mixed_precision: no` in a YAML file


def test_override_errors():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        config_from_dict({}, ["train.lr"])
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr"):
        config_from_dict({}, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"not an index of a list of 1"):
        config_from_dict({}, ["train.stages.3.steps=1"])
    # a wrong type for an Optional field: the inner type's one line (it raised a str: TypeError)
    with pytest.raises(ConfigError, match=r"attention\.routing\.top_k: expected int, got str 'three'"):
        config_from_dict({}, ["attention.routing.top_k=three"])
    with pytest.raises(ConfigError, match=r"train\.ema_decay: .*'high'"):
        config_from_dict({}, ["train.ema_decay=high"])
    # a shell-split flow value (train.stages=[{name: tf, ...}] unquoted) is one line, not a YAML traceback
    with pytest.raises(ConfigError, match=r"override 'train.stages=\[\{name:': the value is not valid YAML"):
        config_from_dict({}, ["train.stages=[{name:"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
