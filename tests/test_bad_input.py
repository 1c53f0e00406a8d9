"""Bad input at every public entry point: one table, one test.

Each row is ``(id, call, expected exception type, text the message must
contain)``. The call is made with one bad value; the test asserts the error
type and that the message names the value the user passed (its ``repr`` or
``str``), so a user sees what was wrong without reading our code. Only tiny
models are built and nothing trains: the whole table runs in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException, MissingConfigException
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import open_dict
from torch import nn

from models import PlainNet, hf_bert
from slimfit.callbacks import MemoryMonitor, SlimFit
from slimfit.callbacks.checks import check_strategy
from slimfit import ActivationCompressor, CompressionConfig, Treatment
from slimfit import SlimFitConfig
from slimfit import CheckpointMismatchError, SelectionError, SlimFitError, UnsupportedSetupError
from slimfit.experiments.tasks import ClassificationData, ClassificationTask
from slimfit.experiments.zoo import hf_from_config
from slimfit.experiments.train import CONFIG_DIR, build
from slimfit import LayerFreezer
from slimfit import measure_step
from slimfit import BudgetError, parse_budget
from slimfit.freezing.scheduler import InterLayerScheduler
from slimfit import StreamConfig, WeightStreamer


# -- small builders (called inside each row, so a row builds only what it needs) ---------------

def freezer(**kw) -> LayerFreezer:
    """Six Linear weights (five if the output head is kept trained): 2-3 frozen at r=0.5."""
    return LayerFreezer(nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)]), freeze_rate=0.5, **kw)


def scheduler_state(drop: str | None = None, **change) -> dict:
    state = InterLayerScheduler(["a", "b", "c"], 0.5).state_dict()
    state.update(change)
    if drop is not None:
        del state[drop]
    return state


def load_scheduler(state) -> None:
    InterLayerScheduler(["a", "b", "c"], 0.5).load_state_dict(state)


def other_model_state() -> dict:
    return LayerFreezer(PlainNet(), freeze_rate=0.5).state_dict()  # units emb.weight, fc1.weight...


def measure(model: nn.Module, optimizer=None, step_fn=None):
    opt = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    fn = step_fn if step_fn is not None else (lambda: model(torch.randn(2, 4)).sum().backward())
    return measure_step(model, opt, fn)


def with_foreign_tensor(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and an optimizer over its parameters plus one (7, 3) tensor it does not own."""
    return model, torch.optim.SGD([*model.parameters(), nn.Parameter(torch.zeros(7, 3))], lr=0.1)


def no_candidates() -> nn.Module:
    m = nn.Linear(4, 2)
    m.requires_grad_(False)  # every parameter frozen by the user: nothing left to schedule
    return m


