import dataclasses
import re
import typing

import pytest

from resampling_forcing.config import Config, ConfigError, config_from_dict, load_config
from resampling_forcing.config_checks import FLOAT_RANGES
from resampling_forcing.seeds import MAX_SEED

NAN, INF = float("nan"), float("inf")
TINY = {"model": {"preset": "tiny", "chunk_frames": 2}, "encoders": {"vae": "pixel_shuffle", "text": "hash"}}


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
     r"attention\.routing\.layers=\[1, 4\]: must be a non-empty list of distinct block indices >= 0, < 4 \(the model's blocks\)"),
    ({"attention": {"routing": {"layers": [-1]}}}, r"attention\.routing\.layers=\[-1\]"),
    ({"attention": {"routing": {"layers": [0, 0]}}}, r"attention\.routing\.layers=\[0, 0\]"),
    ({"attention": {"routing": {"layers": []}}}, r"attention\.routing\.layers=\[\]"),
    ({"model": {"num_heads": 0}}, r"model\.num_heads=0: must be >= 1"),
    ({"model": {"num_layers": 0}}, r"model\.num_layers=0: must be >= 1"),
    ({"model": {"x0_min_t": 0.0}}, r"model\.x0_min_t=0\.0: must be in \(0, 1\)"),
    ({"train": {"seed": -1}}, rf"train\.seed=-1: must be an int in \[0, {MAX_SEED}\]"),
    ({"data": {"synthetic_seed": -2}}, r"data\.synthetic_seed=-2: must be an int in \[0, "),
    ({"train": {"weight_decay": -1.0}}, r"train\.weight_decay=-1\.0: must be a finite number >= 0"),
    ({"train": {"lr": float("nan")}}, r"train\.lr=nan: must be a finite number > 0"),
    ({"train": {"warmup_steps": -5}}, r"train\.warmup_steps=-5: must be >= 0"),
    ({"data": {"synthetic_max_objects": 0}}, r"data\.synthetic_max_objects=0: must be >= 1"),
    ({"encoders": {"vae": "pixel_shuffle", "vae_factor": 4}, "data": {"height": 33}},
     r"data\.height=33: must be a multiple of 8 .*e\.g\. 32"),
    ({"encoders": {"vae": "wan"}, "data": {"width": 40}}, r"data\.width=40: must be a multiple of 16"),
    # values that crashed later (ZeroDivisionError in validate, a ValueError in the data loader)
    ({"encoders": {"vae": "pixel_shuffle", "vae_factor": 0}}, r"encoders\.vae_factor=0: must be >= 1"),
    ({"train": {"seed": 2**64}}, rf"train\.seed=18446744073709551616: must be an int in \[0, {MAX_SEED}\]"),
    ({"data": {"synthetic_seed": MAX_SEED + 1}}, r"data\.synthetic_seed=9223372036854775808: must be an int in"),
    # values that made the loss NaN or meant nothing
    ({"diffusion": {"train_t_std": -1.0}}, r"diffusion\.train_t_std=-1\.0: must be a finite number >= 0"),
    ({"model": {"eps": 0.0}}, r"model\.eps=0\.0: must be a finite number > 0"),
    ({"model": {"rope_theta": -5.0}}, r"model\.rope_theta=-5\.0: must be a finite number > 0"),
    ({"train": {"grad_clip": float("inf")}}, r"train\.grad_clip=inf: must be a finite number \(<= 0 = no clipping\)"),
    ({"train": {"stages": [{}, {"objective": "resampling", "resample_cfg": -1.0}]}},
     r"train\.stages\[1\]\.resample_cfg must be in \[0, 100\] \(got -1\.0\); the default 1\.0 resamples without "
     r"guidance$"),
    ({"train": {"stages": [{"noise_aug_scale": -0.1}]}}, r"train\.stages\[0\]\.noise_aug_scale=-0\.1: must be a finite"),
    ({"train": {"betas": [0.9, 1.0]}}, r"train\.betas\[1\]=1\.0: must be in \[0, 1\)"),
    ({"train": {"betas": [0.9]}}, r"train\.betas=\[0\.9\]: need two numbers"),
    ({"train": {"ema_decay": 1.0}}, r"train\.ema_decay=1\.0: must be in \(0, 1\) \(or null"),
    # a chunk is whole temporal patches
    ({"model": {"patch_size": [2, 2, 2], "chunk_frames": 3}},
     r"model\.chunk_frames=3: must be a multiple of model\.patch_size\[0\]=2"),
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


