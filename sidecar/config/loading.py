"""Reading the configuration: YAML (duplicate keys refused), ``${NAME}`` substitution from the
environment (``$${`` writes a literal ``${``), validation into :class:`Settings` with messages that
name the key path, e.g. ``trusted_issuers[0].algorithms[1]: ...``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.config.common import ConfigError
from sidecar.config.models import Settings
from sidecar.config.policies import Origins, PolicyConfig, validate_policies
from sidecar.exchange.policy import default_policy_name

# `$${` (an escaped literal), `${NAME}`, or an unterminated `${` (an error, not a literal).
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _path_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def substitute_env(
    value: Any,
    env: Mapping[str, str],
    loc: tuple[Any, ...] = (),
    *,
    base_dir: Path | None = None,
) -> Any:
    """Replace ``${NAME}`` in every string of a parsed YAML tree with the environment variable
    NAME, and ``${file:PATH}`` with the content of the file PATH (relative paths resolve against
    ``base_dir``, the configuration file's directory; one trailing line break is dropped): a
    mounted Kubernetes Secret, read at start-up and again on every reload, so the secret never
    needs to be in the process environment. Errors name the key path and the file, never a
    value."""
    if isinstance(value, dict):
        return {k: substitute_env(v, env, (*loc, k), base_dir=base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, (*loc, i), base_dir=base_dir) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group(1)
        if name is None:
            raise ConfigError(f"{_path_text(loc)}: unterminated ${{ (write $${{ for a literal)")
        if name.startswith(FILE_PREFIX):
            return read_secret_file(name.removeprefix(FILE_PREFIX), base_dir, loc)
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{_path_text(loc)}: ${{{name}}} is not a valid variable name")
        if name not in env:
            raise ConfigError(f"{_path_text(loc)}: environment variable {name} is not set")
        return env[name]

    return _ENV_REF.sub(replace, value)


FILE_PREFIX = "file:"
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret_file(name: str, base_dir: Path | None, loc: tuple[Any, ...]) -> str:
    """The text of a secret file named by ``${file:PATH}``."""
    if not name:
        raise ConfigError(f"{_path_text(loc)}: ${{file:}} names no file")
    path = Path(name)
    if not path.is_absolute():
        path = (base_dir or Path(".")) / path
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{_path_text(loc)}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{_path_text(loc)}: {path} is larger than 64 KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{_path_text(loc)}: {path} is not UTF-8 text") from None
    # A Secret written with `echo` or an editor ends with a line break that is no part of it.
    return text.removesuffix("\n").removesuffix("\r")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        # Cross-field checks run on the whole file and name their key paths in the message.
        loc = tuple(error["loc"])
        lines.append(f"{_path_text(loc)}: {message}" if loc else message)
    return "\n".join(lines)


def read_upstreams_file(name: Any, config_dir: Path | None) -> list[Any]:
    """The backend definitions of ``upstreams_file``: a JSON or YAML list, or a mapping with
    that list under ``upstreams`` or ``backends``."""
    if not isinstance(name, str) or not name:
        raise ConfigError("upstreams_file: must be a file path")
    path = Path(name)
    if not path.is_absolute():
        path = (config_dir or Path(".")) / path
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except OSError as exc:
        raise ConfigError(f"upstreams_file: cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"upstreams_file: {path} is not JSON or YAML text") from None
    if isinstance(data, dict) and len(data) == 1:
        data = data.get("upstreams", data.get("backends"))
    if not isinstance(data, list):
        raise ConfigError(
            f"upstreams_file: {path} must hold a list of upstreams (or backends: [...])"
        )
    return data


def settings_from_mapping(
    data: dict[str, Any], *, env: Mapping[str, str] | None = None, config_dir: Path | None = None
) -> Settings:
    if data.get("upstreams_file") is not None:
        # Read on every load (start-up and SIGHUP); its ${NAME}s are substituted below.
        inline = data.get("upstreams") or []
        if not isinstance(inline, list):
            raise ConfigError("upstreams: must be a list")
        imported = read_upstreams_file(data["upstreams_file"], config_dir)
        data = {**data, "upstreams": [*inline, *imported]}
    data = substitute_env(data, os.environ if env is None else env, base_dir=config_dir)
    try:
        settings = Settings.model_validate({**data, "config_dir": config_dir or Path(".")})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    return settings


def load_settings(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    config_dir: Path | None = None,
) -> Settings:
    """Read, substitute and validate the configuration file at ``path``; relative paths in it
    resolve against ``config_dir`` (default: the file's own directory)."""
    config_path = Path(path)
    data = read_yaml(config_path)
    if "config_dir" in data:
        raise ConfigError("config_dir: unknown key")
    return settings_from_mapping(
        data, env=env, config_dir=config_dir or config_path.resolve().parent
    )


def load_policies_file(path: Path, settings: Settings) -> list[PolicyConfig]:
    """The ``policies:`` list of a YAML file (a policy file or a whole config file)."""
    return load_policies_with_origins(path, settings)[0]


def load_policies_with_origins(
    path: Path, settings: Settings
) -> tuple[list[PolicyConfig], Origins]:
    """The ``policies:`` of a file, and where each one is in it (``FILE, line N``), for messages
    that name what the user wrote, in the file's own checks and in the database's (``apply``)."""
    data = read_yaml(path)
    raw = data.get("policies")
    if raw is None:
        raise ConfigError(f"{path}: no 'policies' key")
    raw = substitute_env(raw, os.environ, ("policies",), base_dir=path.resolve().parent)
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: policies: must be a list")
    lines = _item_lines(path, "policies")
    policies = []
    for index, item in enumerate(raw):
        at = f"{path}, line {lines[index]}" if index < len(lines) else str(path)
        try:
            policies.append(PolicyConfig.model_validate(item))
        except ValidationError as exc:
            named = _policy_named(item)
            prefix = f"{at}: {named}, " if named else f"{at}: "
            errors = [_with_fix(line) for line in format_validation_error(exc).splitlines()]
            raise ConfigError(
                "\n".join(f"{prefix}policies[{index}].{error}" for error in errors)
            ) from None
    labels = [f"{path}, line {lines[i]}" if i < len(lines) else str(path) for i in range(len(raw))]
    elsewhere = f"in the database, not in {path}"
    hint = "`policy apply --prune` deletes the database's policies the file does not name"
    try:
        validate_policies(policies, settings, labels, elsewhere=elsewhere, hint=hint)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    names = [p.name or default_policy_name(p.client_id, p.audience) for p in policies]
    return policies, Origins(dict(zip(names, labels, strict=True)), elsewhere, hint)


def _policy_named(item: Any) -> str | None:
    """``policy "NAME"`` for a policy item that failed validation, when its name (or the client
    and audience its default name is made of) can be read."""
    if not isinstance(item, dict):
        return None
    name = item.get("name")
    if not isinstance(name, str) or not name:
        client_id, audience = item.get("client_id"), item.get("audience")
        if not (isinstance(client_id, str) and isinstance(audience, str)):
            return None
        name = default_policy_name(client_id, audience)
    return f'policy "{name}"'


# Keys of ``policy list --json`` and of the admin API's answers that a policy file does not take.
_LISTING_KEYS = ("version:", "updated_at:", "updated_by:")


def _with_fix(line: str) -> str:
    if line.startswith(_LISTING_KEYS) and line.endswith("Extra inputs are not permitted"):
        return line + " (a listing, not a policy file: `policy export` writes one that applies)"
    return line


def _item_lines(path: Path, key: str) -> list[int]:
    """The line (1-based) of each item of the top-level ``key`` list of a YAML file."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key_node, value_node in root.value:
        if getattr(key_node, "value", None) == key and isinstance(value_node, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value_node.value]
    return []
