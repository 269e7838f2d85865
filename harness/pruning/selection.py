"""Which tensors a pruner prunes: names, globs and regexes resolved against the model.

Unset names mean every conv and linear weight; that default selection leaves out, and
reports, the tensors its pattern cannot take. Each tensor belongs to one pruner.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping

from torch import nn

from .patterns import MaskPattern
from .spec import Pattern

PRUNABLE_MODULES = (nn.Linear, nn.modules.conv._ConvNd)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every conv and linear weight, by parameter name (never biases or norm parameters)."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_MODULES) and isinstance(module.weight, nn.Parameter):
            found[f"{module_name}.weight" if module_name else "weight"] = module.weight
    return found


def select_tensors(patterns: list[str] | None, exclude: list[str] | None, named: Mapping[str, nn.Parameter],
                   default: list[str], prefix: str = "") -> list[str]:
    """Resolve exact names, globs and ``re:`` regexes to parameter names, minus ``exclude``.

    Unset ``patterns`` means every conv and linear weight. Globs and regexes match only
    parameters with two or more dimensions (weight matrices and kernels, never biases or
    norms); an exact name may be any parameter. A pattern that matches nothing is an error
    that lists the closest names.
    """
    chosen = list(default) if patterns is None else []
    for pattern in patterns or []:
        hits = _matching(pattern, named)
        if not hits:
            raise ValueError(_unknown_tensor_message(f"{prefix}names", pattern, list(named)))
        chosen += [h for h in hits if h not in chosen]
    for pattern in exclude or []:
        hits = set(_matching(pattern, named))
        if not hits:
            raise ValueError(_unknown_tensor_message(f"{prefix}exclude", pattern, list(named)))
        chosen = [name for name in chosen if name not in hits]
    if not chosen:
        raise ValueError(f"{prefix}names: no tensor left to prune (the model has no conv or linear weights, "
                         "or exclude removed them all)")
    return chosen


def skip_unfit(names: list[str], pattern: MaskPattern, kind: Pattern, named: Mapping[str, nn.Parameter],
               default: list[str], skipped: dict[str, str]) -> list[str]:
    """The default selection minus the tensors ``pattern`` (of kind ``kind``) cannot take; why each
    was left out goes into ``skipped`` (shared by all pruners of one model, and named in the error
    when none is left)."""
    kept = []
    for name in names:
        if kind == Pattern.channel and default and name == default[-1]:
            skipped[name] = "the output layer: removing its channels would remove classes"
            continue
        try:
            pattern.check(name, named[name].shape)
        except ValueError as err:
            reason = str(err).split(": ", 1)[-1].removesuffix("; exclude it")
            skipped[name] = reason.removeprefix(f"{name} ")
            continue
        kept.append(name)
    if not kept:
        raise ValueError(f"names: no tensor of the model can take pattern={kind.value} "
                         f"({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return kept


def claim(names: list[str], index: int, pattern: MaskPattern, named: Mapping[str, nn.Parameter],
          owners: dict[str, int], prefix: str = "") -> None:
    """Record in ``owners`` that pruner ``index`` prunes ``names``: each tensor belongs to one
    pruner, and must fit its pattern."""
    for name in names:
        if name in owners:
            raise ValueError(f"{prefix}names: {name!r} is already pruned by pruners[{owners[name]}]; "
                             "each tensor belongs to one pruner")
        owners[name] = index
        try:
            pattern.check(name, named[name].shape)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None


def _matching(pattern: str, named: Mapping[str, nn.Parameter]) -> list[str]:
    if pattern in named:
        return [pattern]
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return [n for n, p in named.items() if p.dim() >= 2 and regex.fullmatch(n)]
    if any(c in pattern for c in "*?["):
        return [n for n, p in named.items() if p.dim() >= 2 and fnmatch.fnmatchcase(n, pattern)]
    return []


def _unknown_tensor_message(key: str, name: str, existing: list[str]) -> str:
    close = difflib.get_close_matches(name.removeprefix("re:"), existing, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"the model has: {', '.join(existing[:6])}, ..."
    return f"{key}: {name!r} matches no parameter of the model; {hint}"