def test_exponents_without_a_dot_are_floats_in_yaml_files_too(tmp_path):
    """YAML 1.1 reads `1e-3` as a string: a float field takes it as the number it spells, in a file as on the
    command line (only the override was converted before); a string field keeps the text; nonsense fails."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  betas: [9e-1, 9.5E-1]\n  run_dir: runs/1e5\n")
    cfg = load_config(path, ["diffusion.cfg_scale=5e0"])
    assert (cfg.train.lr, cfg.train.betas, cfg.train.run_dir, cfg.diffusion.cfg_scale) == (1e-3, [0.9, 0.95], "runs/1e5", 5.0)
    path.write_text("train:\n  lr: 1e-3x\n")
    with pytest.raises(ConfigError, match="train.lr: expected float, got str '1e-3x'"):
        load_config(path)


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
    bad.write_text("train:\n  lr: 0.1\n  warmup_steps: 3\n  lr: 0.2\n")  # PyYAML kept the last one silently
    with pytest.raises(ConfigError, match="key 'lr' appears twice in one mapping at line 4, column 3"):
        load_config(bad)
    bad.write_text("train:\n  lr: [1, 2\n  steps: 3\n")  # where it is, in one line
    with pytest.raises(ConfigError, match=r"not valid YAML: expected ',' or '\]', but got ':' at line 3, column 8$"):
        load_config(bad)


# ----------------------------------------------------------------------------- every float field


def _schema_floats(cls=Config, key=""):
    """The FLOAT_RANGES key of every float field of the schema (from the annotations, so a field whose
    default is null, e.g. train.ema_decay, counts too)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from _schema_floats(tp, f"{key}{f.name}.")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(inner[0]):
            yield from _schema_floats(inner[0], f"{key}{f.name}[].")
        elif typing.get_origin(tp) is list and inner[0] is float:
            yield f"{key}{f.name}[]"
        elif float in (tp, *inner):
            yield key + f.name


SCHEMA_FLOATS = sorted(_schema_floats())


def test_every_float_field_has_a_range():
    assert len(SCHEMA_FLOATS) >= 20 and sorted(FLOAT_RANGES) == SCHEMA_FLOATS


def _setting(key: str, value: float) -> tuple[dict, str]:
    """The config mapping that sets the float field `key` (stages: the first stage; lists: the first
    item) to `value`, and the key path the error must name."""
    section, name = key.split(".", 1)
    if name.startswith("stages[]."):
        return {section: {"stages": [{name.split(".")[1]: value}]}}, f"{section}.stages[0].{name.split('.')[1]}"
    if name.endswith("[]"):
        return {section: {name[:-2]: [value, 0.5]}}, f"{section}.{name[:-2]}[0]"
    *parents, leaf = name.split(".")  # a nested section, e.g. train.lora.alpha
    setting = {leaf: value}
    for parent in reversed(parents):
        setting = {parent: setting}
    return {section: setting}, key


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", SCHEMA_FLOATS)
def test_every_float_field_refuses_nan_and_inf(key, value):
    """NaN made the loss NaN (diffusion.train_t_std, model.eps, a stage's resample_cfg) or was taken as
    "off" (train.grad_clip): every float field is refused with its key path and allowed range."""
    data, path = _setting(key, value)
    with pytest.raises(ConfigError, match="^" + re.escape(path)) as e:
        config_from_dict(data)
    assert ("finite" in str(e.value) or " in [" in str(e.value) or " in (" in str(e.value)), str(e.value)


def test_range_bounds_are_accepted():
    """The closed ends of the new ranges are valid settings: std 0 (a fixed t), no clipping (0, or a
    negative value as saved run configs have it), no guidance, the largest seed."""
    for clip in (0.0, -1.0):
        cfg = config_from_dict({"diffusion": {"train_t_std": 0.0, "train_t_mean": -3.0},
                                "train": {"grad_clip": clip, "seed": MAX_SEED,
                                          "stages": [{"objective": "resampling", "resample_cfg": 0.0}]}})
        assert cfg.train.grad_clip == clip and cfg.train.seed == MAX_SEED and cfg.diffusion.train_t_std == 0.0


