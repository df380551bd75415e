"""Presets: YAML run configurations, validated against one schema, with ``key=value`` overrides.

A configuration is a nested mapping whose sections and keys are those of :data:`DEFAULTS`;
a preset gives any subset of them. ``--set optimizer.lr=3e-4`` overrides one value (parsed
as YAML, so ``[1, 2]``, ``null`` and ``true`` work).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from .evaluate import METRICS
from .layers.tucker import EXECUTIONS
from .linalg import ALLOCATIONS, SECOND_MOMENT_RULES
from .optim.adam import COEFFICIENT_METRICS, LR_SCALINGS, NEW_MOMENTS
from .optim.base import AUGMENTATIONS, MODES, SVD_BATCHINGS, TRUNCATIONS

__all__ = ["DEFAULTS", "PresetError", "PRESET_DIR", "list_presets", "load_preset", "resolve_config",
           "apply_override", "for_method"]

def _preset_dir() -> Path:
    """presets/ of a source checkout (editable installs), else the copy a wheel carries."""
    source = Path(__file__).resolve().parent.parent / "presets"
    return source if source.is_dir() else Path(__file__).resolve().parent / "_presets"


PRESET_DIR = _preset_dir()

METHODS = ("lowrank-adam", "lowrank-sgd", "dense", "lora", "dlrt-naive", "peft-lora", "peft-dora", "peft-adalora")
PEFT = ("peft-lora", "peft-dora", "peft-adalora")  # adapters of the real PEFT library (Hugging Face models)

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"name": "mlp", "args": {}, "checkpoint": None, "new_head": False, "factory": None},
    "data": {"name": "digits", "data_dir": None, "batch_size": 64, "eval_batch_size": None, "workers": 0,
             "image_size": None, "channels": None, "train_samples": None, "test_samples": None,
             "text_column": "text", "label_column": "label", "max_length": 64, "tokenizer": None,
             "columns": None, "train_file": None, "test_file": None, "metric": "accuracy"},
    "factorize": {"rank": None, "tau": None, "include": None, "exclude": [], "conv_format": "matrix",
                  "match_cr": None, "target_cr": None, "adapter": False, "trainable": None,
                  "adapter_dropout": 0.0, "allocation": "relative", "calibration": 0, "execution": "auto"},
    "optimizer": {"method": "lowrank-adam", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999],
                  "momentum": 0.9, "tau": 0.1, "min_rank": 1, "max_rank": None, "mode": "fused",
                  "second_moment": "squared", "lr_scaling": "dense",
                  "new_moments": "zero", "update_every": 1, "max_params": None, "coefficient_metric": "uniform",
                  "fixed_ranks": False, "rank_every": 1, "svd_batching": "auto", "augmentation": "auto",
                  "basis_every": 1, "capacity": None, "truncation": "svd", "new_block_fraction": None},
    "train": {"epochs": 10, "seed": 0, "device": "auto", "bf16": False, "grad_clip": None,
              "schedule": "cosine", "warmup_epochs": 0.0, "tau_warmup_epochs": 0.0,
              "budget_warmup_epochs": 0.0, "budget_warmup_start_cr": None, "distill": 0.0, "distill_temperature": 2.0},
}

# keys that default to None but take a number
_FLOAT_OR_NONE = {"tau", "grad_clip", "target_cr", "budget_warmup_start_cr", "new_block_fraction"}

# keys whose value may be a mapping (everything else must be a scalar or a list)
_MAPPING_KEYS = {("model", "args")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(check):
    return lambda value: value is None or check(value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# keys whose default (None, a list) says too little about what they take: (description, check)
_TYPED: dict[tuple[str, str], tuple[str, Any]] = {
    ("model", "checkpoint"): ("a path or null", _optional(lambda v: isinstance(v, str))),
    ("model", "factory"): ("'package.module:callable' or null", _optional(lambda v: isinstance(v, str) and ":" in v)),
    ("data", "data_dir"): ("a path or null", _optional(lambda v: isinstance(v, str))),
    ("data", "eval_batch_size"): ("an integer or null", _optional(_is_int)),
    ("data", "image_size"): ("an integer or null", _optional(_is_int)),
    ("data", "channels"): ("an integer or null", _optional(_is_int)),
    ("data", "train_samples"): ("an integer or null", _optional(_is_int)),
    ("data", "test_samples"): ("an integer or null", _optional(_is_int)),
    ("factorize", "rank"): ("an integer or null", _optional(_is_int)),
    ("factorize", "include"): ("a list of layer-name patterns or null", _optional(_strings)),
    ("factorize", "exclude"): ("a list of layer-name patterns", _strings),
    ("factorize", "match_cr"): ("a run directory or null", _optional(lambda v: isinstance(v, str))),
    ("factorize", "trainable"): ("a list of parameter-name patterns or null", _optional(_strings)),
    ("data", "tokenizer"): ("a path or null", _optional(lambda v: isinstance(v, str))),
    ("data", "text_column"): ("a column name, or a list of two for sentence pairs",
                              lambda v: isinstance(v, str) or (_strings(v) and 1 <= len(v) <= 2)),
    ("data", "columns"): ("a list of column names (a file without a header) or null", _optional(_strings)),
    ("data", "train_file"): ("a file name in data_dir, or null", _optional(lambda v: isinstance(v, str))),
    ("data", "test_file"): ("a file name in data_dir, or null", _optional(lambda v: isinstance(v, str))),
    ("optimizer", "max_params"): ("an integer or null", _optional(_is_int)),
    ("optimizer", "max_rank"): ("an integer or null", _optional(_is_int)),
    ("optimizer", "capacity"): ("an integer or null", _optional(_is_int)),
    ("optimizer", "betas"): ("two numbers, e.g. [0.9, 0.999]",
                             lambda v: isinstance(v, list) and len(v) == 2
                             and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v)),
}


class PresetError(ValueError):
    """A preset or override is unknown or invalid; the message says which and what to do."""


def list_presets() -> dict[str, str]:
    """``{name: one-line description}`` of the shipped presets (the YAML's first comment
    line after the command header)."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        desc = ""
        for line in path.read_text().splitlines():
            if line.startswith("#") and not line.lstrip("# ").startswith("lrc "):
                desc = line.lstrip("# ").strip()
                break
        out[path.stem] = desc
    return out


