"""Every setting has a declared range, checked before anything is written (validation.RULES); settings
that do not apply are refused; the config hash covers exactly the fields that change results."""

from __future__ import annotations

import dataclasses

import pytest

from refusal_nnsight.cli import compose
from refusal_nnsight.config import RunConfig
from refusal_nnsight.errors import UserError
from refusal_nnsight.validation import (
    RULES,
    config_hash,
    get_field,
    is_numeric,
    leaf_fields,
    validate,
)

NUMERIC = [name for name, tp in leaf_fields() if is_numeric(tp)]
RULED = {rule.field for rule in RULES}


def test_every_numeric_field_of_every_config_dataclass_has_a_range():
    assert "search.fm.chunk" in NUMERIC and "data.n_train" in NUMERIC  # the walk reaches every group
    missing = [name for name in NUMERIC if name not in RULED]
    assert not missing, (
        f"add a Rule for each of {missing} to RULES in refusal_nnsight/validation.py (e.g. count('{missing[0]}'))"
    )


def test_every_rule_names_a_field():
    fields = {name for name, _ in leaf_fields()}
    stale = sorted(RULED - fields)
    assert not stale, f"validation.RULES names fields that no longer exist: {stale}"


def _set(cfg, dotted: str, value) -> None:
    """Set the field at a dotted path of a config (a RunConfig, or one section's dataclass)."""
    parent, _, name = dotted.rpartition(".")
    setattr(get_field(cfg, parent) if parent else cfg, name, value)