# ----------------------------------------------------------------------------- clip length


@pytest.mark.parametrize("data,msg", [
    # pixel_shuffle (1 frame per latent frame), chunks of 2
    ({**TINY, "data": {"num_frames": 7}},
     r"^data\.num_frames=7: gives 7 latent frames, not a multiple of model\.chunk_frames=2; use data\.num_frames=6 or 8$"),
    ({**TINY, "data": {"num_frames": 1}}, r"data\.num_frames=1: gives 1 latent frames, .*use data\.num_frames=2$"),
    # the Wan VAE: 1 + 4k frames -> 1 + k latent frames, chunks of 3
    ({"data": {"num_frames": 13}},
     r"^data\.num_frames=13: gives 4 latent frames, not a multiple of model\.chunk_frames=3; use data\.num_frames=9 or 21$"),
    ({"data": {"num_frames": 5}, "model": {"chunk_frames": 3}},
     r"^data\.num_frames=5: gives 2 latent frames, not a multiple of model\.chunk_frames=3; use data\.num_frames=9$"),
])
def test_clip_length_must_give_whole_chunks(data, msg):
    """Refused when the config is loaded (it was refused only after the data set was rendered or a whole
    latent store was precomputed)."""
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(data)


@pytest.mark.parametrize("frames,near", [(12, "9 or 21"), (80, "69 or 81"), (10, "9 or 21")])
def test_clips_to_encode_fit_the_wan_vae_exactly(frames, near):
    """A config about to encode clips (train.py, precompute: require_encoder_paths; the Trainer: training)
    needs 1 + 4k frames for the Wan VAE (it refuses others at the first encode, after loading); for
    sampling the default 12 frames (3 latent frames, 1 chunk) still load."""
    data = {"data": {"num_frames": frames}, "encoders": {"vae_path": "wan", "text": "hash"}}
    with pytest.raises(ConfigError, match=rf"^data\.num_frames={frames}: the wan VAE encodes 1 \+ 4k frames; "
                                          rf"use data\.num_frames={near} \(whole chunks of model\.chunk_frames=3"):
        config_from_dict(data, require_encoder_paths=True)
    if frames == 12:
        assert config_from_dict(data).data.num_frames == 12


def test_valid_clip_lengths():
    for data in ({**TINY, "data": {"num_frames": 8}}, {"data": {"num_frames": 81}}, {"data": {"num_frames": 249}},
                 {"data": {"num_frames": 21}}, {"data": {"num_frames": 12}}):
        config_from_dict(data)
    config_from_dict({"data": {"num_frames": 81}, "encoders": {"vae_path": "wan", "text": "hash"}},
                     require_encoder_paths=True)


# ----------------------------------------------------------------------------- files


def test_config_file_not_utf8(tmp_path):
    bad = tmp_path / "utf16.yaml"
    bad.write_bytes(b"\xff\xfe")  # the start of a UTF-16 file: was a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match=rf"^config file {bad} is not UTF-8 text; save it as UTF-8$"):
        load_config(bad)
    bad.write_bytes("train:\n  run_dir: r\u00e9sum\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(bad)


def test_yaml_merge_keys_and_unhashable_keys(tmp_path):
    """The duplicate-key check leaves YAML merge keys to YAML (`<<: *anchor`, own keys override) and an
    unhashable key to YAML's own one-line refusal."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stages: [&tf {name: tf, steps: 5}, {<<: *tf, name: rf, objective: resampling}]\n")
    cfg = load_config(path)
    assert [(s.name, s.steps, s.objective) for s in cfg.train.stages] == [("tf", 5, "teacher_forcing"),
                                                                          ("rf", 5, "resampling")]
    path.write_text("train:\n  ? [1, 2]\n  : 3\n")
    with pytest.raises(ConfigError, match="not valid YAML: found unhashable key at line 2"):
        load_config(path)
