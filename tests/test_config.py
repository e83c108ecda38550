import pytest

from conftest import assert_each_override_loads_or_fails_in_one_line
from curriculum.config import RECIPES_DIR, RecipeError, load_recipe, to_plain, total_steps
from curriculum.schedule import lr_factor, stage_index_at, stage_starts

# compare*.yaml describe experiments of several runs and have their own loader (curriculum.compare)
ALL_RECIPES = sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith("compare"))


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_shipped_recipe_loads(name):
    # overlays (demo, gpu_*) carry no stages: layer them over a stage recipe
    cfg = load_recipe([RECIPES_DIR / "pretrain.yaml", RECIPES_DIR / name])
    assert total_steps(cfg) > 0
    assert isinstance(to_plain(cfg)["stages"], list)


def test_curriculum_recipe_has_both_policies():
    cfg = load_recipe([RECIPES_DIR / "curriculum.yaml"])
    assert [s.policy["name"] for s in cfg.stages] == ["unclipped", "max_depth"]
    assert cfg.stages[1].policy["max_depth"] == 80.0


def test_gpu_recipes_carry_depth_anything_hyperparameters():
    for enc in ("vits", "vitb", "vitl"):
        cfg = load_recipe([RECIPES_DIR / "curriculum.yaml", RECIPES_DIR / f"gpu_{enc}.yaml"])
        assert cfg.model.encoder == enc
        assert (cfg.data.crop_height, cfg.data.crop_width) == (518, 518)
        assert cfg.optim.lr == 5e-6 and cfg.optim.head_lr_mult == 10 and cfg.optim.weight_decay == 0.01
        assert cfg.optim.poly_power == 0.9 and cfg.data.hflip


def test_overrides_win_and_are_typed():
    cfg = load_recipe([RECIPES_DIR / "curriculum.yaml"], ["data.batch_size=3", "stages.1.steps=7", "stages.1.rewarm_steps=5",
                                                          "stages.1.policy.max_depth=60", "run.name=x"])
    assert cfg.data.batch_size == 3 and cfg.stages[1].steps == 7 and cfg.stages[1].policy["max_depth"] == 60
    assert cfg.run.name == "x"


def test_numbers_for_text_keys_keep_their_text_without_warnings():
    """omegaconf converts an int given to a text key itself, with a deprecation warning on the
    user's console (trainer.precision=32 is a documented value); the text as typed is kept."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_recipe([RECIPES_DIR / "pretrain.yaml"], ["trainer.precision=32", "run.name=2026", "logging.group=1e3",
                                                            "run.out_dir=true", "optim.lr=1"])
    assert cfg.trainer.precision == "32" and cfg.run.name == "2026" and cfg.logging.group == "1e3"
    assert cfg.run.out_dir == "true" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_switches_take_true_false_or_one_zero_and_counts_a_quoted_number():
    """omegaconf reads any number for a switch as true (run.overwrite=-1 or 16 would delete the
    old run) and converts both with a deprecation warning; 1/0 are kept, other values refused."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_recipe([RECIPES_DIR / "pretrain.yaml"], ["run.overwrite=1", "trainer.progress=0", "run.seed='7'"])
        assert cfg.run.overwrite is True and cfg.trainer.progress is False and cfg.run.seed == 7
        cfg = load_recipe([RECIPES_DIR / "pretrain.yaml"], ["run.overwrite=yes", "trainer.progress=false"])
        assert cfg.run.overwrite is True and cfg.trainer.progress is False
        for text in ("run.overwrite=-1", "run.overwrite=16", "trainer.progress=0.5", "run.overwrite='yes'"):
            with pytest.raises(RecipeError) as e:
                load_recipe([RECIPES_DIR / "pretrain.yaml"], [text])
            assert _one_line(e) == f"command line: '{text}': expects true or false, got {text.split('=')[1]}"


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_key_and_closest_valid(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml", bad])
    msg = _one_line(e)
    assert "data.batch_sise" in msg and "data.batch_size" in msg and str(bad) in msg


def test_unknown_override_key():
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["optim.lr_head=1"])
    assert "optim.lr_head" in _one_line(e)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["data.batch_size=many"])
    assert "data.batch_size" in _one_line(e)
    bad = tmp_path / "t.yaml"
    bad.write_text("trainer:\n  num_nodes: two\n")
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml", bad])
    assert "trainer.num_nodes" in _one_line(e)


