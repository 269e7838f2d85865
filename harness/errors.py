"""User errors: a bad config value, missing data, an unusable checkpoint or store.

The entry point prints these as one line and exits with status 2, no traceback.
Anything else is a bug and keeps its traceback.
"""

import dataclasses
import difflib
import errno
import re
from typing import Any

# Path problems of the user's environment (a read-only or missing folder), not bugs.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EISDIR}


# Schema fields that Hydra reads for itself (a config's defaults list, how it is instantiated): never a user's key.
_HIDDEN_FIELDS = ("defaults", "_recursive_")


class HarnessError(Exception):
    """A mistake the user can fix; the message names the key, the bad value and what is allowed."""


class ConfigError(HarnessError, ValueError):
    """A config value out of range or inconsistent with another."""


class DataError(HarnessError):
    """A dataset that cannot be loaded as configured."""


class RunStopped(Exception):
    """A run stopped on purpose before its end (e.g. a sweep's pruner); its run is KILLED, not FAILED."""


class Interrupted(RunStopped):
    """SIGINT or SIGTERM arrived; the training loop stopped between two steps and hands back its
    state (a ``harness.training.LoopState``), which the runner saves as a checkpoint."""

    def __init__(self, signal_name: str, state: Any) -> None:
        super().__init__(f"interrupted by {signal_name} at epoch {state.epoch} before step {state.step}")
        self.signal_name, self.state = signal_name, state
        self.checkpoint: Any = None  # the checkpoint's path, once written
        self.how_to_continue: str | None = None  # unset: ``python -m harness resume=<checkpoint's dir>``


def user_error_message(err: BaseException) -> str | None:
    """One line for a user mistake (ours, Hydra's or OmegaConf's); None for anything else (a bug)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if isinstance(err, HarnessError):
        return _first_line(str(err))
    if isinstance(err, OSError) and err.filename and err.errno in _PATH_ERRNOS:
        return f"cannot write or read {err.filename}: {err.strerror} (check outputs_dir and the paths given)"
    if isinstance(err, MissingConfigException):
        if err.missing_cfg_file and err.options is not None:
            group, _, option = err.missing_cfg_file.rpartition("/")
            return f"{group}={option}: no such option; choose one of {', '.join(err.options)}"
        return _first_line(str(err))
    if isinstance(err, OverrideParseException):
        return f"cannot parse override {err.override!r}: {_first_line(err.message)}"
    # Hydra raises some composition errors without ``from`` (a config file's unknown key): the cause is the context.
    cause = (err.__cause__ or err.__context__) if isinstance(err, ConfigCompositionException) else err
    where = _where(err)
    if isinstance(cause, MissingMandatoryValue):
        return f"{cause.full_key}: a value is required; set {cause.full_key}=..."
    if isinstance(cause, OmegaConfBaseException) and "not in" in str(cause):
        return where + _unknown_key_message(cause, _overridden_key(err))
    if isinstance(cause, OmegaConfBaseException):
        text = _override_text(err)
        return f"{text}: {_first_line(str(cause))}" if text else f"{where}{cause.full_key}: {_first_line(str(cause))}"
    if isinstance(err, ConfigCompositionException):
        return _first_line(str(err))
    return None


def _unknown_key_message(cause: Exception, overridden: str | None) -> str:
    """'prune.foo: unknown key; closest: ...' with the schema's keys as the allowed list."""
    key = getattr(cause, "full_key", "") or "?"
    if overridden and not key.startswith(overridden.split(".")[0]):
        key = f"{overridden}: {key}"  # a key inside a list item, e.g. prune.pruners=[{...}]
    return unknown_key_message(key, getattr(cause, "object_type", None))


def unknown_key_message(key: str, schema: Any) -> str:
    """``key``: unknown key, with the closest names among the fields of ``schema`` (a dataclass)."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return f"{key}: unknown key"
    return unknown_name_message(key, [f.name for f in dataclasses.fields(schema) if f.name not in _HIDDEN_FIELDS])


def unknown_name_message(key: str, allowed: list[str], what: str = "allowed") -> str:
    """``key``: unknown key, with the closest of the ``allowed`` names to its last part."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key.rpartition(".")[2], allowed, n=3)
    hint = f"closest: {', '.join(close)}; " if close else ""
    return f"{key}: unknown key; {hint}{what}: {', '.join(allowed)}"


def _where(err: BaseException) -> str:
    """'in sweep/x: ' when Hydra says which config file held the mistake; else empty."""
    match = re.match(r"In '([^']+)':", str(err))
    return f"in {match.group(1)}: " if match else ""


def _overridden_key(err: BaseException) -> str | None:
    match = re.match(r"Could not override '([^']+)'", str(err))
    return match.group(1) if match else None


def _override_text(err: BaseException) -> str | None:
    text = str(err)
    prefix = "Error merging override "
    return text[len(prefix):].strip() if text.startswith(prefix) else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