@pytest.mark.parametrize("rule", RULES, ids=[r.field for r in RULES])
def test_every_rule_refuses_its_bad_values(rule):
    assert rule.bad, f"give Rule('{rule.field}', ...) at least one bad= value outside its range"
    validate(RunConfig())  # the defaults are valid
    for bad in rule.bad:
        cfg = RunConfig()
        _set(cfg, rule.field, bad)
        with pytest.raises(UserError, match=rule.field.replace(".", r"\.")):
            validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [(["data.harmful.path=x.csv"], "data.harmful.source=file"),
     (["data.harmless.column=goal"], "data.harmless.source=organism does not read it"),
     (["data=advbench", "data.harmful.source=file", "data.harmful.path=a.csv", "data.harmful.split=train"],
      "data.harmful.split is set"),
     (["model.repo_id=google/gemma-2-2b-it"], "model.source=organism does not read it"),
     (["backend.host=https://api.example"], "backend=local does not use it"),
     (["sae.release=gemma-scope-2b-pt-res-canonical"], "sae.source=organism does not read it"),
     (["data.harmful.source=file"], "needs data.harmful.path")],
)  # fmt: skip
def test_settings_that_do_not_apply_are_refused(overrides, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        compose(overrides)


def test_a_presets_settings_for_another_source_are_dropped_not_refused():
    cfg = compose(["data=advbench", "data.harmful.source=file", "data.harmful.path=a.csv"])
    assert (cfg.data.harmful.path, cfg.data.harmful.split, cfg.data.harmful.column) == (
        "a.csv",
        None,
        "prompt",
    )
    cfg = compose(["experiment=smoke", "model=gemma2_2b_it", "sae=gemma_scope_16k"])
    assert cfg.model.organism_recipe == "default"  # smoke's organism recipe does not reach a hub model


def test_stages_respect_their_dependencies():
    with pytest.raises(
        UserError, match=r"stage fm needs candidates, greedy: .*stages=\[direction,candidates,greedy,fm\]"
    ):
        compose(["stages=[direction,fm]"])
    with pytest.raises(UserError, match="unknown"):
        compose(["stages=[direction,hydra]"])
    assert compose(["stages=[direction,evaluate]"]).stages == ["direction", "evaluate"]


def test_device_must_exist_and_template_must_compile():
    import torch

    with pytest.raises(UserError, match="not a device"):
        compose(["model.device=tpu9"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            compose(["model.device=cuda:0"])
    with pytest.raises(UserError, match="does not compile"):
        compose(["model.chat_template='{% for m in messages %}{{ m.content }}'"])
    assert compose(["model.device=cpu"]).model.device == "cpu"


def test_min_active_cannot_exceed_the_harmful_train_prompts_it_counts():
    with pytest.raises(UserError, match="exceeds data.n_train=16"):
        compose(["data.n_train=16", "search.candidates.min_active=17"])
    assert compose(["data.n_train=16", "search.candidates.min_active=16"]).search.candidates.min_active == 16


def test_credentials_in_a_url_are_refused():
    with pytest.raises(UserError, match="credentials"):
        validate(dataclasses.replace(RunConfig(), backend=dataclasses.replace(RunConfig().backend, name="ndif",
                                                                                host="https://u:p@api.example")))  # fmt: skip


def test_the_config_hash_covers_every_field_that_changes_results():
    base = config_hash(compose(["experiment=smoke"]))
    same = ["search.greedy.batch_size=7", "search.fm.batch_size=3", "model.device=cpu", "backend=ndif_check",
            "stages=[direction]", "force_restart=true"]  # fmt: skip
    for override in same:
        assert config_hash(compose(["experiment=smoke", override])) == base, override
    for override in ["search.fm.rank=4", "threads=2", "seed=1", "data.n_eval=4", "model.max_new_tokens=8"]:
        assert config_hash(compose(["experiment=smoke", override])) != base, override


def test_unknown_keys_are_refused_before_hydra_sees_them():
    from refusal_nnsight.cli import _check_known_keys

    _check_known_keys(["model=organism", "data/harmful=advbench", "hydra.verbose=true", "threads=2",
                       "+search.candidates.layers.before_layer=3", "~data.harmful.path", "-m"])  # fmt: skip
    with pytest.raises(UserError, match=r"unknown config key 'search\.candidates\.topk'.*'top_k'"):
        _check_known_keys(["search.candidates.topk=3"])


# The library API takes each section's dataclass on its own; each function checks it against the
# section's Rules, so a library call refuses what the CLI refuses, before anything runs.
def _library_calls():
    import refusal_nnsight as rn
    from refusal_nnsight import config as c

    return {  # section: (its dataclass, the API call given a config of it, nothing else usable)
        "model": (c.ModelConfig, lambda cfg: rn.load_model(cfg)),
        "sae": (c.SAEConfig, lambda cfg: rn.load_saes(None, cfg)),
        "data": (c.DataConfig, lambda cfg: rn.load_prompts(cfg)),
        "search.direction": (c.DirectionConfig, lambda cfg: rn.find_direction(None, None, cfg)),
        "search.candidates": (
            c.CandidatesConfig,
            lambda cfg: rn.candidate_features(None, None, None, None, cfg),
        ),
        "search.greedy": (c.GreedyConfig, lambda cfg: rn.greedy_minimal_set(None, None, None, None, cfg)),
        "search.fm": (c.FMConfig, lambda cfg: rn.fit_interactions(None, None, None, None, None, cfg)),
        "search.redundancy": (c.RedundancyConfig, lambda cfg: rn.find_redundant(None, None, None, None, cfg)),
        "search.evaluate": (
            c.EvaluateConfig,
            lambda cfg: rn.evaluate(None, None, None, None, None, None, None, cfg),
        ),
    }


def _section(field: str) -> str:
    return next((s for s in sorted(_library_calls(), key=len, reverse=True) if field.startswith(f"{s}.")), "")


LIBRARY_RULES = [rule for rule in RULES if _section(rule.field)]


def test_every_section_rule_reaches_a_library_call():
    # the Rules no section dataclass holds are the run's own settings and the coefficient, which the
    # API takes as arguments (checked below)
    assert {r.field for r in RULES} - {r.field for r in LIBRARY_RULES} == {
        "seed",
        "threads",
        "search.coefficient",
    }


@pytest.mark.parametrize("rule", LIBRARY_RULES, ids=[r.field for r in LIBRARY_RULES])
def test_a_library_call_refuses_what_the_cli_refuses(rule):
    section = _section(rule.field)
    cls, call = _library_calls()[section]
    for bad in rule.bad:
        cfg = cls()
        _set(cfg, rule.field[len(section) + 1 :], bad)
        with pytest.raises(UserError, match=rule.field.replace(".", r"\.") + "=.* makes no sense"):
            call(cfg)
        if section == "model":  # your own model, wrapped, is checked the same way
            import refusal_nnsight as rn

            with pytest.raises(UserError, match=rule.field.replace(".", r"\.") + "=.* makes no sense"):
                rn.wrap_model(None, None, cfg)


def test_a_library_call_refuses_a_bad_coefficient_seed_or_organism_seed():
    import refusal_nnsight as rn
    from refusal_nnsight.config import CandidatesConfig, RedundancyConfig

    with pytest.raises(UserError, match=r"search\.coefficient=2\.0 makes no sense"):
        rn.candidate_features(None, None, None, None, coefficient=2.0)
    with pytest.raises(UserError, match=r"search\.coefficient=inf makes no sense"):
        rn.greedy_minimal_set(None, None, None, None, coefficient=float("inf"))
    with pytest.raises(UserError, match=r"seed=-1 makes no sense"):
        rn.fit_interactions(None, None, None, None, None, seed=-1)
    with pytest.raises(UserError, match=r"model\.organism_seed=-2 makes no sense"):
        rn.load_prompts(organism_seed=-2)
    with pytest.raises(UserError, match="awake_min=0.1 is below dormant_max"):
        rn.find_redundant(None, None, None, None, RedundancyConfig(dormant_max=0.5, awake_min=0.1))
    # a setting a plain torch call would fail on deep inside the stage, refused by name instead
    with pytest.raises(UserError, match=r"search\.candidates\.null_directions=-1"):
        rn.candidate_features(None, None, None, None, CandidatesConfig(null_directions=-1))


def test_a_valid_own_model_wraps_through_the_checked_call():
    import refusal_nnsight as rn
    from tests.tiny import model_config, tiny_llama3

    hf, tok = tiny_llama3()
    model = rn.wrap_model(hf, tok, model_config("llama3"))
    assert model.n_layers == 3 and model.cfg.name == "tiny_llama3"