def test_missing_required_value():
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["data.val_shards=???"])
    assert "data.val_shards" in _one_line(e)


def test_missing_stage_fields_and_bad_policy(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("stages:\n  - name: a\n")
    with pytest.raises(RecipeError) as e:
        load_recipe([bad])
    assert "stages.0.steps" in _one_line(e)
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["stages.0.policy.name=clipped"])
    assert "stages.0.policy" in _one_line(e) and "clipped" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["stages.0.policy.far_wieght=0.1"])
    assert "far_wieght" in _one_line(e)


def test_semantic_checks():
    with pytest.raises(RecipeError, match="data.crop_height"):
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["data.crop_height=100"])
    with pytest.raises(RecipeError, match="model.encoder"):
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["model.encoder=vitg"])
    with pytest.raises(RecipeError, match="exclusive"):
        load_recipe([RECIPES_DIR / "finetune.yaml"], ["init_from=a.ckpt", "resume=b.ckpt"])
    with pytest.raises(RecipeError, match="model.compile_mode: unknown mode 'reduce-overhead'") as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["model.compile_mode=reduce-overhead"])
    assert "max-autotune-no-cudagraphs" in _one_line(e)


@pytest.mark.parametrize("override,message", [
    ("trainer.devices=two", "trainer.devices: 'two' is not a device count"),
    ("trainer.devices=0", "trainer.devices: 0 is not a device count"),
    ("trainer.accelerator=tpu", "trainer.accelerator: 'tpu' is not one of auto, cpu, gpu, cuda"),
    ("trainer.ckpt_every_steps=-1", "trainer.ckpt_every_steps: must be >= 0"),
    ("trainer.val_every_steps=-2", "trainer.val_every_steps: must be >= 0"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps: must be >= 1"),
    ("trainer.precision=16-mixed", "trainer.precision: '16-mixed' is not supported"),
    ("optim.lr=-1", "optim.lr and optim.head_lr_mult: must be positive"),
    ("optim.warmup_steps=-3", "optim.warmup_steps: must be >= 0"),
    ("stages.0.rewarm_steps=-1", "stages.0.rewarm_steps: must be >= 0"),
    ("model.max_depth=-1", "need 0 < min_depth < max_depth"),
    ("data.val_shards=", "data.val_shards: empty"),
    ("model.max_depth=80", "stages.0.policy.far_target: 655.35 m lies beyond the model's range (model.max_depth 80 m)"),
    ("stages.0.policy.far_target=2000", "stages.0.policy.far_target: 2000 m lies beyond the model's range"),
    ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
    ("optim.poly_power=nan", "optim.poly_power: must be a finite number, got nan"),
    ("optim.poly_power=-1", "optim.poly_power: must be >= 0"),
    ("optim.beta1=1.5", "optim.beta1: must lie in [0, 1), got 1.5"),
    ("loss.grad_weight=-1", "loss.grad_weight: must be >= 0"),
    ("loss.silog_lambda=1.5", "loss.silog_lambda: must lie in [0, 1]"),
    ("data.scale_jitter=-2", "data.scale_jitter: must be >= 0"),
    ("data.color_jitter=1", "data.color_jitter: must lie in [0, 1), got 1"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer: must be >= 0"),
    ("data.max_bad_samples=-1", "data.max_bad_samples: must be >= 0"),
    ("data.val_max_images=-1", "data.val_max_images: must be >= 0"),
    ("logging.depth_vmax=0", "logging.depth_vmax: must be positive"),
    ("stages.0.step=5", "unknown key 'stages.0.step' (did you mean 'stages.0.steps'?)"),
    ("stages.1.steps=5", "command line: unknown key 'stages.1' (did you mean 'stages.0'?)"),
    ("stages.0.steps=0", "stages.0.steps: must be positive, got 0"),
    ("data.crop_height=105", "data.crop_height: must be a positive multiple of 14, got 105"),  # 15 x 7
    ("data.val_width=100", "data.val_width: must be a positive multiple of 14, got 100"),
    ("data.val_height=0", "data.val_height: must be a positive multiple of 14, got 0"),
    ("data.batch_size=0", "data.batch_size: must be positive, got 0"),
    ("data.val_batch_size=0", "data.val_batch_size: must be positive, got 0"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
    ("data.train_shards=", "data.train_shards: empty"),
    ("logging.mode=sometimes", "logging.mode: unknown mode 'sometimes'"),
    ("logging.project=", "logging.project: must not be empty"),
    ("logging.project=team/depth", "logging.project: 'team/depth' contains /, which W&B names cannot hold"),
    ("logging.project='depth '", "logging.project: 'depth ' has leading or trailing spaces"),
    ("logging.project=" + "p" * 129, "is longer than W&B's 128 characters"),
    ("logging.entity='my:team'", "logging.entity: 'my:team' contains :"),
    ("trainer.log_every_steps=0", "trainer.log_every_steps: must be >= 1"),
    ("trainer.num_nodes=0", "trainer.num_nodes: must be >= 1"),
    ("trainer.devices='0'", "trainer.devices: '0' is not a device count"),
    ("trainer.devices=[0, -1]", "is not a device count"),
    ("trainer.devices=true", "trainer.devices: True is not a device count"),
    ("trainer.devices=[]", "is not a device count"),
    ("optim.beta2=1", "optim.beta2: must lie in [0, 1), got 1.0"),
    ("optim.beta1=-0.1", "optim.beta1: must lie in [0, 1), got -0.1"),
    ("optim.head_lr_mult=0", "optim.lr and optim.head_lr_mult: must be positive"),
    ("optim.weight_decay=-0.01", "optim.weight_decay: must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip: must be >= 0"),
    ("loss.silog_lambda=-0.5", "loss.silog_lambda: must be >= 0"),
    ("loss.nll_weight=-1", "loss.nll_weight: must be >= 0"),
    ("data.epoch_samples=-1", "data.epoch_samples: must be >= 0"),
    ("logging.image_every_steps=-1", "logging.image_every_steps: must be >= 0"),
    ("logging.depth_vmax=inf", "logging.depth_vmax: must be a finite number, got inf"),
    ("trainer.log_every_steps=-3", "trainer.log_every_steps: must be >= 1"),
    ("model.head=linear", "model.head: unknown head 'linear'"),
    ("model.min_depth=0", "need 0 < min_depth < max_depth"),
    ("model.min_depth=-0.1", "need 0 < min_depth < max_depth"),
    ("model.min_depth=2000", "need 0 < min_depth < max_depth"),
    ("run.seed=-1", "run.seed: must lie in [0, 4294967295], got -1"),
    ("run.seed=4294967296", "run.seed: must lie in [0, 4294967295], got 4294967296"),
    ("stages={name: a, steps: 3}", "command line: stages: expected a list, got a mapping"),
    ("data=[1]", "command line: data: expected a mapping of keys, got a list"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    """Each check of ``validate`` on its own: values Lightning or the optimizer would only refuse
    later, with a traceback, or that would train quietly wrong."""
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], [override])
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


@pytest.mark.parametrize("override,message", [
    ("stages.0.rewarm_steps=10", "stages.0.rewarm_steps: 10, but the first stage follows no switch"),
    ("stages.1.rewarm_steps=5000", "stages.1.rewarm_steps: 5000 is longer than the stage's 1000 steps"),
    ("optim.warmup_steps=2500", "optim.warmup_steps: 2500 runs past stage 0's 2000 steps into a stage that re-warms"),
    ("optim.warmup_steps=3001", "optim.warmup_steps: 3001 is longer than the run's 3000 steps"),
    ("trainer.strategy=ddp_spawn", "trainer.strategy: 'ddp_spawn' is not supported (auto, or ddp"),
    ("trainer.strategy=bogus", "trainer.strategy: 'bogus' is not supported"),
    ("stages.1.policy={name: mixed, far_target: 50}", "stages.1.policy.far_target: 50 m lies within the policy's "
                                                      "max_depth 80 m"),
    ("stages.1.name=pretrain", "stages.1.name: duplicate stage name 'pretrain'"),
    ("stages.1.rewarm_steps=1001", "stages.1.rewarm_steps: 1001 is longer than the stage's 1000 steps"),
    ("optim.warmup_steps=2001", "optim.warmup_steps: 2001 runs past stage 0's 2000 steps"),
    ("stages.1.policy={name: mixed, far_target: 80}", "stages.1.policy.far_target: 80 m lies within the policy's "
                                                      "max_depth 80 m"),
])
def test_schedules_and_targets_that_defeat_themselves_are_refused(override, message):
    """A re-warm-up on the first stage would multiply with the warm-up; a sky target inside the mask
    teaches phantoms. Each limit is refused one past it (test_values_at_the_limits_load: at it)."""
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "curriculum.yaml"], [override])
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


@pytest.mark.parametrize("devices", ["2", "auto", "-1", "0,1", "'0, 1'", "[0, 1]", "1"])
def test_lightning_device_forms_load(devices):
    assert load_recipe([RECIPES_DIR / "pretrain.yaml"], [f"trainer.devices={devices}"])


@pytest.mark.parametrize("precision", ["32-true", "32", "bf16-mixed", "bf16"])
def test_supported_precisions_load(precision):
    assert load_recipe([RECIPES_DIR / "pretrain.yaml"], [f"trainer.precision={precision}"])


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe([tmp_path / "nope.yaml"])
    bad = tmp_path / "b.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError) as e:
        load_recipe([bad])
    assert str(bad) in _one_line(e)
    for text in ("'0'\n", "0\n"):  # a lone string or number (omegaconf fails on the first without a message)
        bad.write_text(text)
        with pytest.raises(RecipeError) as e:
            load_recipe([bad])
        assert str(bad) in _one_line(e)


def test_schedule_is_a_function_of_step():
    stages = [{"name": "a", "steps": 10}, {"name": "b", "steps": 5, "rewarm_steps": 2}]
    assert stage_starts(stages) == [0, 10]
    assert [stage_index_at(s, stages) for s in (0, 9, 10, 14, 15)] == [0, 0, 1, 1, 1]
    assert lr_factor(0, stages, 0, 0.9) == 1.0
    assert lr_factor(5, stages, 0, 1.0) == pytest.approx(1 - 5 / 15)
    assert lr_factor(0, stages, 4, 1.0) == pytest.approx(0.25)
    # re-warm-up at the stage switch: half of the poly value on the first step of stage b
    assert lr_factor(10, stages, 0, 1.0) == pytest.approx((1 - 10 / 15) * 0.5)
    assert lr_factor(12, stages, 0, 1.0) == pytest.approx(1 - 12 / 15)


def test_policy_targets_within_the_heads_range():
    """Depth-Anything-V2's own setup (sigmoid x 80 head, 80 m mask) loads; a mask beyond the head does not."""
    assert load_recipe([RECIPES_DIR / "finetune.yaml"], ["model.head=sigmoid", "model.max_depth=80"])
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "finetune.yaml"], ["model.head=sigmoid", "model.max_depth=20"])
    assert "stages.0.policy.max_depth: 80 m lies beyond the model's range (model.max_depth 20 m)" in _one_line(e)