def cfg(*overrides: str, delete: tuple[str, ...] = ()):
    """Compose configs/train.yaml with the tiny BERT, then delete dotted keys."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        c = compose("train", overrides=["model=bert_tiny", "output_dir=/tmp/unused", *overrides])
    for key in delete:
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        with open_dict(node):
            del node[leaf]
    return c


def compose_only(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


NAN = float("nan")

# (id, call, expected type, substring of the message that names the bad value)
CASES = [
    # -- SlimFit callback constructor ----------------------------------------------------------
    ("slimfit_rate_one", lambda: SlimFit(freeze_rate=1.0), SlimFitError, "got 1.0"),
    ("slimfit_rate_negative", lambda: SlimFit(freeze_rate=-0.1), SlimFitError, "got -0.1"),
    ("slimfit_rate_nan", lambda: SlimFit(freeze_rate=NAN), SlimFitError, "got nan"),
    ("slimfit_rate_inf", lambda: SlimFit(freeze_rate=math.inf), SlimFitError, "got inf"),
    ("slimfit_rate_bool", lambda: SlimFit(freeze_rate=True), SlimFitError, "got True"),
    ("slimfit_rate_string", lambda: SlimFit(freeze_rate="0.9"), SlimFitError, "got '0.9'"),
    ("slimfit_include_bad_regex", lambda: SlimFit(include="encoder.(layer"), SelectionError,
     "'encoder.(layer'"),
    ("slimfit_exclude_wrong_type", lambda: SlimFit(exclude=5), SelectionError, "got 5"),
    ("slimfit_always_train_non_str_item", lambda: SlimFit(always_train=["classifier.weight", 3]),
     SelectionError, "['classifier.weight', 3]"),
    ("slimfit_always_train_set", lambda: SlimFit(always_train={"classifier.weight"}),
     SelectionError, "{'classifier.weight'}"),
    ("slimfit_groups_bare_string", lambda: SlimFit(groups=r"(.*)\.weight"), SlimFitError,
     r"'(.*)\\.weight'"),
    ("slimfit_groups_non_str_entry", lambda: SlimFit(groups=[7]), SlimFitError, "got 7"),
    ("slimfit_groups_bad_regex", lambda: SlimFit(groups=["(unclosed"]), SelectionError,
     "'(unclosed'"),
    ("slimfit_seed_string", lambda: SlimFit(seed="0"), SlimFitError, "got '0'"),
    ("slimfit_seed_float", lambda: SlimFit(seed=1.5), SlimFitError, "got 1.5"),
    ("slimfit_seed_bool", lambda: SlimFit(seed=False), SlimFitError, "got False"),
    ("slimfit_max_frozen_age_zero", lambda: SlimFit(max_frozen_age=0), SlimFitError, "got 0"),
    ("slimfit_max_frozen_age_bool", lambda: SlimFit(max_frozen_age=True), SlimFitError, "got True"),
    ("slimfit_max_frozen_age_float", lambda: SlimFit(max_frozen_age=2.5), SlimFitError, "got 2.5"),
    ("slimfit_score_eps_zero", lambda: SlimFit(score_eps=0.0), SlimFitError, "got 0.0"),
    ("slimfit_score_eps_negative", lambda: SlimFit(score_eps=-1e-8), SlimFitError, "-1e-08"),
    ("slimfit_score_eps_string", lambda: SlimFit(score_eps="1e-8"), SlimFitError, "'1e-8'"),
    ("slimfit_score_eps_nan", lambda: SlimFit(score_eps=NAN), SlimFitError, "got nan"),
    ("slimfit_score_eps_inf", lambda: SlimFit(score_eps=math.inf), SlimFitError, "got inf"),
    ("slimfit_score_eps_bool", lambda: SlimFit(score_eps=True), SlimFitError, "got True"),
    ("slimfit_lr_normalized_string", lambda: SlimFit(lr_normalized="yes"), SlimFitError,
     "got 'yes'"),
    ("slimfit_lr_normalized_int", lambda: SlimFit(lr_normalized=1), SlimFitError, "got 1"),
    ("slimfit_score_unknown", lambda: SlimFit(score="gradient"), SlimFitError, "'gradient'"),
    ("slimfit_on_nonfinite_unknown", lambda: SlimFit(on_nonfinite="ignore"), SlimFitError,
     "'ignore'"),
    ("slimfit_selection_unknown", lambda: SlimFit(selection="random"), SlimFitError, "'random'"),
    ("slimfit_frozen_score_decay_zero", lambda: SlimFit(frozen_score_decay=0.0), SlimFitError,
     "got 0.0"),
    ("slimfit_reserve_fraction_one", lambda: SlimFit(reserve_fraction=1.0), SlimFitError,
     "got 1.0"),
    ("slimfit_train_new_heads_string", lambda: SlimFit(train_new_heads="auto"), SlimFitError,
     "'auto'"),
    ("slimfit_log_every_zero", lambda: SlimFit(log_every_n_steps=0), ValueError, "got 0"),
    ("slimfit_log_every_bool", lambda: SlimFit(log_every_n_steps=True), ValueError, "got True"),
    ("slimfit_log_every_float", lambda: SlimFit(log_every_n_steps=2.0), ValueError, "got 2.0"),
    ("slimfit_compression_string", lambda: SlimFit(compression="int8"), TypeError, "'int8'"),
    ("slimfit_compression_dict", lambda: SlimFit(compression={"gelu": "int4"}), TypeError,
     "{'gelu': 'int4'}"),
    ("slimfit_compression_stream_config", lambda: SlimFit(compression=StreamConfig()), TypeError,
     "StreamConfig("),
    ("slimfit_stream_weights_int", lambda: SlimFit(stream_weights=2), TypeError, "got 2"),
    ("slimfit_stream_weights_string", lambda: SlimFit(stream_weights="on"), TypeError, "got 'on'"),
    ("slimfit_offload_optimizer_string", lambda: SlimFit(offload_optimizer_state="yes"),
     SlimFitError, "got 'yes'"),
    ("slimfit_offload_activations_int", lambda: SlimFit(offload_activations=1), SlimFitError,
     "got 1"),
    ("slimfit_budget_unit", lambda: SlimFit(memory_budget="12 parsecs"), BudgetError,
     "'12 parsecs'"),
    ("slimfit_budget_negative", lambda: SlimFit(memory_budget=-1), BudgetError, "got -1"),
    ("slimfit_budget_zero", lambda: SlimFit(memory_budget=0), BudgetError, "got 0"),
    ("slimfit_budget_zero_string", lambda: SlimFit(memory_budget="0GiB"), BudgetError, "'0GiB'"),
    ("slimfit_budget_bool", lambda: SlimFit(memory_budget=True), BudgetError, "got True"),
    ("slimfit_unknown_option", lambda: SlimFit(freeze_ratio=0.9), TypeError, "freeze_ratio"),
    ("slimfit_config_wrong_type", lambda: SlimFit(config={"freeze_rate": 0.9}), SlimFitError,
     "{'freeze_rate': 0.9}"),
    # -- SlimFitConfig -------------------------------------------------------------------------
    ("config_rate_above_one", lambda: SlimFitConfig(freeze_rate=1.5), SlimFitError, "got 1.5"),
    ("config_include_dict", lambda: SlimFitConfig(include={"a": 1}), SelectionError, "{'a': 1}"),
    ("config_groups_tuple_of_int", lambda: SlimFitConfig(groups=(1,)), SlimFitError, "got 1"),
    ("config_unknown_option", lambda: SlimFitConfig(freeze_ratio=0.9), TypeError, "freeze_ratio"),
    # -- LayerFreezer --------------------------------------------------------------------------
    ("freezer_bad_rate", lambda: LayerFreezer(PlainNet(), freeze_rate=2), SlimFitError, "got 2"),
    ("freezer_unknown_option", lambda: LayerFreezer(PlainNet(), freeze_ratio=0.5), TypeError,
     "freeze_ratio"),
    ("freezer_config_and_kwargs",
     lambda: LayerFreezer(PlainNet(), SlimFitConfig(), freeze_rate=0.5), SlimFitError,
     "freeze_rate"),
    ("freezer_config_wrong_type", lambda: LayerFreezer(PlainNet(), {"freeze_rate": 0.5}),
     SlimFitError, "{'freeze_rate': 0.5}"),
    ("freezer_parameter_free_model", lambda: LayerFreezer(nn.Sequential(nn.ReLU())),
     SelectionError, "Sequential"),
    ("freezer_no_candidate_layers", lambda: LayerFreezer(no_candidates()), SelectionError,
     "Linear"),
    ("freezer_include_matches_nothing", lambda: freezer(include=r"encoder\..*"), SelectionError,
     r"'encoder\\..*'"),
    ("freezer_exclude_matches_nothing", lambda: freezer(exclude=["classifier.weight"]),
     SelectionError, "['classifier.weight']"),
    ("freezer_always_train_matches_nothing", lambda: freezer(always_train="head"),
     SelectionError, "'head'"),
    ("freezer_groups_matches_nothing", lambda: freezer(groups=[r"(attn)\.weight"]),
     SelectionError, r"'(attn)\\.weight'"),
    ("freezer_apply_too_few", lambda: freezer().apply([0]), SlimFitError, "got [0]"),
    ("freezer_apply_too_many", lambda: freezer().apply([0, 1, 2, 3]), SlimFitError,
     "[0, 1, 2, 3]"),
    ("freezer_apply_out_of_range", lambda: freezer().apply([0, 1, 99]), SlimFitError, "99"),
    ("freezer_state_not_a_dict", lambda: freezer().load_state_dict("garbage"),
     CheckpointMismatchError, "got str"),
    ("freezer_state_missing_history",
     lambda: freezer().load_state_dict({"scheduler": freezer().state_dict()["scheduler"]}),
     CheckpointMismatchError, "['scheduler']"),
    ("freezer_state_of_other_model", lambda: freezer().load_state_dict(other_model_state()),
     CheckpointMismatchError, "emb.weight"),
    ("freezer_state_history_corrupt",
     lambda: freezer().load_state_dict(freezer().state_dict() | {"history": "rows"}),
     CheckpointMismatchError, "'rows'"),
    # -- InterLayerScheduler -------------------------------------------------------------------
    ("scheduler_duplicate_names", lambda: InterLayerScheduler(["a", "b", "a"], 0.5),
     SlimFitError, "'a'"),
    ("scheduler_rate_one", lambda: InterLayerScheduler(["a"], 1.0), SlimFitError, "got 1.0"),
    ("scheduler_state_not_a_dict", lambda: load_scheduler(["a", "b"]), CheckpointMismatchError,
     "list"),
    ("scheduler_state_wrong_version", lambda: load_scheduler(scheduler_state(version=99)),
     CheckpointMismatchError, "99"),
    ("scheduler_state_other_units",
     lambda: load_scheduler(scheduler_state(names=["a", "b", "ghost"])),
     CheckpointMismatchError, "ghost"),
    ("scheduler_state_short_scores", lambda: load_scheduler(scheduler_state(scores=[0.1])),
     CheckpointMismatchError, "1 scores"),
    ("scheduler_state_short_ages", lambda: load_scheduler(scheduler_state(ages=[0, 0])),
     CheckpointMismatchError, "2 ages"),
    ("scheduler_state_score_not_number",
     lambda: load_scheduler(scheduler_state(scores=["high", None, None])),
     CheckpointMismatchError, "'high'"),
    ("scheduler_state_step_not_int", lambda: load_scheduler(scheduler_state(step="soon")),
     CheckpointMismatchError, "'soon'"),
    ("scheduler_state_missing_rng", lambda: load_scheduler(scheduler_state(drop="rng_state")),
     CheckpointMismatchError, "rng_state"),
    ("scheduler_state_rng_garbage",
     lambda: load_scheduler(scheduler_state(rng_state=(3, (0,) * 5, None))),
     CheckpointMismatchError, "rng_state"),
    # -- Treatment / CompressionConfig / ActivationCompressor ----------------------------------
    ("treatment_unknown_method", lambda: Treatment(method="int3"), SlimFitError, "'int3'"),
    ("treatment_group_size_zero", lambda: Treatment(group_size=0), SlimFitError, "got 0"),
    ("treatment_group_size_float", lambda: Treatment(group_size=64.0), SlimFitError, "got 64.0"),
    ("treatment_group_size_bool", lambda: Treatment(group_size=True), SlimFitError, "got True"),
    ("treatment_topk_fraction_zero", lambda: Treatment(method="topk", topk_fraction=0.0),
     SlimFitError, "got 0.0"),
    ("treatment_topk_fraction_string", lambda: Treatment(method="topk", topk_fraction="0.1"),
     SlimFitError, "got '0.1'"),
    ("treatment_stochastic_string", lambda: Treatment(stochastic="yes"), SlimFitError, "got 'yes'"),
    ("compression_unknown_method", lambda: CompressionConfig(gelu="int2"), SlimFitError,
     "'int2'"),
    ("compression_topk_on_gelu", lambda: CompressionConfig(gelu="topk"), SlimFitError, "gelu"),
    ("compression_treatment_wrong_type", lambda: CompressionConfig(attention=8), SlimFitError,
     "got 8"),
    ("compression_mapping_unknown_field",
     lambda: CompressionConfig(gelu={"method": "int4", "group_sz": 64}), SlimFitError,
     "'group_sz'"),
    ("compression_unknown_kind", lambda: CompressionConfig(modules={"ffn": r".*fc\d"}),
     SlimFitError, "unknown kind 'ffn'"),
    ("compression_modules_bad_regex", lambda: CompressionConfig(modules={"gelu": "act("}),
     SelectionError, "'act('"),
    ("compression_modules_not_mapping", lambda: CompressionConfig(modules="gelu"),
     SlimFitError, "'gelu'"),
    ("compression_min_numel_negative", lambda: CompressionConfig(min_numel=-1), SlimFitError,
     "got -1"),
    ("compression_min_numel_bool", lambda: CompressionConfig(min_numel=True), SlimFitError,
     "got True"),
    ("compression_dropout_mask_string", lambda: CompressionConfig(dropout_mask="yes"),
     SlimFitError, "got 'yes'"),
    ("compressor_pattern_matches_nothing",
     lambda: ActivationCompressor(hf_bert(), CompressionConfig(modules={"gelu": r".*\.act_fn"})),
     SelectionError, r"'.*\\.act_fn'"),
    ("compressor_config_wrong_type", lambda: ActivationCompressor(PlainNet(), "int8"),
     SlimFitError, "'int8'"),
    # -- StreamConfig / WeightStreamer ---------------------------------------------------------
    ("stream_resident_zero", lambda: StreamConfig(resident=0), SlimFitError, "got 0"),
    ("stream_resident_negative", lambda: StreamConfig(resident=-2, prefetch=0), SlimFitError,
     "got -2"),
    ("stream_resident_bool", lambda: StreamConfig(resident=True), SlimFitError, "got True"),
    ("stream_resident_string", lambda: StreamConfig(resident="2"), SlimFitError, "got '2'"),
    ("stream_prefetch_equals_resident", lambda: StreamConfig(resident=2, prefetch=2),
     SlimFitError, "got 2"),
    ("stream_prefetch_above_resident", lambda: StreamConfig(resident=2, prefetch=5),
     SlimFitError, "got 5"),
    ("stream_prefetch_negative", lambda: StreamConfig(resident=2, prefetch=-1), SlimFitError,
     "got -1"),
    ("stream_prefetch_float", lambda: StreamConfig(resident=3, prefetch=1.0), SlimFitError,
     "got 1.0"),
    ("stream_pin_memory_string", lambda: StreamConfig(pin_memory="yes"), SlimFitError, "got 'yes'"),
    ("stream_units_wrong_type", lambda: StreamConfig(units=3), SelectionError, "got 3"),
    ("stream_units_bad_regex", lambda: StreamConfig(units="layer[0-"), SelectionError,
     "'layer[0-'"),
    ("streamer_units_match_nothing",
     lambda: WeightStreamer(hf_bert(), StreamConfig(units=r"blocks\.\d+")), SelectionError,
     r"'blocks\\.\\d+'"),
    ("streamer_units_nest",
     lambda: WeightStreamer(hf_bert(),
                            StreamConfig(units=["bert.encoder", "bert.encoder.layer.0"])),
     SelectionError, "'bert.encoder.layer.0'"),
    ("streamer_no_blocks", lambda: WeightStreamer(PlainNet()), SelectionError, "PlainNet"),
    ("streamer_config_wrong_type", lambda: WeightStreamer(hf_bert(), 2), SlimFitError, "got 2"),
    # -- parse_budget --------------------------------------------------------------------------
    ("budget_unknown_unit", lambda: parse_budget("12 GiBs"), BudgetError, "'12 GiBs'"),
    ("budget_empty", lambda: parse_budget(""), BudgetError, "''"),
    ("budget_unit_only", lambda: parse_budget("GiB"), BudgetError, "'GiB'"),
    ("budget_negative_string", lambda: parse_budget("-1GiB"), BudgetError, "'-1GiB'"),
    ("budget_negative_number", lambda: parse_budget(-5), BudgetError, "got -5"),
    ("budget_zero_float", lambda: parse_budget(0.0), BudgetError, "got 0.0"),
    ("budget_below_one_byte", lambda: parse_budget("0.5B"), BudgetError, "'0.5B'"),
    ("budget_nan", lambda: parse_budget(NAN), BudgetError, "got nan"),
    ("budget_inf", lambda: parse_budget(math.inf), BudgetError, "got inf"),
    ("budget_none", lambda: parse_budget(None), BudgetError, "None"),
    ("budget_bool", lambda: parse_budget(False), BudgetError, "got False"),
    # -- MemoryMonitor -------------------------------------------------------------------------
    ("monitor_every_zero", lambda: MemoryMonitor(every_n_steps=0), ValueError, "got 0"),
    ("monitor_every_bool", lambda: MemoryMonitor(every_n_steps=True), ValueError, "got True"),
    ("monitor_every_string", lambda: MemoryMonitor(every_n_steps="20"), ValueError, "got '20'"),
    ("monitor_depth_zero", lambda: MemoryMonitor(depth=0), ValueError, "got 0"),
    ("monitor_depth_float", lambda: MemoryMonitor(depth=2.5), ValueError, "got 2.5"),
    ("monitor_depth_bool", lambda: MemoryMonitor(depth=True), ValueError, "got True"),
    ("monitor_prefix_not_string", lambda: MemoryMonitor(prefix=3), ValueError, "got 3"),
    # -- measure_step --------------------------------------------------------------------------
    ("measure_parameter_free_model",
     lambda: measure(nn.ReLU(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)),
     SlimFitError, "ReLU"),
    ("measure_foreign_optimizer",
     lambda: measure(nn.Linear(4, 2), torch.optim.Adam(nn.Linear(4, 2).parameters())),
     SlimFitError, "Adam"),
    ("measure_partly_foreign_optimizer",
     lambda: measure(*with_foreign_tensor(nn.Linear(4, 2))),
     SlimFitError, "(7, 3)"),
    ("measure_step_without_backward",
     lambda: (lambda m: measure(m, step_fn=lambda: m(torch.randn(2, 4))))(nn.Linear(4, 2)),
     SlimFitError, "Linear"),
    # -- strategy checks -----------------------------------------------------------------------
    ("strategy_ddp_without_find_unused", lambda: check_strategy(DDPStrategy()),
     UnsupportedSetupError, "find_unused_parameters=False"),
    ("strategy_ddp_static_graph",
     lambda: check_strategy(DDPStrategy(find_unused_parameters=True, static_graph=True)),
     UnsupportedSetupError, "static_graph=True"),
    ("strategy_fsdp", lambda: check_strategy(FSDPStrategy()), UnsupportedSetupError,
     "FSDPStrategy"),
    ("strategy_unknown_object", lambda: check_strategy(object()), UnsupportedSetupError,
     "object"),
    # -- Hydra entry point ---------------------------------------------------------------------
    ("hydra_model_without_target", lambda: build(cfg(delete=("model._target_",))), ValueError,
     "'model'"),
    ("hydra_missing_slimfit_group", lambda: build(cfg(delete=("slimfit",))), ValueError,
     "'slimfit'"),
    ("hydra_slimfit_without_name",
     lambda: build(cfg("slimfit=r090", delete=("slimfit.name",))), ValueError, "'name'"),
    ("hydra_callback_without_target",
     lambda: build(cfg(delete=("callbacks.memory_monitor._target_",))), ValueError,
     "'memory_monitor'"),
    ("hydra_logger_without_target",
     lambda: build(cfg("logger=csv", delete=("logger.csv._target_",))), ValueError, "'csv'"),
    ("hydra_slimfit_bad_rate", lambda: build(cfg("slimfit=r090", "slimfit.freeze_rate=1.5")),
     InstantiationException, "got 1.5"),
    ("hydra_slimfit_bad_budget",
     lambda: build(cfg("slimfit=budget", "slimfit.memory_budget=12parsecs")),
     InstantiationException, "'12parsecs'"),
    ("hydra_unknown_experiment", lambda: compose_only("experiment=nope"), MissingConfigException,
     "nope"),
    ("data_unknown_kind", lambda: ClassificationData(kind="audio", task="x", num_labels=2),
     ValueError, "'audio'"),
    ("data_unknown_task", lambda: ClassificationData(kind="text", task="imdb50k", num_labels=2),
     ValueError, "'imdb50k'"),
    ("task_unknown_optimizer", lambda: ClassificationTask(nn.Linear(2, 2), optimizer="adam"),
     ValueError, "'adam'"),
    ("model_unknown_family", lambda: hf_from_config("gpt9", num_labels=2), ValueError, "'gpt9'"),
]


@pytest.mark.parametrize(("call", "expected", "needle"),
                         [pytest.param(c, e, n, id=i) for i, c, e, n in CASES])
def test_bad_input_is_refused_naming_the_value(call, expected, needle):
    with pytest.raises(expected) as info:
        call()
    message = str(info.value)
    assert needle in message, f"the message does not name the bad value {needle!r}: {message}"


def test_case_table_is_large_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60