def load_preset(name_or_path: str) -> dict:
    """A shipped preset by name, or a YAML file by path, merged over :data:`DEFAULTS`."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise PresetError(f"unknown preset {name_or_path!r}; `lrc presets` lists them "
                              f"({', '.join(list_presets()) or 'none found in ' + str(PRESET_DIR)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PresetError(f"{path}: not valid YAML ({e})") from None
    return resolve_config(data, source=str(path))


def resolve_config(data: dict, source: str = "config") -> dict:
    """Merge ``data`` over :data:`DEFAULTS` and validate every key and value."""
    if not isinstance(data, dict):
        raise PresetError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    methods = data.pop("methods", None)
    cfg = copy.deepcopy(DEFAULTS)
    for section, values in data.items():
        if section not in cfg:
            raise PresetError(f"{source}: unknown section {section!r} (sections: {', '.join(cfg)})")
        if not isinstance(values, dict):
            raise PresetError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            _set_checked(cfg, section, key, value, source)
    validate(cfg, source)
    if methods is not None:
        cfg["methods"] = _checked_methods(cfg, methods, source)
    return cfg


def _checked_methods(cfg: dict, methods: Any, source: str) -> dict:
    """A preset's ``methods:`` section — ``{method: {"section.key": value}}``, what each method
    changes (its own learning rate, say) — checked as ``--set`` would check each value."""
    if not isinstance(methods, dict):
        raise PresetError(f"{source}: methods must map a method to its settings, e.g. "
                          "methods: {peft-lora: {optimizer.lr: 1.0e-3}}")
    out = {}
    for method, settings in methods.items():
        if method not in METHODS:
            raise PresetError(f"{source}: methods.{method}: not a method ({', '.join(METHODS)})")
        if not isinstance(settings, dict):
            raise PresetError(f"{source}: methods.{method} must map section.key to a value, e.g. optimizer.lr: 1.0e-3")
        probe = copy.deepcopy(cfg)
        probe["optimizer"]["method"] = method
        for dotted, value in settings.items():
            parts = str(dotted).split(".")
            if len(parts) != 2 or dotted == "optimizer.method":
                raise PresetError(f"{source}: methods.{method}.{dotted}: a section.key (not optimizer.method), "
                                  "e.g. optimizer.lr")
            _set_checked(probe, parts[0], parts[1], value, f"{source}: methods.{method}")
        validate(probe, f"{source}: methods.{method}")
        out[method] = dict(settings)
    return out


def for_method(cfg: dict, method: str) -> dict:
    """``cfg`` for one ``method``: ``optimizer.method`` set and the settings its preset names for
    it under ``methods`` applied — except the keys listed in ``cfg["_user_keys"]`` (what the user
    set on the command line wins). The result has neither of those two entries."""
    out = copy.deepcopy(cfg)
    methods, user = out.pop("methods", None) or {}, set(out.pop("_user_keys", ()))
    out["optimizer"]["method"] = method
    for dotted, value in methods.get(method, {}).items():
        if dotted not in user:
            section, key = dotted.split(".")
            _set_checked(out, section, key, value, f"methods.{method}")
    validate(out, f"methods.{method}")
    return out


def apply_override(cfg: dict, assignment: str, source: str | None = None) -> dict:
    """Apply one ``section.key=value`` (value parsed as YAML) to a resolved config;
    ``source`` names it in error messages (default ``--set section.key=value``)."""
    if "=" not in assignment:
        raise PresetError(f"--set {assignment!r}: expected section.key=value, e.g. optimizer.lr=3e-4")
    source = source or f"--set {assignment}"
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    cfg = copy.deepcopy(cfg)
    if len(parts) == 3 and (parts[0], parts[1]) in _MAPPING_KEYS:
        cfg[parts[0]][parts[1]][parts[2]] = value
    elif len(parts) == 2:
        _set_checked(cfg, parts[0], parts[1], value, source)
    else:
        raise PresetError(f"--set {assignment!r}: unknown key {dotted!r} (use section.key, e.g. train.epochs)")
    validate(cfg, source)
    return cfg


def with_target_cr(cfg: dict, target_cr: float, source: str) -> dict:
    """``cfg`` with ``factorize.target_cr`` set and ``factorize.tau`` (which it replaces) cleared."""
    cfg = copy.deepcopy(cfg)
    if isinstance(target_cr, bool) or not isinstance(target_cr, (int, float)):
        raise PresetError(f"{source}: a compression ratio in percent, e.g. 90")
    cfg["factorize"]["target_cr"], cfg["factorize"]["tau"] = float(target_cr), None
    validate(cfg, source)
    return cfg


def _set_checked(cfg: dict, section: str, key: str, value: Any, source: str) -> None:
    if section not in cfg:
        raise PresetError(f"{source}: unknown section {section!r} (sections: {', '.join(cfg)})")
    if key not in cfg[section]:
        raise PresetError(f"{source}: unknown key {section}.{key} (keys: {', '.join(cfg[section])})")
    default = DEFAULTS[section][key]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float) or key in _FLOAT_OR_NONE:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            value is None and key in _FLOAT_OR_NONE)
        value = float(value) if ok and value is not None else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:  # None default: any scalar or list
        ok = not isinstance(value, dict)
    if ok and (section, key) in _TYPED:
        expected, ok = _TYPED[section, key], _TYPED[section, key][1](value)
    else:
        expected = (type(default).__name__ if default is not None else "a value", None)
    if ok and isinstance(value, float) and not math.isfinite(value):
        raise PresetError(f"{source}: {section}.{key} = {value!r} must be a finite number")
    if not ok:
        raise PresetError(f"{source}: {section}.{key} = {value!r} has the wrong type (expected {expected[0]})")
    cfg[section][key] = value


def validate(cfg: dict, source: str) -> None:
    """Cross-field checks with one clear message each."""
    opt, fac, train = cfg["optimizer"], cfg["factorize"], cfg["train"]
    if opt["method"] not in METHODS:
        raise PresetError(f"{source}: optimizer.method {opt['method']!r} is not one of {', '.join(METHODS)}")
    if not (0.0 < opt["tau"] < 1.0):
        raise PresetError(f"{source}: optimizer.tau = {opt['tau']} must lie in (0, 1)")
    if fac["tau"] is not None and not (isinstance(fac["tau"], (int, float)) and 0.0 < fac["tau"] < 1.0):
        raise PresetError(f"{source}: factorize.tau = {fac['tau']} must lie in (0, 1)")
    if fac["rank"] is not None and not (isinstance(fac["rank"], int) and fac["rank"] >= 1):
        raise PresetError(f"{source}: factorize.rank = {fac['rank']!r} must be a positive integer")
    if fac["adapter"] and opt["method"] == "lora":
        raise PresetError(f"{source}: method lora is the fixed-rank compression baseline; for LoRA adapters beside "
                          "frozen weights use method peft-lora (factorize.adapter is for the low-rank methods)")
    if opt["method"] in PEFT and not fac["include"]:
        raise PresetError(f"{source}: method {opt['method']} puts adapters on the layers factorize.include names; "
                          "set it (e.g. ['*.query', '*.key', '*.value'])")
    if fac["adapter"] and fac["target_cr"] is not None:
        raise PresetError(f"{source}: factorize.target_cr sets a compressed size; adapters keep the dense "
                          "weights (bound them with optimizer.max_params)")
    if not 0.0 <= fac["adapter_dropout"] < 1.0:
        raise PresetError(f"{source}: factorize.adapter_dropout = {fac['adapter_dropout']} must lie in [0, 1)")
    if fac["adapter_dropout"] and not fac["adapter"]:
        raise PresetError(f"{source}: factorize.adapter_dropout is for factorize.adapter: true")
    if opt["max_params"] is not None and opt["max_params"] < 1:
        raise PresetError(f"{source}: optimizer.max_params = {opt['max_params']} must be ≥ 1")
    if opt["max_params"] is not None and fac["target_cr"] is not None:
        raise PresetError(f"{source}: optimizer.max_params and factorize.target_cr both set the budget; set one")
    if cfg["data"]["metric"] not in METRICS:
        raise PresetError(f"{source}: data.metric {cfg['data']['metric']!r}: choose one of {', '.join(METRICS)}")
    if cfg["data"]["max_length"] < 2:
        raise PresetError(f"{source}: data.max_length = {cfg['data']['max_length']} must be ≥ 2")
    if fac["target_cr"] is not None:
        if not 0.0 < fac["target_cr"] < 100.0:
            raise PresetError(f"{source}: factorize.target_cr = {fac['target_cr']} must lie in (0, 100) "
                              "(a compression ratio in percent)")
        if fac["tau"] is not None or fac["match_cr"]:
            which = "factorize.tau" if fac["tau"] is not None else "factorize.match_cr"
            raise PresetError(f"{source}: factorize.target_cr and {which} both choose the ranks; set one "
                              f"(--target-cr clears factorize.tau)")
    if (opt["method"] != "dense" and opt["method"] not in PEFT and fac["rank"] is None and fac["tau"] is None
            and not fac["match_cr"] and fac["target_cr"] is None):
        raise PresetError(f"{source}: method {opt['method']} needs factorize.rank, factorize.tau or "
                          "factorize.target_cr")
    if fac["match_cr"] and opt["method"] != "lora":
        raise PresetError(f"{source}: factorize.match_cr picks LoRA ranks; it needs optimizer.method=lora")
    if opt["lr_scaling"] not in LR_SCALINGS:
        raise PresetError(f"{source}: optimizer.lr_scaling {opt['lr_scaling']!r}: choose one of {', '.join(LR_SCALINGS)}")
    if opt["new_moments"] not in NEW_MOMENTS:
        raise PresetError(f"{source}: optimizer.new_moments {opt['new_moments']!r}: choose one of "
                          f"{', '.join(NEW_MOMENTS)}")
    if fac["allocation"] not in ALLOCATIONS:
        raise PresetError(f"{source}: factorize.allocation {fac['allocation']!r}: choose one of {', '.join(ALLOCATIONS)}")
    if not _is_int(fac["calibration"]) or fac["calibration"] < 0:
        raise PresetError(f"{source}: factorize.calibration = {fac['calibration']!r}: a number of training samples "
                          "(0: truncate the weights alone)")
    if fac["calibration"] and fac["adapter"]:
        raise PresetError(f"{source}: factorize.calibration truncates pretrained weights; adapters start at zero: "
                          "set it to 0")
    if opt["coefficient_metric"] not in COEFFICIENT_METRICS:
        raise PresetError(f"{source}: optimizer.coefficient_metric {opt['coefficient_metric']!r}: choose one of "
                          f"{', '.join(COEFFICIENT_METRICS)}")
    if fac["conv_format"] not in ("matrix", "tucker"):
        raise PresetError(f"{source}: factorize.conv_format {fac['conv_format']!r}: choose matrix or tucker")
    if fac["execution"] not in EXECUTIONS:
        raise PresetError(f"{source}: factorize.execution {fac['execution']!r}: choose one of {', '.join(EXECUTIONS)}")
    if opt["lr"] < 0:
        raise PresetError(f"{source}: optimizer.lr = {opt['lr']} must be ≥ 0")
    if train["epochs"] < 1:
        raise PresetError(f"{source}: train.epochs = {train['epochs']} must be ≥ 1")
    if train["device"] not in ("auto", "cpu", "cuda") and not str(train["device"]).startswith("cuda:"):
        raise PresetError(f"{source}: train.device {train['device']!r} must be auto, cpu or cuda")
    if not train["budget_warmup_epochs"] >= 0:
        raise PresetError(f"{source}: train.budget_warmup_epochs = {train['budget_warmup_epochs']} must be ≥ 0")
    start = train["budget_warmup_start_cr"]
    if start is not None and not 0.0 < start < (fac["target_cr"] or 100.0):
        raise PresetError(f"{source}: train.budget_warmup_start_cr = {start:g} is the c.r. a budget warm-up starts "
                          f"from: give a percentage in (0, {fac['target_cr'] or 100:g}), below the target c.r.")
    if not 0.0 <= train["distill"] <= 1.0:
        raise PresetError(f"{source}: train.distill = {train['distill']} is the weight of the teacher's soft targets: "
                          "give a number in [0, 1] (0: off)")
    if not train["distill_temperature"] > 0:
        raise PresetError(f"{source}: train.distill_temperature = {train['distill_temperature']} must be > 0")
    if not train["tau_warmup_epochs"] >= 0:
        raise PresetError(f"{source}: train.tau_warmup_epochs = {train['tau_warmup_epochs']} must be ≥ 0")
    if train["schedule"] not in ("cosine", "constant"):
        raise PresetError(f"{source}: train.schedule {train['schedule']!r} must be cosine or constant")
    for key in ("image_size", "channels", "train_samples"):
        value = cfg["data"][key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PresetError(f"{source}: data.{key} = {value!r} must be a positive integer (or null)")
    data = cfg["data"]
    if data["batch_size"] < 1:
        raise PresetError(f"{source}: data.batch_size must be ≥ 1")
    if data["eval_batch_size"] is not None and data["eval_batch_size"] < 1:
        raise PresetError(f"{source}: data.eval_batch_size = {data['eval_batch_size']} must be ≥ 1 (or null: "
                          "the training batch)")
    if data["workers"] < 0:
        raise PresetError(f"{source}: data.workers = {data['workers']} must be ≥ 0")
    if train["grad_clip"] is not None and not train["grad_clip"] > 0:
        raise PresetError(f"{source}: train.grad_clip = {train['grad_clip']} must be > 0 (or null: no clipping)")
    if not train["warmup_epochs"] >= 0:
        raise PresetError(f"{source}: train.warmup_epochs = {train['warmup_epochs']} must be ≥ 0")
    if not opt["weight_decay"] >= 0:
        raise PresetError(f"{source}: optimizer.weight_decay = {opt['weight_decay']} must be ≥ 0")
    if not all(0.0 <= b < 1.0 for b in opt["betas"]):
        raise PresetError(f"{source}: optimizer.betas = {opt['betas']} must lie in [0, 1)")
    if not 0.0 <= opt["momentum"] < 1.0:
        raise PresetError(f"{source}: optimizer.momentum = {opt['momentum']} must lie in [0, 1)")
    if opt["update_every"] < 1:
        raise PresetError(f"{source}: optimizer.update_every = {opt['update_every']} must be ≥ 1")
    if opt["basis_every"] < 1:
        raise PresetError(f"{source}: optimizer.basis_every = {opt['basis_every']} must be ≥ 1 (1: the bases are "
                          "updated at every step)")
    if opt["basis_every"] > 1 and opt["update_every"] > 1:
        raise PresetError(f"{source}: optimizer.basis_every and optimizer.update_every are both > 1: choose one "
                          "(each amortises the basis update)")
    if opt["rank_every"] < 1:
        raise PresetError(f"{source}: optimizer.rank_every = {opt['rank_every']} must be ≥ 1 (1: ranks chosen at every "
                          "truncation)")
    if opt["svd_batching"] not in SVD_BATCHINGS:
        raise PresetError(f"{source}: optimizer.svd_batching {opt['svd_batching']!r}: choose one of "
                          f"{', '.join(SVD_BATCHINGS)}")
    if opt["truncation"] not in TRUNCATIONS:
        raise PresetError(f"{source}: optimizer.truncation {opt['truncation']!r}: choose one of "
                          f"{', '.join(TRUNCATIONS)}")
    if opt["truncation"] == "subspace" and (opt["update_every"] > 1 or opt["new_moments"] == "project"):
        raise PresetError(f"{source}: optimizer.truncation: subspace does not go with optimizer.update_every > 1 or "
                          "optimizer.new_moments: project — leave one of them out")
    if opt["augmentation"] not in AUGMENTATIONS:
        raise PresetError(f"{source}: optimizer.augmentation {opt['augmentation']!r}: choose one of "
                          f"{', '.join(AUGMENTATIONS)}")
    fraction = opt["new_block_fraction"]
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise PresetError(f"{source}: optimizer.new_block_fraction = {fraction} must lie in [0, 1] (the share of "
                              "each batch the new-new block is formed from; 1: exact, 0: dropped)")
        if opt["mode"] == "two_pass" and fraction != 1.0:
            raise PresetError(f"{source}: optimizer.new_block_fraction does not go with optimizer.mode: two_pass, "
                              "whose second pass forms the new-new block exactly — use mode parallel or fused")
        if opt["mode"] == "fused" and fraction == 0.0:
            raise PresetError(f"{source}: optimizer.new_block_fraction = 0 drops the new-new block: that is "
                              "optimizer.mode: parallel")
    if opt["min_rank"] < 1:
        raise PresetError(f"{source}: optimizer.min_rank = {opt['min_rank']} must be ≥ 1")
    if opt["capacity"] is not None:
        if opt["capacity"] < opt["min_rank"]:
            raise PresetError(f"{source}: optimizer.capacity = {opt['capacity']} must be ≥ optimizer.min_rank "
                              f"({opt['min_rank']})")
        clash = [name for name, on in (("optimizer.update_every > 1", opt["update_every"] > 1),
                                       ("optimizer.max_params", opt["max_params"] is not None),
                                       ("factorize.target_cr", fac["target_cr"] is not None),
                                       ("optimizer.new_moments: project", opt["new_moments"] == "project"),
                                       ("method dlrt-naive", opt["method"] == "dlrt-naive")) if on]
        if clash:
            raise PresetError(f"{source}: optimizer.capacity holds every layer's shapes fixed and chooses ranks on the "
                              f"device; it does not go with {clash[0]} — leave one of them out")
    if opt["max_rank"] is not None and opt["max_rank"] < opt["min_rank"]:
        raise PresetError(f"{source}: optimizer.max_rank = {opt['max_rank']} must be ≥ optimizer.min_rank "
                          f"({opt['min_rank']})")
    if opt["mode"] not in MODES:
        raise PresetError(f"{source}: optimizer.mode {opt['mode']!r}: choose one of {', '.join(MODES)}")
    if opt["second_moment"] not in SECOND_MOMENT_RULES:
        raise PresetError(f"{source}: optimizer.second_moment {opt['second_moment']!r}: choose one of "
                          f"{', '.join(SECOND_MOMENT_RULES)}")
    if not isinstance(cfg["model"]["name"], str):
        raise PresetError(f"{source}: model.name = {cfg['model']['name']!r} must be a name (`lrc presets`)")