def test_command_line_gives_whole_sections_and_lists_as_a_recipe_file_would():
    cfg = load_recipe([RECIPES_DIR / "smoke.yaml"], ["stages=[{name: a, steps: 3, policy: {name: unclipped}}]"])
    assert len(cfg.stages) == 1 and cfg.stages[0].steps == 3 and cfg.stages[0].rewarm_steps == 0
    cfg = load_recipe([RECIPES_DIR / "curriculum.yaml"], ["stages.1={name: near, steps: 7, policy: {name: max_depth}}"])
    assert [s.name for s in cfg.stages] == ["pretrain", "near"] and cfg.stages[1].policy == {"name": "max_depth"}
    assert load_recipe([RECIPES_DIR / "smoke.yaml"], ["model={encoder: vits}"]).model.encoder == "vits"
    # a policy is replaced whole, not merged with the one it replaces (whose fields may not fit)
    cfg = load_recipe([RECIPES_DIR / "curriculum.yaml"], ["stages.1.policy={name: unclipped}"])
    assert cfg.stages[1].policy == {"name": "unclipped"}
    cfg = load_recipe([RECIPES_DIR / "curriculum.yaml"], ["stages.1.policy={name: mixed, far_weight: 0.2}"])
    assert cfg.stages[1].policy == {"name": "mixed", "far_weight": 0.2}
    for override, message in [
        ("stages=[{name: a, step: 3}]", "command line: unknown key 'stages.0.step' (did you mean 'stages.0.steps'?)"),
        ("stages.0={name: a, stepz: 3}", "command line: unknown key 'stages.0.stepz'"),
        ("model={encodr: vits}", "command line: unknown key 'model.encodr' (did you mean 'model.encoder'?)"),
        ("stages=[{name: a}]", "missing required value 'stages.0.steps'"),
    ]:
        with pytest.raises(RecipeError) as e:
            load_recipe([RECIPES_DIR / "smoke.yaml"], [override])
        assert message in _one_line(e), (override, str(e.value))


def test_number_words_and_bare_keys_on_the_command_line():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no conversion warning from omegaconf before the error line
        with pytest.raises(RecipeError, match="optim.lr: must be a finite number, got nan"):
            load_recipe([RECIPES_DIR / "pretrain.yaml"], ["optim.lr=nan"])
        assert load_recipe([RECIPES_DIR / "pretrain.yaml"], ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml"], ["optim.lr=fast"])
    assert "optim.lr" in _one_line(e)
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "pretrain.yaml", "stages.0.steps"])
    assert _one_line(e) == "recipe file not found: stages.0.steps (an override needs a value: stages.0.steps=...)"
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "nothere.yaml"])
    assert _one_line(e) == f"recipe file not found: {RECIPES_DIR / 'nothere.yaml'}"


def test_lr_factor_poly_power_end_of_run_and_warmup_boundary():
    stages = [{"name": "a", "steps": 10}, {"name": "b", "steps": 5}]
    assert lr_factor(5, stages, 0, 0.9) == pytest.approx((1 - 5 / 15) ** 0.9)
    assert lr_factor(15, stages, 0, 0.9) == 0.0
    assert lr_factor(20, stages, 0, 0.9) == 0.0  # past the end: 0, not a complex number
    assert lr_factor(3, stages, 4, 1.0) == pytest.approx(1 - 3 / 15)  # last warm-up step: full rate
    assert lr_factor(4, stages, 4, 1.0) == pytest.approx(1 - 4 / 15)  # warm-up over


@pytest.mark.parametrize("overrides", [
    ["loss.silog_lambda=1"],  # [0, 1]: 1 included
    ["loss.silog_lambda=0", "optim.beta1=0", "optim.beta2=0.99999"],
    ["stages.1.rewarm_steps=1000"],  # a re-warm-up as long as its stage
    ["optim.warmup_steps=2000"],  # the warm-up ends where the re-warming stage starts
    ["optim.warmup_steps=2500", "stages.1.rewarm_steps=0"],  # no re-warm-up: nothing to multiply with
    ["stages.1.policy={name: mixed, far_target: 80.5}"],
    ["data.num_workers=0", "trainer.devices=[0]", "data.crop_height=14"],
    ["logging.project=" + "p" * 128, "logging.entity=my-team_2", "logging.group=a/b"],  # groups are left to W&B
])
def test_values_at_the_limits_load(overrides):
    assert load_recipe([RECIPES_DIR / "curriculum.yaml"], overrides)


# one key of each kind the schema has (text, count, number, switch, any, free policy mapping, list,
# section, inside a policy, unknown), each given every kind of value
@pytest.mark.parametrize("key", ["run.name", "run.seed", "optim.lr", "run.overwrite", "trainer.devices", "stages.0.policy",
                                 "stages", "data", "stages.0.policy.far_weight", "model.x.y"])
def test_any_override_loads_or_is_one_line_without_warnings(key):
    """Whatever follows key= on the command line ends in a recipe or in one RecipeError line: no
    traceback, and no library warning (omegaconf's implicit conversions) on the console."""
    assert_each_override_loads_or_fails_in_one_line(lambda o: load_recipe([RECIPES_DIR / "pretrain.yaml"], o), key)


@pytest.mark.parametrize("text,message", [
    ("stages:\n  name: a\n", "stages: expected a list, got a mapping"),
    ("data: 5\n", "data: expected a mapping of keys, got the value 5"),
    ("data:\n  - 1\n", "data: expected a mapping of keys, got a list"),
])
def test_a_recipe_file_of_the_wrong_shape_names_the_file_and_key(tmp_path, text, message):
    """omegaconf's own words ("Cannot merge incompatible container types") named neither."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe([RECIPES_DIR / "smoke.yaml", path])
    assert str(e.value) == f"{path}: {message}"


def test_a_recipe_file_may_point_a_section_at_another_with_a_reference(tmp_path):
    """The shape check runs before references are resolved: a ${...} is left to omegaconf."""
    path = tmp_path / "ref.yaml"
    path.write_text("stages:\n  - {name: pretrain, steps: 4, policy: {name: max_depth, max_depth: 80.0}}\n"
                    "  - name: finetune\n    steps: 4\n    policy: ${stages.0.policy}\n")
    cfg = load_recipe([RECIPES_DIR / "smoke.yaml", path])
    assert to_plain(cfg)["stages"][1]["policy"] == {"name": "max_depth", "max_depth": 80.0}
